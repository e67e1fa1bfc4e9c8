"""Exact recovery on a *trained* translation model: the Multi30k EN→DE fixture (fixtures/translation, made by
fixtures/make_translation_fixture.py) fused with a hidden permutation of itself plus 1% noise must compute the
plain average of the two, logit for logit, and translate the whole test set exactly as the plain average does.

The permutation comes from tests/oracle_permute.py (written from BART's forward code, sharing nothing with
otfuse); the translations come from transformers' own generate."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from oracle_permute import permute_transformer
from test_oracle import loaded, make_noise, plus, rel_err
from otfuse_cli import AlignOptions, fuse

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "translation" / "multi30k_en_de"
DATA = ROOT.parent / "shared" / "data" / "multi30k"

pytestmark = pytest.mark.skipif(not (FIXTURE / "model.safetensors").is_file() or not DATA.is_dir(),
                                reason="translation fixture or Multi30k data missing")


def read(split: str, lang: str) -> list[str]:
    with gzip.open(DATA / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return f.read().split("\n")[:-1]


def save_like_fixture(model, sd: dict, folder: Path) -> Path:
    loaded(model, sd).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(FIXTURE / name, folder / name)
    return folder


def greedy(model, tok, sources: list[str]) -> list[str]:
    out = []
    with torch.no_grad():
        for i in range(0, len(sources), 250):
            enc = tok(sources[i:i + 250], padding=True, return_tensors="pt")
            ids = model.generate(**enc, num_beams=1, do_sample=False, max_new_tokens=64)
            out.extend(tok.batch_decode(ids, skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def recovered(tmp_path_factory):
    from transformers import AutoTokenizer, BartForConditionalGeneration

    tmp = tmp_path_factory.mktemp("mt")
    model = BartForConditionalGeneration.from_pretrained(FIXTURE).eval()
    sd = model.state_dict()
    noise = make_noise(sd, seed=1)  # 1% of each tensor's std
    hidden = permute_transformer(plus(sd, noise), model.config, torch.Generator().manual_seed(2))
    b = save_like_fixture(model, hidden, tmp / "b")
    fuse([str(FIXTURE), str(b)], str(tmp / "fused"))
    fuse([str(FIXTURE), str(b)], str(tmp / "naive"), options=AlignOptions(align="none"))
    load = lambda p: BartForConditionalGeneration.from_pretrained(p).eval()  # noqa: E731
    return {"average": loaded(model, plus(sd, noise, 0.5)), "fused": load(tmp / "fused"),
            "naive": load(tmp / "naive"), "tok": AutoTokenizer.from_pretrained(FIXTURE)}


def test_fused_logits_are_the_plain_average_on_real_test_pairs(recovered):
    tok = recovered["tok"]
    en, de = read("test_2016_flickr", "en")[:64], read("test_2016_flickr", "de")[:64]
    batch = tok(en, text_target=de, padding=True, return_tensors="pt")
    batch["labels"] = batch["labels"].masked_fill(batch["labels"] == tok.pad_token_id, -100)
    with torch.no_grad():
        ref, fused, naive = (recovered[k](**batch).logits for k in ("average", "fused", "naive"))
    assert rel_err(ref, fused) < 1e-5
    assert rel_err(ref, naive) > 1e-2  # the hidden permutation is real: averaging without alignment breaks


def test_fused_model_translates_the_test_set_as_the_plain_average(recovered):
    sources = read("test_2016_flickr", "en")
    tok = recovered["tok"]
    ref = greedy(recovered["average"], tok, sources)
    assert greedy(recovered["fused"], tok, sources) == ref
    assert sum(bool(s.strip()) for s in ref) > 0.95 * len(ref)  # a trained model: it says something
