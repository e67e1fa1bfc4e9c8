"""ResNets in torchvision naming (conv1, bn1, layerX.Y.convK/bnK, layerX.Y.downsample.0/1, fc).

Skip connections add block outputs to their inputs, so every block output of a stage, the stage's
downsample branch and the next consumers share ONE channel space; BasicBlock/Bottleneck inner
channels are spaces of their own."""

from __future__ import annotations

import re

from otfuse_cli.arch.model import Entry, Space, Spec
from otfuse_cli.arch.sequential import BN_PARAMS, natural_key


def is_resnet(shapes: dict) -> bool:
    return "conv1.weight" in shapes and "fc.weight" in shapes and "layer1.0.conv1.weight" in shapes


def _produce(conv: str, bn: str, shapes: dict) -> list[Entry]:
    entries = [Entry(f"{conv}.weight", 0, "out")]
    if f"{conv}.bias" in shapes:
        entries.append(Entry(f"{conv}.bias", 0, "out"))
    return entries + [Entry(f"{bn}.{k}", 0, "out") for k in BN_PARAMS if f"{bn}.{k}" in shapes]


def resnet_spec(shapes: dict) -> Spec:
    blocks = sorted({m.group(1) for n in shapes if (m := re.match(r"(layer\d+\.\d+)\.", n))}, key=natural_key)
    stage = Space("stem", "stage", shapes["conv1.weight"][0], _produce("conv1", "bn1", shapes))
    spaces = [stage]
    for block in blocks:
        if f"{block}.downsample.0.weight" in shapes:
            stage.entries += [Entry(f"{block}.conv1.weight", 1, "in"), Entry(f"{block}.downsample.0.weight", 1, "in")]
            stage = Space(block.split(".")[0], "stage", shapes[f"{block}.downsample.0.weight"][0],
                          _produce(f"{block}.downsample.0", f"{block}.downsample.1", shapes))
            spaces.append(stage)
        else:
            stage.entries.append(Entry(f"{block}.conv1.weight", 1, "in"))
        convs = sorted((n.split(".")[2] for n in shapes if re.fullmatch(rf"{block}\.conv\d+\.weight", n)),
                       key=natural_key)
        for k, (conv, nxt) in enumerate(zip(convs, convs[1:]), start=1):
            entries = _produce(f"{block}.{conv}", f"{block}.bn{k}", shapes)
            entries.append(Entry(f"{block}.{nxt}.weight", 1, "in"))
            spaces.append(Space(f"{block}.{conv}", "channel", shapes[f"{block}.{conv}.weight"][0], entries))
        last = len(convs)
        stage.entries += _produce(f"{block}.{convs[-1]}", f"{block}.bn{last}", shapes)
    stage.entries.append(Entry("fc.weight", 1, "in"))
    return Spec("resnet", spaces, fixed_note="input image channels and class outputs")
