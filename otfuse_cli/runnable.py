"""Build runnable models from checkpoints: the one place that turns weights into an nn.Module.

* HF folders (config.json): the transformers Auto class picked from ``config.architectures``,
  loaded with ``from_pretrained(local_files_only=True)``; in-memory state dicts go through ``from_config``.
* Bare state dicts (no config) are rebuilt from tensor names and shapes:
  - MLP: 2-D Linear weights in natural key order, activation between them (input flattened).
  - CNN (VGG-style): each 4-D conv (stride 1, padding k//2) + its BatchNorm (prefix with running_mean)
    + activation + MaxPool2d(2); then flatten and the Linear chain. With a known input shape the number of
    pools is chosen so the flatten size matches the first Linear (pools after the first p convs); a first
    Linear whose input equals the last conv's channels means global average pooling instead.
  - ResNet in torchvision naming (conv1, bn1, layerX.Y.*, fc); Basic or Bottleneck blocks from the keys.
    Stem: a 7x7 conv1 is the ImageNet stem (stride 2, pad 3, max-pool 3/2/1); any other kernel is the
    small-input (CIFAR-style) stem: stride 1, padding k//2, no max-pool. The first block of every stage
    after the first has stride 2 when it has a downsample branch (on conv2 for Bottleneck, as torchvision v1.5).
  Submodules sit at the saved key prefixes, so ``load_state_dict(strict=True)`` takes the file as it is.
* Activation: ``--activation`` > header metadata ``otfuse.activation`` > relu.
  Input shape: header metadata ``otfuse.input_shape`` ("C,H,W"), used to unflatten inputs for convnets.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from otfuse_cli.errors import OtfuseError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
TASKS = ("classification", "lm", "mlm", "translation")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "source.spm", "tokenizer.model")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OtfuseError(f"unknown device {device!r} (expected auto, cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OtfuseError("device 'cuda' requested but CUDA is not available")
    return dev


class RunnableModel:
    """An nn.Module in eval mode plus what evaluation needs to feed it.

    ``config`` is the transformers config object (HF models) or None; ``task_heads`` the tasks the head supports.
    """

    def __init__(self, module: nn.Module, kind: str, *, tokenizer: Any = None, config: Any = None,
                 task_heads: set[str] | frozenset[str] = frozenset(), device: str | torch.device = "cpu",
                 input_shape: tuple[int, ...] | None = None, tokenizer_error: str | None = None):
        self.module = module.eval()
        self.kind = kind
        self.tokenizer = tokenizer
        self.config = config
        self.task_heads = frozenset(task_heads)
        self.input_shape = input_shape
        self.tokenizer_error = tokenizer_error
        self.device = torch.device("cpu")
        self.to(device)

    def __repr__(self) -> str:
        return f"RunnableModel(kind={self.kind!r}, heads={sorted(self.task_heads)}, device={self.device})"

    def to(self, device: str | torch.device) -> "RunnableModel":
        dev = resolve_device(device)
        if dev != self.device:
            self.module.to(dev)
            self.device = dev
        return self

    @property
    def num_labels(self) -> int | None:
        if self.kind == "hf":
            return getattr(self.config, "num_labels", None) if "classification" in self.task_heads else None
        return self.module.num_outputs

    @property
    def label2id(self) -> dict[str, int]:
        """Label name -> class index ({} for bare models, which only know indices)."""
        if self.kind != "hf" or "classification" not in self.task_heads:
            return {}
        return {str(k): int(v) for k, v in (getattr(self.config, "label2id", None) or {}).items()}

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise OtfuseError(self.tokenizer_error or "the model has no tokenizer files; text data needs one")
        return self.tokenizer

    @torch.no_grad()
    def predict_logits(self, batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (float32) for a tensor batch (bare models, HF image models) or a tokenized dict batch."""
        if isinstance(batch, torch.Tensor):
            x = batch.to(self.device, torch.float32)
            out = self.module(pixel_values=x) if self.kind == "hf" else self.module(x)
        else:
            out = self.module(**{k: v.to(self.device) for k, v in batch.items()})
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float()

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the weights in place (same keys as the checkpoint; tied copies may be absent)."""
        _load_strict(self.module, state_dict, allow_tied=self.kind == "hf")


# --------------------------------------------------------------------------- entry points

def load_runnable(ckpt, *, activation: str | None = None, device: str | torch.device = "cpu") -> RunnableModel:
    """A runnable model for an opened Checkpoint (HF folder or bare state dict)."""
    if ckpt.config is not None and ckpt.folder is not None:
        if any((ckpt.folder / f).is_file() for f in HF_WEIGHT_FILES):
            return _hf_from_pretrained(ckpt, device)
        # A folder with config but non-standard weight file names: build from config, load our reading.
        return runnable_from_state_dict(ckpt.state_dict(), ckpt, activation=activation, device=device)
    return runnable_from_state_dict(ckpt.state_dict(), ckpt, activation=activation, device=device)


def runnable_from_state_dict(state_dict: Mapping[str, torch.Tensor], like, activation: str | None = None,
                             device: str | torch.device = "cpu") -> RunnableModel:
    """A runnable model for weights held in memory, shaped like the checkpoint ``like`` (config, metadata)."""
    if like.config is not None:
        return _hf_from_state_dict(state_dict, like, device)
    meta = dict(getattr(like, "metadata", None) or {})
    act = activation or meta.get("otfuse.activation") or "relu"
    if act not in ACTIVATIONS:
        raise OtfuseError(f"unknown activation {act!r} (expected one of {', '.join(ACTIVATIONS)})")
    input_shape = _parse_shape(meta.get("otfuse.input_shape"))
    module, kind = build_bare_module(state_dict, act, input_shape)
    _load_strict(module, state_dict, allow_tied=False)
    return RunnableModel(module, kind, task_heads={"classification"}, device=device, input_shape=input_shape)


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in str(text).replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise OtfuseError(f"bad otfuse.input_shape metadata {text!r} (expected e.g. '1,28,28')") from None
    if not shape or any(s < 1 for s in shape):
        raise OtfuseError(f"bad otfuse.input_shape metadata {text!r} (expected e.g. '1,28,28')")
    return shape


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], allow_tied: bool) -> None:
    try:
        res = module.load_state_dict(dict(sd), strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)
        raise OtfuseError(f"weights do not fit the model: {first.strip()}") from None
    if res.unexpected_keys:
        raise OtfuseError(f"unexpected tensors for this model: {', '.join(res.unexpected_keys[:5])}"
                          + (" ..." if len(res.unexpected_keys) > 5 else ""))
    missing = list(res.missing_keys)
    if missing and allow_tied:
        # A key may be absent when it names the same Parameter as a loaded one (tied embeddings/LM head).
        groups: dict[int, list[str]] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(n)
        alias = {n: names for names in groups.values() for n in names}
        missing = [k for k in missing if not any(o in sd for o in alias.get(k, ()))]
    if missing:
        raise OtfuseError(f"missing tensors for this model: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))


# --------------------------------------------------------------------------- HF models

@contextlib.contextmanager
def quiet_transformers():
    import transformers
    old = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # "weights not initialized" etc. are checked by us instead
    transformers.utils.logging.disable_progress_bar()  # stderr progress is the CLI's business
    try:
        yield
    finally:
        transformers.logging.set_verbosity(old)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def hf_auto_class(config) -> tuple[Any, frozenset[str]]:
    """(transformers Auto class, supported tasks) from config.architectures."""
    import transformers as T
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    if arch.endswith("ForSequenceClassification"):
        return T.AutoModelForSequenceClassification, frozenset({"classification"})
    if arch.endswith("ForImageClassification"):
        return T.AutoModelForImageClassification, frozenset({"classification"})
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return T.AutoModelForCausalLM, frozenset({"lm"})
    if arch.endswith("ForMaskedLM"):
        return T.AutoModelForMaskedLM, frozenset({"mlm"})
    if arch.endswith(("ForSeq2SeqLM", "MTModel")) or (
            arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False)):
        return T.AutoModelForSeq2SeqLM, frozenset({"translation"})
    if arch.endswith("ForTokenClassification"):
        return T.AutoModelForTokenClassification, frozenset({"token_classification"})
    return T.AutoModel, frozenset()


def _hf_config(ckpt):
    import transformers as T
    with quiet_transformers():
        try:
            if ckpt.folder is not None and (ckpt.folder / "config.json").is_file():
                return T.AutoConfig.from_pretrained(str(ckpt.folder), local_files_only=True)
            cfg = dict(ckpt.config)
            return T.AutoConfig.for_model(cfg.pop("model_type", None), **cfg)
        except (ValueError, KeyError, OSError) as e:
            raise OtfuseError(f"cannot read the model config of {ckpt.path}: {str(e).splitlines()[0]}") from None


def _hf_tokenizer(folder) -> tuple[Any, str | None]:
    if folder is None or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None, f"{folder or 'the model'} has no tokenizer files; text data needs one"
    import transformers as T
    with quiet_transformers():
        try:
            return T.AutoTokenizer.from_pretrained(str(folder), local_files_only=True), None
        except Exception as e:  # missing sentencepiece, broken files, ...
            return None, f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


def _hf_from_pretrained(ckpt, device) -> RunnableModel:
    config = _hf_config(ckpt)
    cls, heads = hf_auto_class(config)
    with quiet_transformers():
        try:
            model, info = cls.from_pretrained(str(ckpt.folder), config=config, local_files_only=True,
                                              dtype=torch.float32, output_loading_info=True)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise OtfuseError(f"cannot load {ckpt.folder} with transformers: {str(e).splitlines()[0]}") from None
    # from_pretrained silently random-initialises missing weights: refuse, the scores would be noise.
    if info.get("missing_keys"):
        keys = sorted(info["missing_keys"])
        raise OtfuseError(f"{ckpt.folder} lacks weights for its {type(model).__name__} head/body: "
                          f"{', '.join(keys[:4])}" + (" ..." if len(keys) > 4 else ""))
    tok, tok_err = _hf_tokenizer(ckpt.folder)
    return RunnableModel(model, "hf", tokenizer=tok, config=config, task_heads=heads, device=device,
                         tokenizer_error=tok_err)


def _hf_from_state_dict(state_dict, like, device) -> RunnableModel:
    config = _hf_config(like)
    cls, heads = hf_auto_class(config)
    with quiet_transformers():
        try:
            model = cls.from_config(config).float()
        except (ValueError, KeyError) as e:
            raise OtfuseError(f"cannot build a model from the config of {like.path}: {str(e).splitlines()[0]}") from None
    _load_strict(model, state_dict, allow_tied=True)
    tok, tok_err = _hf_tokenizer(like.folder)
    return RunnableModel(model, "hf", tokenizer=tok, config=config, task_heads=heads, device=device,
                         tokenizer_error=tok_err)


# --------------------------------------------------------------------------- bare state dicts

def _natural_key(prefix: str):
    # "10" after "2", "fc10" after "fc2": digit runs compare as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", prefix)]


def _prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if "." not in key:
            raise OtfuseError(f"cannot rebuild a model from tensor {key!r}: no module prefix "
                              "(bare state dicts need names like '0.weight'; HF models need config.json)")
        prefix, leaf = key.rsplit(".", 1)
        groups.setdefault(prefix, {})[leaf] = t
    return groups


def _place(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register module at a dotted path, creating plain containers on the way (so keys match exactly)."""
    *parents, last = dotted.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(last, module)


