"""A PEFT LoRA adapter folder read as the model it makes: the base's tensors with the low-rank update folded in.

Every command takes a model; a LoRA fine-tune is a model too, stored as a small difference from its base. The
adapter checkpoint presents the merged model (W' = W + scaling · B·A, tensor by tensor, when a tensor is read)
and the base's config, tokenizer and folder, so that what otfuse writes from it is a complete model. Opening
reads only names, shapes and the adapter's config, and checks every adapter tensor against the base then: a
bad adapter fails at open, in one line, not halfway through a fusion.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from otfuse_cli.checkpoint.reader import (Checkpoint, _load_torch, _read_json, _read_or_interrupted, _safe_open,
                                          open_checkpoint)
from otfuse_cli import inputs
from otfuse_cli.errors import OtfuseError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# Config fields that change what the adapter computes in ways a plain W + s·BA merge does not reproduce.
UNMERGEABLE = {
    "use_dora": "DoRA (use_dora)", "use_qalora": "QALoRA (use_qalora)", "use_bdlora": "BD-LoRA (use_bdlora)",
    "kasa_config": "KaSA (kasa_config)", "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter LoRA (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "megatron_config": "Megatron layers (megatron_config)",
}
# <module>.lora_A[.adapter].weight, .lora_B[.adapter].{weight,bias}, .lora_embedding_{A,B}[.adapter]
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.(?P<kind>weight|bias))?")


@dataclass
class _Lora:
    """One module's low-rank pair, by adapter tensor name."""
    module: str  # PEFT's module name (what rank_pattern / alpha_pattern match)
    a: str | None = None
    b: str | None = None
    b_bias: str | None = None
    embedding: bool = False


@dataclass
class _Update:
    """What get() does to one base tensor: replace it with an adapter tensor, then add scaled terms."""
    replace: str | None = None
    terms: list[tuple[str, str | None, float, bool]] = field(default_factory=list)  # (B or bias, A, scale, transpose)


