"""Open any supported checkpoint and read it lazily, tensor by tensor.

Supported: a single ``.safetensors`` file, a folder holding ``model.safetensors``, a sharded set
(``model.safetensors.index.json``), an HF model folder (config.json + either layout), and
``.bin/.pt/.pth`` state dicts loaded with ``torch.load(weights_only=True)`` only. A PEFT LoRA adapter folder
(adapter_config.json, no full weights) opens as the merged model over its base (adapter.py).

Opening checks what every command relies on: at least one tensor, no zero-size axis, some floating-point
weights, and a config.json that is well typed and describes these tensors (config.py).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path, PurePosixPath
from typing import Callable, TypeVar

import torch
from safetensors import safe_open

from otfuse_cli.arch import HF_FAMILIES
from otfuse_cli.checkpoint.config import ModelConfig, check_loads, check_weights, parse_config
from otfuse_cli import hub, inputs
from otfuse_cli.errors import OtfuseError

T = TypeVar("T")

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
# Files that hold weights (never copied as "assets", never hashed as config).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz")
PROVENANCE_FILE = "otfuse.json"
ASSET_MAX_BYTES = 100 * 10**6  # tokenizer.json files reach tens of MB; anything larger is not an asset

# safetensors header dtype codes <-> torch dtypes (shared with the writer).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):  # newer dtypes, only where this torch has them
        ST_DTYPES[_code] = getattr(torch, _name)


def is_weight_file(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES)


def is_asset_file(path: Path) -> bool:
    """Small non-weight files that travel with a model folder (config, tokenizer, README...)."""
    name = path.name
    return (path.is_file() and not name.startswith(".") and not is_weight_file(path)
            and not name.endswith(".index.json") and name != PROVENANCE_FILE
            and path.stat().st_size <= ASSET_MAX_BYTES)


def asset_files(folder: Path) -> list[Path]:
    """Asset files of a model folder: top-level ones, plus sub-folders that hold no weights
    (e.g. sentence-transformers' ``1_Pooling/``); sorted, for deterministic copying and hashing."""
    out: list[Path] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            inner = [q for q in sorted(p.rglob("*")) if q.is_file()]
            if any(is_weight_file(q) for q in inner):
                continue  # e.g. checkpoint-500/: another model, not an asset
            out.extend(q for q in inner if is_asset_file(q)
                       and not any(part.startswith(".") for part in q.relative_to(folder).parts))
        elif is_asset_file(p):
            out.append(p)
    return out


class Checkpoint:
    """A checkpoint opened for lazy reading. Build it with :func:`open_checkpoint`."""

    weights_in_folder = True  # its tensors are the folder's weight files (an adapter's are merged on read)
    model_ref = None  # the Hugging Face model id it was opened from (hub.ModelRef), if any

    def __init__(self, path: Path, format: str, folder: Path | None, config: dict | None,
                 metadata: dict[str, str], weight_files: list[Path],
                 st_map: dict[str, Path] | None = None, tensors: dict[str, torch.Tensor] | None = None):
        self.path = path
        self.format = format
        self.folder = folder
        self.config = config
        self.model_config: ModelConfig | None = None  # the typed, checked config (set by open_checkpoint)
        self.hf_config = None  # transformers' own load of config.json, for a supported family
        self.metadata = metadata
        self._weight_files = weight_files
        self._st_map = st_map or {}        # safetensors: tensor name -> file
        self._tensors = tensors            # .bin: everything already in memory
        self._handles: dict[Path, object] = {}
        self._info: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if tensors is not None:
            self._info = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        else:
            for file in sorted(set(self._st_map.values())):
                h = self._handle(file)  # opening validates the header (corrupted/truncated files fail here)
                keys = set(h.keys())
                for name in (n for n, f in self._st_map.items() if f == file):
                    if name not in keys:
                        raise OtfuseError(f"{file}: tensor {name!r} named in the index is not in this shard")
                    sl = h.get_slice(name)
                    code = sl.get_dtype()
                    if code not in ST_DTYPES:
                        raise OtfuseError(f"{file}: tensor {name!r} has unsupported dtype {code}")
                    self._info[name] = (tuple(sl.get_shape()), ST_DTYPES[code])
            self.metadata = dict(self._handle(weight_files[0]).metadata() or {})

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self._info)})"

    def close(self) -> None:
        """Drop the open file handles (they are reopened on demand)."""
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, file: Path):
        # One open (memory-mapped) handle per file, reused for every tensor read.
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        return self._handles[file]

    def _check(self, name: str) -> None:
        if name not in self._info:
            raise OtfuseError(f"{self.path}: no tensor named {name!r}")

    def keys(self) -> list[str]:
        return sorted(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def __len__(self) -> int:
        return len(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        self._check(name)
        return self._info[name][0]

    def dtype(self, name: str) -> torch.dtype:
        self._check(name)
        return self._info[name][1]

    def get(self, name: str) -> torch.Tensor:
        self._check(name)
        if self._tensors is not None:
            return self._tensors[name]
        file = self._st_map[name]
        return _read_or_interrupted(lambda: self._handle(file).get_tensor(name),
                                    lambda e: OtfuseError(f"cannot read tensor {name!r} from {file}: {e}"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys()}

    def files(self) -> list[Path]:
        """Weight files plus the config/tokenizer files of the folder: what defines the model."""
        files = list(self._weight_files)
        if self.folder is not None:
            index = self.folder / (SAFETENSORS_INDEX if self.format == "sharded" else BIN_INDEX)
            if self.format in ("sharded", "bin") and index.is_file():
                files.append(index)
            files.extend(asset_files(self.folder))
        return sorted(set(files))

    def num_parameters(self) -> int:
        # Floating-point tensors only: integer buffers (num_batches_tracked, position ids) are not parameters.
        return sum(_numel(s) for s, d in self._info.values() if d.is_floating_point or d.is_complex)

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self._weight_files)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _read_or_interrupted(read: Callable[[], T], error: Callable[[Exception], OtfuseError]) -> T:
    """read(), with its failure reported as error(e). torch can turn a Ctrl-C that lands inside storage
    creation into a ValueError ("could not determine the shape of object type 'UntypedStorage'"), so a read
    that fails once and then succeeds was interrupted, not damaged: that is reported as KeyboardInterrupt."""
    try:
        return read()
    except Exception as first:
        try:
            read()
        except Exception:
            raise error(first) from None
        raise KeyboardInterrupt from None


def _open_error(file: Path, e: Exception) -> OtfuseError:
    if isinstance(e, FileNotFoundError):
        return OtfuseError(f"missing weight file: {file}")
    if "unable to mmap" in str(e) and "Cannot allocate memory" in str(e):
        # The file is fine: the kernel refuses one memory map larger than it lets a process commit (heuristic
        # overcommit allows about RAM + swap per map). Checkpoints in shards map one shard at a time.
        size = file.stat().st_size / 1e9
        return OtfuseError(f"{file} ({size:.1f} GB) is larger than this machine lets one file be memory-mapped "
                           "(RAM + swap); save it in shards (e.g. save_pretrained(..., max_shard_size=\"5GB\"))")
    return OtfuseError(f"{file} is not a valid safetensors file ({e})")  # truncated, corrupted, not safetensors


def _safe_open(file: Path):
    inputs.check_safetensors(file, "weight file")  # a regular file whose header length fits, before any read
    return _read_or_interrupted(lambda: safe_open(str(file), framework="pt"), lambda e: _open_error(file, e))


def _read_json(path: Path) -> dict:
    """config.json, an index, adapter_config.json: size and nesting capped before parsing (inputs.py)."""
    data = inputs.load_json(path, path.name)
    if not isinstance(data, dict):
        raise OtfuseError(f"cannot parse {path}: expected a JSON object")
    return data


def _shard_path(folder: Path, rel: object, index: Path) -> Path:
    """Resolve a shard named in an index, refusing anything outside the folder (before opening it)."""
    if not isinstance(rel, str) or not rel:
        raise OtfuseError(f"{index}: invalid shard name {rel!r}")
    pure = PurePosixPath(rel.replace("\\", "/"))
    if (not pure.parts or pure.is_absolute() or ".." in pure.parts or Path(rel).is_absolute()
            or ":" in pure.parts[0]):
        raise OtfuseError(f"{index}: refusing shard path {rel!r} outside the model folder")
    path = folder / pure
    try:  # symlinks pointing elsewhere are refused too
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        raise OtfuseError(f"{index}: refusing shard path {rel!r} outside the model folder") from None
    inputs.check_input(path, "shard", missing=f"{index}: shard {rel!r} is missing")
    return path


def _read_index(index: Path) -> dict[str, Path]:
    """weight_map of an index file, as tensor name -> validated shard path."""
    data = _read_json(index)
    wmap = data.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise OtfuseError(f"{index}: no 'weight_map' in the index")
    folder = index.parent
    shards: dict[str, Path] = {}
    out = {}
    for name, rel in wmap.items():
        if rel not in shards:
            shards[rel] = _shard_path(folder, rel, index)
        out[name] = shards[rel]
    return out


def _torch_load(file: Path):
    with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below is the one line
        warnings.simplefilter("ignore")
        return torch.load(file, map_location="cpu", weights_only=True)


def _torch_error(file: Path, e: Exception) -> OtfuseError:
    if isinstance(e, pickle.UnpicklingError):
        # weights_only refuses globals it does not allow: the file would run code when unpickled.
        return OtfuseError(f"refusing to load {file}: the pickle contains code/objects that are not plain tensors")
    if isinstance(e, FileNotFoundError):
        return OtfuseError(f"missing weight file: {file}")
    return OtfuseError(f"cannot read {file} as a PyTorch state dict ({type(e).__name__}: {e})")  # truncated, ...


def _load_torch(file: Path) -> dict[str, torch.Tensor]:
    inputs.check_input(file, "weight file", missing=f"missing weight file: {file}")  # a FIFO would block torch.load
    obj = _read_or_interrupted(lambda: _torch_load(file), lambda e: _torch_error(file, e))
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):  # training checkpoints wrap the weights
            inner = obj.get(key)
            if isinstance(inner, dict):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise OtfuseError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise OtfuseError(f"{file} is not a plain state dict: entry {bad[0]!r} is not a tensor")
    return dict(obj)


def _from_safetensors(path: Path, fmt: str, folder: Path | None, config: dict | None,
                      st_map: dict[str, Path]) -> Checkpoint:
    return Checkpoint(path, fmt, folder, config, {}, sorted(set(st_map.values())), st_map=st_map)


def _single_map(file: Path) -> dict[str, Path]:
    names = _safe_open(file).keys()
    if not names:  # a header of `{}`: nothing to read, fuse or run
        raise OtfuseError(f"{file} holds no tensors")
    return {k: file for k in names}


def _from_torch(path: Path, folder: Path | None, config: dict | None, files: list[Path]) -> Checkpoint:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in _load_torch(f).items():
            if k in tensors:
                raise OtfuseError(f"{f}: tensor {k!r} appears in more than one file")
            tensors[k] = v
    return Checkpoint(path, "bin", folder, config, {}, files, tensors=tensors)


def open_checkpoint(path: str | Path, base: str | Path | None = None) -> Checkpoint:
    """Open a checkpoint (file, folder or index) for lazy reading; OtfuseError on any bad input. base: the model
    a LoRA adapter folder is read over (fuse --base), in place of the one its adapter_config.json names.
    Either may be a Hugging Face model id (org/name[@revision]) that is not a local path: its cached snapshot
    opens (hub.py), and the checkpoint's model_ref names it."""
    located, ref = hub.locate(path)
    path = Path(located)
    base = hub.local_path(base)
    try:
        ckpt = _open(path, base)
    except OSError as e:  # permissions, I/O errors: still bad input, still one line
        raise OtfuseError(f"cannot read {e.filename or path}: {e.strerror or e}") from None
    ckpt.model_ref = ref
    if not isinstance(ckpt, Checkpoint):
        return ckpt  # an adapter: its base was checked when opened, and the merge keeps names and shapes
    _check_tensors(ckpt)
    if ckpt.config is not None:
        _check_config(ckpt)
    return ckpt


def _check_config(ckpt: Checkpoint) -> None:
    """The typed config: its fields by type and range, then against the tensors; a supported family's config
    must also load with transformers (which checks the fields otfuse does not read)."""
    ckpt.model_config = parse_config(ckpt.config, ckpt.folder)
    check_weights(ckpt.model_config, ckpt.config, {k: ckpt.shape(k) for k in ckpt.keys()}, ckpt.folder)
    if ckpt.model_config.model_type in HF_FAMILIES:
        ckpt.hf_config = check_loads(ckpt.folder, ckpt.folder)


def _check_tensors(ckpt: Checkpoint) -> None:
    """A model has no empty layers and something to compute with: zero-size tensors and integer-only files
    would fuse into unchanged copies or fail deep inside the math."""
    for name in ckpt.keys():
        if 0 in ckpt.shape(name):
            raise OtfuseError(f"{ckpt.path}: tensor {name!r} has shape {tuple(ckpt.shape(name))}, with an axis of "
                              "size 0 (an empty layer)")
    if not any(ckpt.dtype(n).is_floating_point for n in ckpt.keys()):
        raise OtfuseError(f"{ckpt.path} holds no floating-point tensors: no weights to fuse, compress or evaluate")


def _open(path: Path, base: str | Path | None = None) -> Checkpoint:
    inputs.check_input(path, "model", folder=True, missing=f"no such file or folder: {path}")
    folder = path if path.is_dir() else path.parent if path.name.startswith("adapter_model.") or \
        path.name.endswith(".index.json") else None
    if folder is not None:
        inputs.check_model_folder(folder)
    adapter = path if path.is_dir() else path.parent if path.name.startswith("adapter_model.") else None
    if adapter is not None and _is_adapter(adapter):
        from otfuse_cli.checkpoint.adapter import open_adapter  # it builds on this module

        return open_adapter(adapter, base)
    if path.is_dir():
        return _open_folder(path, path)
    name = path.name
    if name.endswith(".index.json"):
        return _open_folder(path.parent, path, index=path)
    if name.endswith(".safetensors"):
        return _from_safetensors(path, "single", None, None, _single_map(path))
    if name.endswith(TORCH_SUFFIXES):
        return _from_torch(path, None, None, [path])
    raise OtfuseError(f"unknown checkpoint file type: {path} (expected .safetensors, .bin, .pt, .pth, "
                      "an index .json or a model folder)")


def _is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder: its config, and no full model weights saved beside it (those would be the model)."""
    full = ("model.safetensors", SAFETENSORS_INDEX, BIN_INDEX, "pytorch_model.bin")
    return (folder / "adapter_config.json").is_file() and not any((folder / f).is_file() for f in full)


def _open_folder(folder: Path, given: Path, index: Path | None = None) -> Checkpoint:
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else None
    if index is None:
        for cand in (SAFETENSORS_INDEX, BIN_INDEX):
            if (folder / cand).is_file():
                index = folder / cand
                break
        else:
            if (folder / "model.safetensors").is_file():
                return _from_safetensors(given, "folder", folder, config, _single_map(folder / "model.safetensors"))
    if index is not None:
        st_map = _read_index(index)
        if all(p.name.endswith(".safetensors") for p in st_map.values()):
            return _from_safetensors(given, "sharded", folder, config, st_map)
        if all(p.name.endswith(TORCH_SUFFIXES) for p in st_map.values()):
            return _from_torch(given, folder, config, sorted(set(st_map.values())))
        raise OtfuseError(f"{index}: shards must all be .safetensors or all PyTorch files")
    # No standard name: accept exactly one weight file of a kind, safetensors preferred.
    sts = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(sts) == 1:
        return _from_safetensors(given, "folder", folder, config, _single_map(sts[0]))
    if len(sts) > 1:
        raise OtfuseError(f"{folder} holds several .safetensors files but no {SAFETENSORS_INDEX}")
    if (folder / "pytorch_model.bin").is_file():
        return _from_torch(given, folder, config, [folder / "pytorch_model.bin"])
    bins = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(TORCH_SUFFIXES))
    if len(bins) == 1:
        return _from_torch(given, folder, config, bins)
    if len(bins) > 1:
        raise OtfuseError(f"{folder} holds several PyTorch weight files and no index; pass one file")
    models = sorted(p.name for p in folder.iterdir() if p.is_dir() and any(
        (p / f).is_file() for f in ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin")))
    if models:  # e.g. fuse's output for parents that kept their own task heads: one model per parent
        shown = ", ".join(f"{folder / m}" for m in models[:4]) + (" ..." if len(models) > 4 else "")
        raise OtfuseError(f"{folder} holds {len(models)} models, not one; give them one by one: {shown}")
    raise OtfuseError(f"no weights found in {folder} (expected model.safetensors, a sharded index or pytorch_model.bin)")
