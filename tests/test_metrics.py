"""Metric functions against sklearn / torch / sacrebleu / hand computation, and LM perplexity end to end."""

import math
import os

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from otfuse_cli.evaluation import metrics as M

os.environ["HF_HUB_OFFLINE"] = "1"


def test_accuracy_f1_match_sklearn():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=200)
    labels = rng.integers(0, 5, size=200)
    pred = probs.argmax(1)
    assert M.accuracy(probs, labels) == pytest.approx(accuracy_score(labels, pred))
    assert M.f1(probs, labels, "weighted") == pytest.approx(f1_score(labels, pred, average="weighted"))
    assert M.f1(probs, labels, "macro") == pytest.approx(f1_score(labels, pred, average="macro"))


def test_ece_hand_computed():
    # 15 bins of width 1/15; bin b holds confidences in (b/15, (b+1)/15].
    #   #1 conf .90 correct -> bin 13 (13.5)     #5 conf .88 wrong -> bin 13 (13.2)
    #   #2 conf .85 wrong   -> bin 12 (12.75)    #3 conf .50 correct -> bin 7 (7.5)
    #   #4 conf .45 wrong   -> bin 6 (6.75)
    # bin 13: acc 1/2, conf .89 -> 2/5 * .39 = .156;  bin 12: 1/5 * |0 - .85| = .17
    # bin 7:  1/5 * |1 - .5| = .10;                   bin 6:  1/5 * |0 - .45| = .09
    # ECE = .156 + .17 + .10 + .09 = .516
    probs = np.array([[0.90, 0.05, 0.05], [0.85, 0.10, 0.05], [0.50, 0.30, 0.20],
                      [0.45, 0.30, 0.25], [0.88, 0.06, 0.06]])
    labels = np.array([0, 1, 0, 2, 1])
    assert M.expected_calibration_error(probs, labels) == pytest.approx(0.516)
    # Confident and always right: perfectly calibrated (confidence 1.0 falls in the top bin).
    assert M.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_nll_matches_torch_cross_entropy():
    logits = torch.randn(50, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(logits, -1).numpy()
    assert M.nll(probs, labels.numpy()) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-10)


def test_bleu_chrf_match_sacrebleu():
    import sacrebleu
    hyps = ["the cat sat on the mat", "a quick brown fox", "hello world again"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello world"]
    b, sig = M.bleu(hyps, refs)
    assert b == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert sig.startswith("nrefs:1") and "tok:13a" in sig
    c, csig = M.chrf(hyps, refs)
    assert c == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert M.bleu(refs, refs)[0] == pytest.approx(100.0)


def tiny_tokenizer(words, specials):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(list(specials.values()) + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path_factory.mktemp("gpt2")
    tok = tiny_tokenizer([f"w{i}" for i in range(98)], {"unk_token": "[UNK]", "eos_token": "[EOS]"})
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                       bos_token_id=1, eos_token_id=1)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_perplexity_matches_hf_loss(gpt2_folder, tmp_path):
    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.evaluation import evaluate_models
    from otfuse_cli.runnable import load_runnable
    folder, model, tok = gpt2_folder
    texts = ["w1 w5 w9 w2 w7", "w3 w3 w40", "w10 w11 w12 w13 w14 w15 w16 w17"]
    runnable = load_runnable(open_checkpoint(folder))
    assert runnable.kind == "hf" and runnable.task_heads == {"lm"}
    (tmp_path / "one.txt").write_text(texts[0])
    doc = evaluate_models([("gpt2", runnable)], tmp_path / "one.txt")
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    with torch.no_grad():
        direct = math.exp(float(model(ids, labels=ids).loss))
    assert doc["task"] == "lm" and doc["rows"][0]["tokens"] == 4
    assert doc["rows"][0]["perplexity"] == pytest.approx(direct, rel=1e-5)
    # Several texts, padded in one batch: token-weighted mean NLL, padding excluded.
    (tmp_path / "many.txt").write_text("\n".join(texts))
    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            n = ids.shape[1] - 1
            total += float(model(ids, labels=ids).loss) * n
            count += n
    for bs in (1, 3):
        row = evaluate_models([("gpt2", runnable)], tmp_path / "many.txt", batch_size=bs)["rows"][0]
        assert row["tokens"] == count
        assert row["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_lm_ensemble_and_tied_rebuild(gpt2_folder, tmp_path):
    from safetensors import safe_open

    from otfuse_cli.checkpoint import open_checkpoint
    from otfuse_cli.evaluation import evaluate_models
    from otfuse_cli.runnable import load_runnable, runnable_from_state_dict
    folder, model, tok = gpt2_folder
    ckpt = open_checkpoint(folder)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: saved once, as the embedding
    a = load_runnable(ckpt)
    sd = ckpt.state_dict()
    b = runnable_from_state_dict({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                                  for k, v in sd.items()}, ckpt)
    assert b.module.lm_head.weight is b.module.transformer.wte.weight
    texts = ["w1 w5 w9 w2 w7", "w3 w3 w40 w8"]
    (tmp_path / "t.txt").write_text("\n".join(texts))
    doc = evaluate_models([("a", a), ("b", b)], tmp_path / "t.txt", ensemble=True)
    lp = 0.0
    n = 0
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t)["input_ids"]])
            probs = [torch.softmax(m.module(ids).logits[0, :-1].double(), -1) for m in (a, b)]
            p = ((probs[0] + probs[1]) / 2).gather(-1, ids[0, 1:, None])
            lp += float(p.log().sum())
            n += ids.shape[1] - 1
    assert [r["model"] for r in doc["rows"]] == ["a", "b", "ensemble"]
    assert doc["rows"][2]["perplexity"] == pytest.approx(math.exp(-lp / n), rel=1e-6)
    mem = runnable_from_state_dict(sd, ckpt)
    ids = torch.tensor([tok(texts[0])["input_ids"]])
    assert torch.equal(mem.predict_logits({"input_ids": ids}), a.predict_logits({"input_ids": ids}))