def is_adapter_folder(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


class AdapterCheckpoint:
    """A LoRA adapter over its base, with Checkpoint's interface. Build it with :func:`open_adapter`."""

    format = "lora adapter"
    weights_in_folder = False  # `folder` is the base's; the tensors are merged on read
    model_ref = None  # the Hugging Face model id it was opened from (hub.ModelRef), if any

    def __init__(self, path: Path, base: Checkpoint, adapter_config: dict, weights: Path):
        self.path = path
        self.base = base
        self.adapter_config = adapter_config
        # The base's folder, with symlinks resolved: provenance names every file relative to `folder`, so the
        # adapter's own files are given as folder/../.. paths that lead to them (see files()).
        self.folder = Path(os.path.realpath(base.folder))
        self.config = base.config
        self.model_config = base.model_config
        self.hf_config = base.hf_config
        self.metadata = base.metadata
        self._weights = weights
        self._handle = None
        self._memory: dict[str, torch.Tensor] | None = None
        shapes = self._adapter_shapes()
        self._updates = _plan(path, base, adapter_config, shapes)

    def __repr__(self) -> str:
        return f"AdapterCheckpoint({str(self.path)!r}, base={str(self.base.path)!r}, tensors={len(self.base)})"

    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        if self._weights.suffix == ".safetensors":
            handle = self._adapter_handle()
            return {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}
        self._memory = _load_torch(self._weights)  # a .bin adapter is small: read once
        return {n: tuple(t.shape) for n, t in self._memory.items()}

    def _adapter_handle(self):
        if self._handle is None:
            self._handle = _safe_open(self._weights)
        return self._handle

    def _adapter_tensor(self, name: str) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[name]
        return _read_or_interrupted(lambda: self._adapter_handle().get_tensor(name),
                                    lambda e: OtfuseError(f"cannot read tensor {name!r} from {self._weights}: {e}"))

    def close(self) -> None:
        """Drop the open file handles (they are reopened on demand)."""
        self._handle = None
        self.base.close()

    def __enter__(self) -> "AdapterCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check(self, name: str) -> None:
        if name not in self.base:
            raise OtfuseError(f"{self.path}: no tensor named {name!r}")

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def __len__(self) -> int:
        return len(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """The merged tensor: the base's (or the adapter's full copy), plus scaling · B·A, in the base's dtype
        (the sum is taken in float32 at least, rounded once)."""
        self._check(name)
        update = self._updates.get(name)
        if update is None:
            return self.base.get(name)
        dtype = self.base.dtype(name)
        tensor = self._adapter_tensor(update.replace) if update.replace is not None else self.base.get(name)
        out = tensor.to(torch.promote_types(dtype, torch.float32), copy=True)  # never the base's own storage
        for b_name, a_name, scale, transpose in update.terms:
            delta = self._adapter_tensor(b_name).to(out.dtype)
            if a_name is not None:
                delta = delta @ self._adapter_tensor(a_name).to(out.dtype)
            out += scale * (delta.T if transpose else delta)
        return out.to(dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}

    def files(self) -> list[Path]:
        """The adapter's config and weights, then the base's files: both define the merged model. The adapter's
        paths are spelled from the base's folder (folder/../adapter/...) so that every file is relative to it."""
        real = os.path.realpath(self.folder)
        own = [self.folder / os.path.relpath(os.path.realpath(f), real)
               for f in (self.path / ADAPTER_CONFIG, self._weights)]
        base = [self.folder / os.path.relpath(os.path.realpath(f), real) for f in self.base.files()]
        return own + sorted(set(base) - set(own))

    def num_parameters(self) -> int:
        return self.base.num_parameters()

    def size_on_disk(self) -> int:
        return self._weights.stat().st_size + self.base.size_on_disk()


def open_adapter(adapter_folder: str | Path, base: str | Path | None = None) -> AdapterCheckpoint:
    """Open a PEFT LoRA adapter folder over its base model: `base`, or else the local path that
    adapter_config.json names (absolute, relative to the adapter folder, then to the current directory)."""
    folder = Path(adapter_folder)
    if not is_adapter_folder(folder):
        raise OtfuseError(f"{folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    inputs.check_model_folder(folder)
    config = _read_json(folder / ADAPTER_CONFIG)
    _check_adapter_config(folder, config)
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise OtfuseError(f"no adapter weights in {folder} (expected {' or '.join(ADAPTER_WEIGHTS)})")
    base_path = Path(base) if base is not None else _base_path(folder, config)
    try:
        base_ckpt = open_checkpoint(base_path)
    except OtfuseError as e:
        raise OtfuseError(f"{folder}: cannot open its base model {base_path}: {e}") from None
    if isinstance(base_ckpt, AdapterCheckpoint):
        raise OtfuseError(f"{folder}: its base {base_path} is itself an adapter; merge that one into a full model "
                          "first")
    if base_ckpt.folder is None:
        raise OtfuseError(f"{folder}: its base {base_path} must be a model folder (config.json and weights), "
                          "not a single weight file")
    return AdapterCheckpoint(folder, base_ckpt, config, weights)


def _check_adapter_config(folder: Path, config: dict) -> None:
    where = f"{folder / ADAPTER_CONFIG}"
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise OtfuseError(f"{where}: peft_type {peft_type!r} is not supported; otfuse reads LoRA adapters only")
    for key, what in UNMERGEABLE.items():
        if config.get(key):
            raise OtfuseError(f"{where}: {what} is not supported; otfuse reads plain LoRA adapters only")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise OtfuseError(f"{where}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
                                                for v in pattern.values()):
            raise OtfuseError(f"{where}: {key} must map module names to positive numbers")


def _base_path(folder: Path, config: dict) -> Path:
    """The base named in adapter_config.json, as a local path only: nothing is downloaded."""
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise OtfuseError(f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path); pass the base "
                          f"explicitly: set it to the base model's folder")
    given = Path(name).expanduser()
    candidates = [given] if given.is_absolute() else [folder / given, given]
    for cand in candidates:
        if os.path.exists(cand):  # never raises (a 300-byte name: ENAMETOOLONG from Path.exists)
            return cand
    raise OtfuseError(f"{folder}: base model {name!r} is not a local path (otfuse downloads nothing); pass the base "
                      f"explicitly: set base_model_name_or_path in {folder / ADAPTER_CONFIG} to its folder")


def _pattern_value(where: Path, pattern: dict, module: str, default: float) -> float:
    """PEFT's rule (get_pattern_key): the first key, a regex, that matches the end of the module name at a dot."""
    for key in pattern:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return pattern[key]
        except re.error as e:
            raise OtfuseError(f"{where / ADAPTER_CONFIG}: pattern {key!r} is not a valid regex ({e})") from None
    return default


def _parse(path: Path, names: list[str]) -> tuple[dict[str, _Lora], dict[str, str]]:
    """Adapter tensor names -> LoRA pairs by module, and full tensors (modules_to_save, biases) by target name."""
    loras: dict[str, _Lora] = {}
    full: dict[str, str] = {}
    for name in names:
        inner = name.removeprefix(PEFT_PREFIX)
        if ".original_module." in inner:
            continue  # the base's own copy of a modules_to_save module
        m = _LORA_KEY.fullmatch(inner)
        if m is None:
            target = re.sub(r"\.modules_to_save\.[^.]+\.", ".", inner).replace(".base_layer.", ".")
            full[target] = name
            continue
        module, part, kind = m["module"], m["part"], m["kind"]
        lora = loras.setdefault(module, _Lora(module))
        lora.embedding |= part.startswith("lora_embedding")
        if part.endswith("A") and kind != "bias":
            lora.a = name
        elif part.endswith("B") and kind == "bias":
            lora.b_bias = name
        elif part.endswith("B"):
            lora.b = name
        else:
            raise OtfuseError(f"{path}: adapter tensor {name!r} is not a LoRA tensor otfuse knows")
    return loras, full


def _prefix_map(path: Path, base: Checkpoint, targets: dict[str, str]):
    """The adapter's names as the base's: PEFT names modules as in the model it wrapped, which may sit under
    another prefix than the base's file (a BertModel adapter over a BertForSequenceClassification, ...). One
    rename (add or drop a leading prefix) must place every target on a base tensor. targets: base-style name ->
    the adapter tensor that updates it."""
    keys = set(base.keys())
    missing = [t for t in targets if t not in keys]
    if not missing:
        return lambda t: t
    first = missing[0]
    renames = [lambda t, p=k[: -len(first)]: p + t for k in sorted(keys) if k.endswith("." + first)]
    renames += [lambda t, p=first[:i + 1]: t.removeprefix(p) for i, c in enumerate(first)
                if c == "." and first[i + 1:] in keys]
    for rename in renames:
        if all(rename(t) in keys for t in targets):
            return rename
    bad = next((t for t in missing if all(r(t) not in keys for r in renames)), first)
    raise OtfuseError(f"{path}: adapter tensor {targets[bad]!r} ({bad}) matches no tensor of the base model "
                      f"{base.path}")


def _plan(path: Path, base: Checkpoint, config: dict,
          shapes: dict[str, tuple[int, ...]]) -> dict[str, _Update]:
    """Every adapter tensor placed on a base tensor and checked against its shape: base name -> update."""
    if not shapes:
        raise OtfuseError(f"{path}: the adapter holds no tensors")
    loras, full = _parse(path, sorted(shapes))
    for lora in loras.values():
        if lora.a is None or lora.b is None:
            raise OtfuseError(f"{path}: module {lora.module!r} has only one of its lora_A / lora_B tensors")
    targets = {**{m + ".weight": lo.a for m, lo in loras.items()},
               **{m + ".bias": lo.b_bias for m, lo in loras.items() if lo.b_bias}, **full}
    rename = _prefix_map(path, base, dict(sorted(targets.items())))
    updates: dict[str, _Update] = {}
    for target, name in full.items():
        at = rename(target)
        if shapes[name] != base.shape(at):
            raise OtfuseError(f"{path}: adapter tensor {name!r} has shape {shapes[name]} but the base's {at!r} "
                              f"has {base.shape(at)}")
        updates.setdefault(at, _Update()).replace = name
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for module, lora in sorted(loras.items()):
        a_shape, b_shape = shapes[lora.a], shapes[lora.b]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise OtfuseError(f"{path}: module {module!r} is a convolution LoRA ({len(a_shape)}-d lora_A); "
                              "otfuse merges LoRA on linear and embedding layers only")
        r = _pattern_value(path, config.get("rank_pattern") or {}, module, config["r"])
        if a_shape[0] != r or b_shape[1] != r:
            raise OtfuseError(f"{path}: module {module!r} has lora_A {a_shape} and lora_B {b_shape}, not rank {r} "
                              "as adapter_config.json says")
        alpha = _pattern_value(path, config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        weight = rename(module + ".weight")
        want, delta = base.shape(weight), (b_shape[0], a_shape[1])
        # PEFT stores an embedding's pair transposed; fan_in_fan_out marks GPT-2's Conv1D (in, out) weights, and a
        # non-square weight can only take one orientation (PEFT resets the flag per module type)
        transpose = lora.embedding or (fan_in_fan_out if delta[0] == delta[1] else delta != tuple(want))
        if (delta[::-1] if transpose else delta) != tuple(want):
            raise OtfuseError(f"{path}: LoRA update of {weight!r} has shape {delta} but the base tensor has "
                              f"{tuple(want)}")
        updates.setdefault(weight, _Update()).terms.append((lora.b, lora.a, scale, transpose))
        if lora.b_bias is not None:
            bias = rename(module + ".bias")
            if shapes[lora.b_bias] != base.shape(bias):
                raise OtfuseError(f"{path}: lora_B bias of {module!r} has shape {shapes[lora.b_bias]} but the "
                                  f"base's {bias!r} has {base.shape(bias)}")
            updates.setdefault(bias, _Update()).terms.append((lora.b_bias, None, scale, False))
    return updates
