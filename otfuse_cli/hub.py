"""Hugging Face model ids wherever a model path is taken: `org/name` or `org/name@revision` (a branch, tag or
commit) opens the snapshot that huggingface_hub's cache holds for it.

- A local path that exists always wins: a folder `org/name` in the current directory is that folder.
- Only a string shaped like a Hub id (huggingface_hub's own validate_repo_id: one `/`, no `..`) that is not a
  local path is looked up, and never one that names a checkpoint file (`runs/model.safetensors`).
- The lookup is huggingface_hub's `snapshot_download`: offline (HF_HUB_OFFLINE=1, or the Hub unreachable) it
  returns what the cache holds and nothing else; online it may download, with huggingface_hub's own progress
  bar. Weights of other frameworks (TensorFlow, Flax, ONNX, ...) are never fetched, nor PyTorch pickles when the
  repository has safetensors.
- Every failure is one OtfuseError line (exit 2), said before torch is imported (the CLI resolves ids while it
  checks its model arguments). Each id is resolved once per process: every later open of it reads the same
  snapshot.
- A checkpoint opened from an id carries a ModelRef (`model_ref`), and provenance records the id and the
  snapshot's commit hash instead of the cache's machine-specific path.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from otfuse_cli.errors import OtfuseError

# Cheap pre-filter, before huggingface_hub is imported: one slash, word characters, dots and dashes, and an
# optional @revision (branches such as refs/pr/1 hold slashes).
_SHAPE = re.compile(r"(?P<repo>\w[\w.-]*/\w[\w.-]*)(?:@(?P<revision>[\w.][\w./-]*))?", re.ASCII)
# Names that say "a file" (a mistyped path), never looked up on the Hub.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz",
                  ".json", ".yaml", ".yml", ".jsonl", ".csv", ".tsv", ".txt")
# Never downloaded: other frameworks' weights and exports.
OTHER_FRAMEWORKS = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "*.mlmodel", "*.gguf", "*.npz",
                    "onnx/*", "openvino/*", "coreml/*", "tf/*", "flax/*"]
# PyTorch pickles (and their index): skipped when the repository has safetensors.
PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.bin.index.json"]


@dataclass(frozen=True)
class ModelRef:
    """A model given by Hub id: as typed, the repository, the revision asked for, the snapshot's commit."""

    given: str
    repo_id: str
    requested: str | None  # None: the default branch
    revision: str  # the commit hash of the snapshot
    path: Path  # the snapshot folder in the cache

    def record(self) -> dict:
        """Provenance of an input given by id (in place of its path in the cache)."""
        return {"path": self.given, "model_id": self.repo_id, "revision": self.revision}


_BY_GIVEN: dict[tuple[str, str], ModelRef] = {}
_BY_PATH: dict[str, ModelRef] = {}


def parse_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `text` is shaped like a Hub model id, else None (by huggingface_hub's
    own rules for repo ids)."""
    m = _SHAPE.fullmatch(text)
    if m is None or m["repo"].lower().endswith(_FILE_SUFFIXES) or ".." in (m["revision"] or ""):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    return m["repo"], m["revision"]


def _exists(path: str) -> bool:
    try:
        return os.path.lexists(path)  # a dangling link is a (broken) local path, said as such by the reader
    except (OSError, ValueError):
        return False


def resolve(path: str | os.PathLike, local_first: bool = True) -> ModelRef | None:
    """The snapshot a model id names, or None for a local path (one that exists wins when local_first) and for
    anything that is not shaped like an id. OtfuseError when the id cannot be resolved."""
    text = os.fspath(path)
    if not isinstance(text, str) or (local_first and _exists(text)):
        return None
    parsed = parse_id(text)
    if parsed is None:
        return None
    from huggingface_hub import constants

    key = (text, str(constants.HF_HUB_CACHE))
    ref = _BY_GIVEN.get(key)
    if ref is None or not ref.path.is_dir():
        ref = _download(text, *parsed)
        _BY_GIVEN[key] = ref
        _BY_PATH[str(ref.path)] = ref
    return ref


def locate(path: str | os.PathLike) -> tuple[str | os.PathLike, ModelRef | None]:
    """What to open for a model argument, and its ModelRef when it is (the snapshot of) a model id."""
    ref = resolve(path)
    if ref is not None:
        return ref.path, ref
    return path, _BY_PATH.get(os.fspath(path)) if isinstance(os.fspath(path), str) else None


def local_path(path: str | os.PathLike | None):
    """The path to check and open for a model argument: itself, or the cached snapshot of a model id."""
    return path if path is None else locate(path)[0]


def relative_model(value: str, folder: Path) -> str:
    """A model named in a file (a recipe): the path relative to `folder` when it exists there, else the cached
    snapshot of a model id (never the id turned into a path under `folder`), else that relative path (which
    the reader then reports as missing)."""
    local = folder / value
    if not _exists(str(local)):
        ref = resolve(value, local_first=False)
        if ref is not None:
            return str(ref.path)
    return str(local)


def record(ckpt) -> dict:
    """Provenance fields of an input opened from a model id (path, model_id, revision); {} otherwise."""
    ref = getattr(ckpt, "model_ref", None)
    return ref.record() if ref is not None else {}


def offline() -> bool:
    """huggingface_hub's own switch, read at import; the variable is read again here for a process that set it
    later (a notebook, a test)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES",
                                                                                                 "TRUE"}


