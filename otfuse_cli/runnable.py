"""Build runnable models from checkpoints: the one place that turns weights into an nn.Module.

* HF folders (config.json): the transformers Auto class picked from ``config.architectures``,
  loaded with ``from_pretrained(local_files_only=True)``; in-memory state dicts go through ``from_config``.
* Bare state dicts (no config) are rebuilt by their architecture family, from the same tensor-name and shape
  inference as the family's Spec: MLPs and VGG-style CNNs in otfuse_cli/arch/sequential.py, torchvision-named
  ResNets in otfuse_cli/arch/resnet.py (their docstrings say how). The saved keys load with strict=True.
* Activation: ``--activation`` > header metadata ``otfuse.activation`` > relu.
  Input shape: header metadata ``otfuse.input_shape`` ("C,H,W"), used to unflatten inputs for convnets and to
  choose a CNN's pooling.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from otfuse_cli.arch import bare_family
from otfuse_cli.errors import OtfuseError

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
TASKS = ("classification", "lm", "mlm", "translation")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "source.spm", "tokenizer.model")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """The torch device for --device (auto, cpu, cuda, cuda:N), checked against what this machine has."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):  # torch knows meta, xla, mps...: not ours to run on
        raise OtfuseError(f"unknown device {str(device)!r} for --device (expected auto, cpu or cuda)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OtfuseError(f"device {str(device)!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OtfuseError(f"device {str(device)!r} requested but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")
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
        placed = getattr(module, "hf_device_map", None)  # spread by a device map: inputs go to its first device
        if placed:
            first = next((d for d in placed.values() if d not in ("cpu", "disk")), "cpu")
            self.device = torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        else:
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

    def token_limit(self, max_length: int) -> int:
        """max_length capped by the model's position table and the tokenizer's own limit (RoBERTa: 514 vs 512):
        the one rule for alignment, statistics and evaluation."""
        limits = [max_length]
        for attr in ("n_positions", "max_position_embeddings"):
            value = getattr(self.config, attr, None)
            if isinstance(value, int) and value > 0:
                limits.append(value)
                break
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # "unset" is a huge sentinel
            limits.append(tok_max)
        return min(limits)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise OtfuseError(self.tokenizer_error or "the model has no tokenizer files; text data needs one")
        return self.tokenizer

    @torch.no_grad()
    def predict_logits(self, batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (float32) for a tensor batch (bare models, HF image models) or a tokenized dict batch."""
        return self.logits_with_grad(batch)

    def logits_with_grad(self, batch: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """predict_logits inside whatever grad mode the caller set (Fisher statistics need gradients)."""
        self.check_input(batch)
        try:
            if isinstance(batch, torch.Tensor):
                x = batch.to(self.device, torch.float32)
                out = self.module(pixel_values=x) if self.kind == "hf" else self.module(x)
            else:
                out = self.module(**{k: v.to(self.device) for k, v in batch.items()})
        except (RuntimeError, ValueError, IndexError) as e:  # shapes that do not fit this model, token ids...
            raise OtfuseError(f"the inputs do not fit the model: {str(e).splitlines()[0]}") from None
        # a base model class (a config without architectures: no task head) gives its last hidden states
        logits = out.logits if hasattr(out, "logits") else getattr(out, "last_hidden_state", out)
        return logits.float()

    def check_input(self, batch) -> None:
        """Tensor data (x) feeds bare nets and image models, tokenized text the HF text models."""
        image = self.kind != "hf" or getattr(self.module, "main_input_name", "input_ids") == "pixel_values"
        if isinstance(batch, torch.Tensor) and not image:
            raise OtfuseError("a text model cannot run on tensor data (x): give it text records "
                              "(.jsonl/.csv/.tsv/.txt)")
        if not isinstance(batch, torch.Tensor) and self.kind != "hf":
            raise OtfuseError(f"a bare {self.kind} state dict cannot run on text: give it tensor data "
                              "(.npz/.safetensors with x)")

    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Replace the weights in place (same keys as the checkpoint; tied copies may be absent)."""
        _load_strict(self.module, state_dict, allow_tied=self.kind == "hf")


# --------------------------------------------------------------------------- entry points

def load_runnable(ckpt, *, activation: str | None = None, device: str | torch.device = "cpu",
                  device_map: str | None = None) -> RunnableModel:
    """A runnable model for an opened Checkpoint (HF folder or bare state dict). device_map: accelerate's
    placement of an HF model's layers over the GPUs, CPU memory and disk (instead of `device`)."""
    # a LoRA adapter's folder is its base's: its merged weights are built from the config, not loaded from there
    hf = ckpt.config is not None and ckpt.folder is not None and ckpt.weights_in_folder and any(
        (ckpt.folder / f).is_file() for f in HF_WEIGHT_FILES)
    if device_map and not hf:
        raise OtfuseError(f"--device-map places the layers of a Hugging Face model folder; {ckpt.path} is not one "
                          "(use --device)")
    if hf:
        model = _hf_from_pretrained(ckpt, device, device_map)
    else:  # bare state dicts, or a folder with config but non-standard weight file names
        model = runnable_from_state_dict(ckpt.state_dict(), ckpt, activation=activation, device=device)
    loaded = model.module.state_dict()
    if any(t.device.type == "meta" for t in loaded.values()):  # offloaded to disk: check the checkpoint's own
        loaded = {name: ckpt.get(name) for name in ckpt.keys()}
    for name, tensor in loaded.items():  # an -inf a ReLU hides would still be scored
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise OtfuseError(f"{ckpt.path}: tensor {name} contains NaN or Inf")
    return model


def runnable_from_state_dict(state_dict: Mapping[str, torch.Tensor], like, activation: str | None = None,
                             device: str | torch.device = "cpu", config_overrides: dict | None = None) -> RunnableModel:
    """A runnable model for weights held in memory, shaped like the checkpoint ``like`` (config, metadata);
    config_overrides: config fields that differ from like's (a compressed model's widths)."""
    if like.config is not None:
        return _hf_from_state_dict(state_dict, like, device, config_overrides)
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
    placing = logging.getLogger("accelerate")  # "parameters offloaded to the disk": what --device-map asked for
    level = placing.level
    placing.setLevel(logging.ERROR)
    try:
        yield
    finally:
        placing.setLevel(level)
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
        except Exception as e:  # ValueError, OSError, huggingface_hub's StrictDataclassError (a field's type)...
            raise OtfuseError(f"cannot read the model config of {ckpt.path}: "
                              f"{' '.join(str(e).split()) or type(e).__name__}") from None


def _hf_tokenizer(folder) -> tuple[Any, str | None]:
    if folder is None or not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return None, f"{folder or 'the model'} has no tokenizer files; text data needs one"
    import transformers as T
    with quiet_transformers():
        try:
            return T.AutoTokenizer.from_pretrained(str(folder), local_files_only=True), None
        except Exception as e:  # missing sentencepiece, broken files, ...
            return None, f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"


# accelerate's memory budget per device for device maps (None: what each device has free); tests lower it to
# make layers go to disk
MAX_MEMORY: dict | None = None


def _placement(device_map: str | None) -> dict:
    """from_pretrained arguments for a device map: layers beyond memory go to a temporary offload folder,
    removed when the process ends."""
    if not device_map:
        return {}
    import atexit
    import shutil
    import tempfile

    try:
        import accelerate  # noqa: F401  (transformers needs it for device maps)
    except ImportError:
        raise OtfuseError("--device-map needs the accelerate package (pip install accelerate)") from None
    folder = tempfile.mkdtemp(prefix="otfuse-offload-")
    atexit.register(shutil.rmtree, folder, True)
    return {"device_map": device_map, "offload_folder": folder, "max_memory": MAX_MEMORY}


def _hf_from_pretrained(ckpt, device, device_map: str | None = None) -> RunnableModel:
    config = _hf_config(ckpt)
    cls, heads = hf_auto_class(config)
    with quiet_transformers():
        try:
            # mismatches are reported below, by name (transformers' own error points at a log we silence)
            model, info = cls.from_pretrained(str(ckpt.folder), config=config, local_files_only=True,
                                              dtype=torch.float32, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **_placement(device_map))
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            raise OtfuseError(f"cannot load {ckpt.folder} with transformers: {str(e).splitlines()[0]}") from None
    _check_loading_info(ckpt.folder, type(model).__name__, info)
    tok, tok_err = _hf_tokenizer(ckpt.folder)
    return RunnableModel(model, "hf", tokenizer=tok, config=config, task_heads=heads, device=device,
                         tokenizer_error=tok_err)


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")


def _check_loading_info(folder, arch: str, info: dict) -> None:
    """from_pretrained silently random-initialises missing or mis-shaped weights and drops unknown ones: the
    scores would be those of another model, so each is refused."""
    if info.get("missing_keys"):
        raise OtfuseError(f"{folder} lacks weights for its {arch} head/body: {_names(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        raise OtfuseError(f"{folder} holds tensors that its {arch} does not use: {_names(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        name, saved, built = sorted(info["mismatched_keys"], key=lambda t: t[0])[0]
        raise OtfuseError(f"{folder}: tensor {name!r} has shape {tuple(saved)} but its config.json builds "
                          f"{tuple(built)} for {arch}")


def _hf_from_state_dict(state_dict, like, device, overrides: dict | None = None) -> RunnableModel:
    config = _hf_config(like)
    for field, value in (overrides or {}).items():
        setattr(config, field, value)
    cls, heads = hf_auto_class(config)
    with quiet_transformers():
        try:
            model = cls.from_config(config).float()
        except (ValueError, KeyError) as e:
            raise OtfuseError(f"cannot build a model from the config of {like.path}: {str(e).splitlines()[0]}") from None
    # a base model class (config without architectures) names its weights without the checkpoint's prefix,
    # as from_pretrained accepts them
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not any(k.startswith(prefix) for k in model.state_dict()):
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
    _load_strict(model, state_dict, allow_tied=True)
    tok, tok_err = _hf_tokenizer(like.folder)
    return RunnableModel(model, "hf", tokenizer=tok, config=config, task_heads=heads, device=device,
                         tokenizer_error=tok_err)


# --------------------------------------------------------------------------- bare state dicts

def build_bare_module(sd: Mapping[str, torch.Tensor], activation: str = "relu",
                      input_shape: tuple[int, ...] | None = None) -> tuple[nn.Module, str]:
    """(module with random weights and the saved key layout, kind) for a bare state dict, built by its family
    in otfuse_cli.arch from the same layer inference as the family's Spec (so what fuses also runs)."""
    if not sd:
        raise OtfuseError("cannot rebuild a model from an empty state dict")
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    return bare_family(shapes).build(shapes, ACTIVATIONS[activation], input_shape)