def _shape_images(x: torch.Tensor, input_shape: tuple[int, ...] | None) -> torch.Tensor:
    if x.dim() == 4:
        return x
    if x.dim() == 3:  # (N, H, W) greyscale
        return x.unsqueeze(1)
    if input_shape is not None and len(input_shape) == 3:
        return x.reshape(x.shape[0], *input_shape)
    raise OtfuseError(f"a convnet needs (N, C, H, W) inputs, got shape {tuple(x.shape)} "
                      "and no otfuse.input_shape metadata to unflatten it")


class _Chain(nn.Module):
    """Layers at their saved key prefixes, run in ``steps`` order (prefix names and functional ops)."""

    def __init__(self, input_shape: tuple[int, ...] | None):
        super().__init__()
        self.input_shape = input_shape
        self.steps: list[str | Callable] = []
        self.num_outputs = 0
        self.is_conv = False

    def extra_repr(self) -> str:
        return "steps: " + " -> ".join(s if isinstance(s, str) else s.__name__.strip("_") for s in self.steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _shape_images(x, self.input_shape) if self.is_conv else x.flatten(1)
        for step in self.steps:
            x = self.get_submodule(step)(x) if isinstance(step, str) else step(x)
        return x


def _classify(prefix: str, p: dict[str, torch.Tensor]) -> str:
    w = p.get("weight")
    if "running_mean" in p:
        return "bn"
    if w is not None and w.dim() == 4:
        return "conv"
    if w is not None and w.dim() == 2:
        return "linear"
    if w is not None and w.dim() == 1:
        return "ln"
    shapes = {k: tuple(v.shape) for k, v in p.items()}
    raise OtfuseError(f"cannot rebuild layer {prefix!r} {shapes}: expected Linear, Conv2d, BatchNorm or LayerNorm "
                      "weights (HF models need their config.json)")


def _flatten_then_global(x: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _build_chain(sd: Mapping[str, torch.Tensor], act: Callable, input_shape) -> _Chain:
    groups = _prefixes(sd)
    order = sorted(groups, key=_natural_key)
    kinds = [(_classify(p, groups[p]), p) for p in order]
    chain = _Chain(input_shape)
    convs = [p for k, p in kinds if k == "conv"]
    linears = [p for k, p in kinds if k == "linear"]
    if not linears:
        raise OtfuseError("cannot rebuild the model: no Linear (2-D) weight for the output layer")
    chain.is_conv = bool(convs)
    pools = _choose_pools(groups, convs, linears[0], input_shape) if convs else None
    blocks: list[list] = []  # each block: [layer prefixes...], closed by an activation (+pool)
    for kind, prefix in kinds:
        p = groups[prefix]
        w = p.get("weight")
        has_bias = "bias" in p
        if kind == "conv":
            kh, kw = w.shape[-2:]
            mod = nn.Conv2d(w.shape[1], w.shape[0], (kh, kw), padding=(kh // 2, kw // 2), bias=has_bias)
        elif kind == "linear":
            mod = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
        elif kind == "bn":
            if not blocks:
                raise OtfuseError(f"BatchNorm {prefix!r} comes before any Conv/Linear layer")
            n = p["running_mean"].shape[0]
            mod = (nn.BatchNorm2d if blocks[-1][0] == "conv" else nn.BatchNorm1d)(n, affine="weight" in p)
        else:  # LayerNorm
            if not blocks:
                raise OtfuseError(f"norm layer {prefix!r} comes before any Conv/Linear layer")
            mod = nn.LayerNorm(w.shape[0], elementwise_affine=True, bias=has_bias)
        _place(chain, prefix, mod)
        if kind in ("conv", "linear"):
            blocks.append([kind, prefix])
        else:
            blocks[-1].append(prefix)
    conv_i = 0
    for i, (kind, *layers) in enumerate(blocks):
        chain.steps.extend(layers)
        if i == len(blocks) - 1:
            break  # logits: no activation after the output layer
        chain.steps.append(act)
        if kind == "conv":
            if pools[0][conv_i]:
                chain.steps.append(_maxpool2)
            conv_i += 1
            if blocks[i + 1][0] == "linear":
                chain.steps.append(_flatten_then_global if pools[1] else _flatten)
    chain.num_outputs = groups[linears[-1]]["weight"].shape[0]
    return chain


def _maxpool2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 2)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _choose_pools(groups, convs: list[str], first_linear: str, input_shape) -> tuple[list[bool], bool]:
    """(max-pool after conv i?, global average pool before the Linear chain?)."""
    n = len(convs)
    channels = groups[convs[-1]]["weight"].shape[0]
    features = groups[first_linear]["weight"].shape[1]
    if input_shape is None or len(input_shape) != 3:
        return [True] * n, features == channels
    _, h, w = input_shape
    for p in range(n, -1, -1):
        if channels * (h >> p) * (w >> p) == features:
            return [i < p for i in range(n)], False
    if features == channels:
        return [True] * n, True
    raise OtfuseError(f"cannot rebuild the convnet: first Linear takes {features} inputs, but {channels} channels "
                      f"of a {h}x{w} input give {channels * (h >> n) * (w >> n)} after {n} max-pools")


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
    def __init__(self, act: Callable, input_shape, imagenet_stem: bool):
        super().__init__()
        self.act = act
        self.input_shape = input_shape
        self.imagenet_stem = imagenet_stem
        self.num_outputs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(_shape_images(x, self.input_shape))))
        if self.imagenet_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        stage = 1
        while hasattr(self, f"layer{stage}"):
            x = getattr(self, f"layer{stage}")(x)
            stage += 1
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _conv(w: torch.Tensor, stride: int, bias: bool) -> nn.Conv2d:
    kh, kw = w.shape[-2:]
    return nn.Conv2d(w.shape[1], w.shape[0], (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=bias)


def _bn(p: dict[str, torch.Tensor]) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(p["running_mean"].shape[0], affine="weight" in p)


def _build_resnet(sd: Mapping[str, torch.Tensor], act: Callable, input_shape) -> _ResNet:
    g = _prefixes(sd)
    for need in ("conv1", "bn1", "fc"):
        if need not in g:
            raise OtfuseError(f"cannot rebuild the ResNet: no {need!r} tensors")
    stem = g["conv1"]["weight"]
    net = _ResNet(act, input_shape, imagenet_stem=tuple(stem.shape[-2:]) == (7, 7))
    net.conv1 = nn.Conv2d(stem.shape[1], stem.shape[0], tuple(stem.shape[-2:]), stride=2 if net.imagenet_stem else 1,
                          padding=tuple(k // 2 for k in stem.shape[-2:]), bias="bias" in g["conv1"])
    net.bn1 = _bn(g["bn1"])
    blocks: dict[int, set[int]] = {}
    for prefix in g:
        m = re.fullmatch(r"layer(\d+)\.(\d+)\..*", prefix)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
        elif prefix not in ("conv1", "bn1", "fc"):
            raise OtfuseError(f"cannot rebuild the ResNet: unexpected tensors under {prefix!r}")
    if sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise OtfuseError(f"cannot rebuild the ResNet: stages {sorted(blocks)} are not layer1..layerN")
    for stage in sorted(blocks):
        seq = nn.Sequential()
        for b in sorted(blocks[stage]):
            pre = f"layer{stage}.{b}"
            block = _Block(act)
            down = f"{pre}.downsample.0" in g
            stride = 2 if down and stage > 1 and b == 0 else 1
            bottleneck = f"{pre}.conv3" in g
            for i in (1, 2, 3) if bottleneck else (1, 2):
                if f"{pre}.conv{i}" not in g or f"{pre}.bn{i}" not in g:
                    raise OtfuseError(f"cannot rebuild the ResNet: {pre} has no conv{i}/bn{i}")
                conv_stride = stride if i == (2 if bottleneck else 1) else 1
                cp = g[f"{pre}.conv{i}"]
                block.add_module(f"conv{i}", _conv(cp["weight"], conv_stride, "bias" in cp))
                block.add_module(f"bn{i}", _bn(g[f"{pre}.bn{i}"]))
            if down:
                dp = g[f"{pre}.downsample.0"]
                block.downsample = nn.Sequential(nn.Conv2d(dp["weight"].shape[1], dp["weight"].shape[0], 1,
                                                           stride=stride, bias="bias" in dp),
                                                 _bn(g[f"{pre}.downsample.1"]))
            seq.add_module(str(b), block)
        net.add_module(f"layer{stage}", seq)
    fc = g["fc"]["weight"]
    net.fc = nn.Linear(fc.shape[1], fc.shape[0], bias="bias" in g["fc"])
    net.num_outputs = fc.shape[0]
    return net


def build_bare_module(sd: Mapping[str, torch.Tensor], activation: str = "relu",
                      input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, str]:
    """(module with random weights and the saved key layout, kind) for a bare state dict."""
    if not sd:
        raise OtfuseError("cannot rebuild a model from an empty state dict")
    act = ACTIVATIONS[activation]
    if any(k.startswith("layer1.") for k in sd) and "conv1.weight" in sd:
        return _build_resnet(sd, act, input_shape), "resnet"
    chain = _build_chain(sd, act, input_shape)
    return chain, "cnn" if chain.is_conv else "mlp"
