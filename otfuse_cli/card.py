"""The model card (README.md) of a folder output: which parents, by which method and options, made by which
otfuse. Built from the provenance record, so the card and otfuse.json cannot disagree; the anchor's own card
is kept only as a quoted section, so the output never passes for the model it was made from."""

from __future__ import annotations

import json

from otfuse_cli.checkpoint.reader import WEIGHT_SUFFIXES

CARD_FILE = "README.md"


def card_title(ckpt) -> str | None:
    """The first Markdown heading of a folder checkpoint's own README.md (after any YAML front matter)."""
    text = _own_card(ckpt)
    if text is None:
        return None
    for line in _body(text).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip() or None
    return None


def _own_card(ckpt) -> str | None:
    if ckpt.folder is None or not (ckpt.folder / CARD_FILE).is_file():
        return None
    from otfuse_cli import inputs

    return inputs.read_small(ckpt.folder / CARD_FILE, "model card", inputs.TEXT_MAX_BYTES).decode("utf-8",
                                                                                               errors="replace")


def _body(text: str) -> str:
    """The card without its YAML front matter (metadata for the Hub, not prose)."""
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4:].lstrip("\n")
    return text


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def model_card(record: dict, parents: list, anchor: int = 0) -> str:
    """README.md for an output: record is the provenance written beside it (checkpoint.provenance), parents
    the opened inputs in the record's order, anchor the one whose basis, config and files the output took."""
    command, inputs = record["command"], record["inputs"]
    lines = ["---", "library_name: transformers", "tags:", "- otfuse", f"- {command}", "---", "",
             f"# {'Fusion' if command == 'fuse' else 'Compression'} of {_parent_words(inputs)} by otfuse", "",
             f"Made by `otfuse {command}` (otfuse {record['otfuse_version']}). Every input file's SHA-256 and the "
             "full options are in `otfuse.json`.", "", "## Parents", ""]
    for k, (entry, ckpt) in enumerate(zip(inputs, parents)):
        title = card_title(ckpt)
        role = " (anchor: basis, config and tokenizer)" if k == anchor and len(inputs) > 1 else ""
        hub = f" (Hugging Face, commit `{entry['revision']}`)" if "revision" in entry else ""  # a model id
        lines.append(f"{k}. `{entry['path']}`{hub}{role}" + (f", card: \"{title}\"" if title else ""))
        for name, digest in sorted(entry["files"].items()):
            if name.endswith(WEIGHT_SUFFIXES):
                lines.append(f"   - `{name}` sha256 `{digest}`")
    lines += ["", "## Method and options", ""]
    lines += [f"- {key}: `{_value(v)}`" for key, v in sorted(record.get("options", {}).items())
              if v is not None and key not in ("models", "model")]
    own = _own_card(parents[anchor])
    if own is not None and own.strip():
        lines += ["", f"## The anchor's original card (`{inputs[anchor]['path']}`)", "",
                  "It describes the anchor, not this model; kept for reference.", ""]
        lines += [f"> {line}".rstrip() for line in own.rstrip().splitlines()]
    return "\n".join(lines) + "\n"


def _parent_words(inputs: list[dict]) -> str:
    return f"`{inputs[0]['path']}`" if len(inputs) == 1 else f"{len(inputs)} models"


def card_for(layout: str, record: dict, parents: list, anchor: int = 0) -> str | None:
    """The card of an output, or None: only Hugging Face folder outputs (the anchor has a config.json) get
    one, as the Hub and from_pretrained users expect; files and bare-state-dict folders stay weights only."""
    if layout != "folder" or parents[anchor].config is None:
        return None
    return model_card(record, parents, anchor)
