"""ResNets in torchvision naming (conv1, bn1, layerX.Y.convK/bnK, layerX.Y.downsample.0/1, fc), declared once
for fusion (the Spec) and evaluation (the runnable module); both read the blocks with `_blocks`/`_convs`.

Spec: skip connections add block outputs to their inputs, so every block output of a stage, the stage's
downsample branch and the next consumers share ONE channel space; BasicBlock/Bottleneck inner channels are
spaces of their own.

Module: Basic (conv1, conv2) or Bottleneck (conv1..conv3) blocks from the keys. Stem: a 7x7 conv1 is the
ImageNet stem (stride 2, pad 3, max-pool 3/2/1); any other kernel is the small-input (CIFAR-style) stem:
stride 1, padding k//2, no max-pool. The first block of every stage after the first has stride 2 when it has
a downsample branch (on conv2 for Bottleneck, as torchvision v1.5). Global average pool, then fc."""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from otfuse_cli.errors import OtfuseError
from otfuse_cli.arch.model import Entry, Space, Spec
from otfuse_cli.arch.sequential import NORM_PARAMS, image_batch, natural_key


def is_resnet(shapes: dict) -> bool:
    return "conv1.weight" in shapes and "fc.weight" in shapes and "layer1.0.conv1.weight" in shapes


def _blocks(shapes: dict) -> list[str]:
    """Block prefixes ("layer1.0", ...) in run order."""
    return sorted({m.group(1) for n in shapes if (m := re.match(r"(layer\d+\.\d+)\.", n))}, key=natural_key)


def _convs(block: str, shapes: dict) -> list[str]:
    """A block's main-path convs ("conv1", "conv2"[, "conv3"]) in run order."""
    return sorted((n.split(".")[2] for n in shapes if re.fullmatch(rf"{re.escape(block)}\.conv\d+\.weight", n)),
                  key=natural_key)


# --------------------------------------------------------------------------- Spec

def _produce(conv: str, bn: str, shapes: dict) -> list[Entry]:
    entries = [Entry(f"{conv}.weight", 0, "out")]
    if f"{conv}.bias" in shapes:
        entries.append(Entry(f"{conv}.bias", 0, "out"))
    return entries + [Entry(f"{bn}.{k}", 0, "out") for k in NORM_PARAMS if f"{bn}.{k}" in shapes]


def resnet_spec(shapes: dict) -> Spec:
    stage = Space("stem", "stage", shapes["conv1.weight"][0], _produce("conv1", "bn1", shapes))
    spaces = [stage]
    for block in _blocks(shapes):
        if f"{block}.downsample.0.weight" in shapes:
            stage.entries += [Entry(f"{block}.conv1.weight", 1, "in"), Entry(f"{block}.downsample.0.weight", 1, "in")]
            stage = Space(block.split(".")[0], "stage", shapes[f"{block}.downsample.0.weight"][0],
                          _produce(f"{block}.downsample.0", f"{block}.downsample.1", shapes))
            spaces.append(stage)
        else:
            stage.entries.append(Entry(f"{block}.conv1.weight", 1, "in"))
        convs = _convs(block, shapes)
        for k, (conv, nxt) in enumerate(zip(convs, convs[1:]), start=1):
            entries = _produce(f"{block}.{conv}", f"{block}.bn{k}", shapes)
            entries.append(Entry(f"{block}.{nxt}.weight", 1, "in"))
            spaces.append(Space(f"{block}.{conv}", "channel", shapes[f"{block}.{conv}.weight"][0], entries))
        last = len(convs)
        stage.entries += _produce(f"{block}.{convs[-1]}", f"{block}.bn{last}", shapes)
    stage.entries.append(Entry("fc.weight", 1, "in"))
    return Spec("resnet", spaces, fixed_note="input image channels and class outputs")


# --------------------------------------------------------------------------- runnable module

class _Block(nn.Module):
    def __init__(self, act: Callable):
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if hasattr(self, "conv3"):
            out = self.bn3(self.conv3(self.act(out)))
        identity = self.downsample(x) if hasattr(self, "downsample") else x
        return self.act(out + identity)


class _ResNet(nn.Module):
    def __init__(self, act: Callable, input_shape, imagenet_stem: bool, num_outputs: int):
        super().__init__()
        self.act = act
        self.input_shape = input_shape
        self.imagenet_stem = imagenet_stem
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(image_batch(x, self.input_shape))))
        if self.imagenet_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        stage = 1
        while hasattr(self, f"layer{stage}"):
            x = getattr(self, f"layer{stage}")(x)
            stage += 1
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _conv(prefix: str, stride: int, shapes: dict) -> nn.Conv2d:
    w = shapes[f"{prefix}.weight"]
    kh, kw = w[2:]
    return nn.Conv2d(w[1], w[0], (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=f"{prefix}.bias" in shapes)


def _bn(prefix: str, shapes: dict) -> nn.BatchNorm2d:
    if f"{prefix}.running_mean" not in shapes:
        raise OtfuseError(f"cannot rebuild the ResNet: no BatchNorm tensors under {prefix!r}")
    return nn.BatchNorm2d(shapes[f"{prefix}.running_mean"][0], affine=f"{prefix}.weight" in shapes)


def _block(block: str, act: Callable, downsamples: bool, shapes: dict) -> _Block:
    """One Basic/Bottleneck block; `downsamples`: the first block of a later stage (stride 2 with a downsample)."""
    convs = _convs(block, shapes)
    if convs not in (["conv1", "conv2"], ["conv1", "conv2", "conv3"]):
        raise OtfuseError(f"cannot rebuild the ResNet: {block} has convs {convs}, expected conv1, conv2[, conv3]")
    down = f"{block}.downsample.0.weight" in shapes
    stride = 2 if down and downsamples else 1
    strided = "conv2" if len(convs) == 3 else "conv1"  # the stride sits on the first 3x3 conv
    module = _Block(act)
    for k, conv in enumerate(convs, start=1):
        module.add_module(conv, _conv(f"{block}.{conv}", stride if conv == strided else 1, shapes))
        module.add_module(f"bn{k}", _bn(f"{block}.bn{k}", shapes))
    if down:
        module.downsample = nn.Sequential(_conv(f"{block}.downsample.0", stride, shapes),
                                          _bn(f"{block}.downsample.1", shapes))
    return module


def build_resnet(shapes: dict, act: Callable, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, str]:
    """(module with untrained weights and the saved key layout, family) for a torchvision-named ResNet."""
    stem, fc = shapes["conv1.weight"], shapes["fc.weight"]
    net = _ResNet(act, input_shape, imagenet_stem=tuple(stem[2:]) == (7, 7), num_outputs=fc[0])
    net.conv1 = _conv("conv1", 2 if net.imagenet_stem else 1, shapes)
    net.bn1 = _bn("bn1", shapes)
    stages: dict[int, list[str]] = {}
    for block in _blocks(shapes):
        stages.setdefault(int(block.split(".")[0][5:]), []).append(block)
    if list(stages) != list(range(1, len(stages) + 1)):
        raise OtfuseError(f"cannot rebuild the ResNet: stages {list(stages)} are not layer1..layerN")
    for stage, blocks in stages.items():
        seq = nn.Sequential()
        for block in blocks:
            seq.add_module(block.split(".")[1], _block(block, act, stage > 1 and block.endswith(".0"), shapes))
        net.add_module(f"layer{stage}", seq)
    net.fc = nn.Linear(fc[1], fc[0], bias="fc.bias" in shapes)
    return net, "resnet"