def _ignore(repo_id: str, revision: str | None) -> list[str]:
    """Patterns snapshot_download skips: other frameworks always, PyTorch pickles when safetensors exist (asked
    of the Hub online; offline the cache's completeness is checked without them)."""
    if offline():
        return OTHER_FRAMEWORKS + PICKLES
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(repo_id, revision=revision)
    except Exception:  # unreachable, not found, gated: snapshot_download says so, or falls back to the cache
        return OTHER_FRAMEWORKS + PICKLES
    names = [s.rfilename for s in info.siblings or []]
    return OTHER_FRAMEWORKS + (PICKLES if any(n.endswith(".safetensors") for n in names) else [])


@contextmanager
def _bars_as_verbosity():
    """huggingface_hub's download bars follow otfuse's --quiet (they are its own tqdm bars, not otfuse's)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from otfuse_cli.report import Verbosity

    silence = Verbosity.quiet and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()


def _download(given: str, repo_id: str, revision: str | None) -> ModelRef:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    where = f"{repo_id} at revision {revision}" if revision else repo_id
    cache = constants.HF_HUB_CACHE
    is_offline = offline()
    not_local = f"{given} is not a local path"
    try:
        with _bars_as_verbosity():
            folder = snapshot_download(repo_id, revision=revision, local_files_only=is_offline,
                                       ignore_patterns=_ignore(repo_id, revision))
    except hub_errors.IncompleteSnapshotError as e:
        raise OtfuseError(f"{not_local}, and the Hugging Face cache holds an incomplete snapshot of {where}: "
                          f"{_first_line(e)}") from None
    except hub_errors.LocalEntryNotFoundError as e:
        if is_offline:
            raise OtfuseError(f"{not_local} and is not in the Hugging Face cache (HF_HUB_OFFLINE=1): no snapshot "
                              f"of {where} in {cache}; download it once online (without HF_HUB_OFFLINE)") from None
        cause = e.__cause__ or e
        raise OtfuseError(f"{not_local}, not in the Hugging Face cache ({cache}), and the Hub cannot be reached: "
                          f"{_first_line(cause)}") from None
    except hub_errors.RevisionNotFoundError:
        raise OtfuseError(f"{not_local}, and the Hugging Face Hub has no revision {revision!r} of {repo_id}") \
            from None
    except hub_errors.GatedRepoError:
        raise OtfuseError(f"{not_local}, and {repo_id} is a gated repository on the Hugging Face Hub: accept its "
                          "terms on its page and log in (`hf auth login`)") from None
    except hub_errors.RepositoryNotFoundError:
        raise OtfuseError(f"{not_local}, nor a model on the Hugging Face Hub ({repo_id} not found; a private "
                          "one needs `hf auth login`)") from None
    except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError, ValueError) as e:
        raise OtfuseError(f"{not_local}, and {where} cannot be fetched from the Hugging Face Hub: "
                          f"{_first_line(e)}") from None
    path = Path(folder)
    # snapshot_download returns the folder snapshots/<commit hash> of the repository's cache
    return ModelRef(given, repo_id, revision, path.name, path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split("\n")[0].split())
