"""Runnable rebuilds of bare state dicts, evaluate documents, ensembles, HF tasks, interpolation, tables."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from otfuse_cli.checkpoint import open_checkpoint
from otfuse_cli.errors import OtfuseError
from otfuse_cli.evaluation import evaluate_models, interpolate, plot_curve, render_table
from otfuse_cli.runnable import load_runnable, runnable_from_state_dict

os.environ["HF_HUB_OFFLINE"] = "1"
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
DOC_KEYS = ["task", "data", "metrics", "higher_is_better", "rows", "best", "notes"]


def save(module, path, **meta):
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta or None)
    return open_checkpoint(path)


def trained_bn(module, shape):
    """Non-trivial BatchNorm running statistics, then eval mode."""
    module.train()
    with torch.no_grad():
        module(torch.randn(32, *shape))
    return module.eval()


def mlp(seed, act=nn.ReLU, dims=(20, 16, 16, 4)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1]), act()]
    return nn.Sequential(*layers[:-1]).eval()


def digits_cnn(seed):  # the fixtures' CNN
    torch.manual_seed(seed)
    return trained_bn(nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), (1, 28, 28))


# --- a torchvision-style reference ResNet (same names), written independently of runnable.py
class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottle(nn.Module):
    def __init__(self, cin, cout, stride, mid=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefResNet(nn.Module):
    def __init__(self, block, widths, imagenet=False, classes=10):
        super().__init__()
        k = 7 if imagenet else 3
        self.imagenet = imagenet
        self.conv1 = nn.Conv2d(3, 8, k, 2 if imagenet else 1, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        cin = 8
        for i, w in enumerate(widths, 1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(block(cin, w, stride), block(w, w, 1)))
            cin = w
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.imagenet:
            x = nn.functional.max_pool2d(x, 3, 2, 1)
        for i in range(1, 4):
            if hasattr(self, f"layer{i}"):
                x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# ------------------------------------------------------------------------ runnable rebuilds

@pytest.mark.parametrize("act,meta,flag", [(nn.ReLU, {}, None), (nn.GELU, {"otfuse.activation": "gelu"}, None),
                                           (nn.Tanh, {}, "tanh")])
def test_mlp_rebuild_exact(tmp_path, act, meta, flag):
    ref = mlp(0, act)
    r = load_runnable(save(ref, tmp_path / "m.safetensors", **meta), activation=flag)
    assert r.kind == "mlp" and r.num_labels == 4 and r.task_heads == {"classification"}
    x = torch.randn(9, 20)
    assert torch.equal(r.predict_logits(x), ref(x))
    assert torch.equal(r.predict_logits(x.view(9, 4, 5)), ref(x))  # any input shape is flattened


def test_cnn_rebuild_exact(tmp_path):
    ref = digits_cnn(0)
    ckpt = save(ref, tmp_path / "c.safetensors", **{"otfuse.arch": "cnn", "otfuse.input_shape": "1,28,28"})
    r = load_runnable(ckpt)
    assert r.kind == "cnn" and r.num_labels == 10
    x = torch.randn(6, 1, 28, 28)
    assert torch.equal(r.predict_logits(x), ref(x))
    assert torch.equal(r.predict_logits(x.flatten(1)), ref(x))  # unflattened through the metadata shape
    assert set(r.module.state_dict()) == set(ckpt.keys())


@pytest.mark.parametrize("block,imagenet", [(Basic, False), (Bottle, False), (Basic, True)])
def test_resnet_rebuild_exact(tmp_path, block, imagenet):
    torch.manual_seed(0)
    ref = trained_bn(RefResNet(block, (8, 16, 16), imagenet=imagenet), (3, 16, 16))
    r = load_runnable(save(ref, tmp_path / "r.safetensors"))
    assert r.kind == "resnet" and r.num_labels == 10
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(r.predict_logits(x), ref(x))


def test_runnable_errors(tmp_path):
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(OtfuseError, match="no module prefix"):
        load_runnable(open_checkpoint(tmp_path / "a.safetensors"))
    with pytest.raises(OtfuseError, match="unknown activation 'swish'"):
        load_runnable(save(mlp(0), tmp_path / "m.safetensors"), activation="swish")
    save_file({"0.weight": torch.zeros(2, 3, 4)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(OtfuseError, match="layer '0' .* is neither Linear"):
        load_runnable(open_checkpoint(tmp_path / "b.safetensors"))
    ckpt = save(mlp(0), tmp_path / "m2.safetensors")
    sd = ckpt.state_dict()
    r = runnable_from_state_dict(sd, ckpt)
    with pytest.raises(OtfuseError, match="weights do not fit the model: size mismatch for 0.weight"):
        r.load_weights({**sd, "0.weight": torch.zeros(3, 3)})
    with pytest.raises(OtfuseError, match="missing tensors for this model: 4.bias"):
        r.load_weights({k: v for k, v in sd.items() if k != "4.bias"})
    with pytest.raises(OtfuseError, match="unexpected tensors for this model: 9.weight"):
        r.load_weights({**sd, "9.weight": torch.zeros(1)})


# ------------------------------------------------------------------------ classification on tensors

@pytest.fixture()
def mlp_pair(tmp_path):
    a, b = mlp(0), mlp(1)
    ca, cb = save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 20, generator=g)
    y = ((a(x) + b(x)).argmax(1) + (torch.rand(70, generator=g) < 0.3).long()) % 4  # mostly right, some noise
    np.savez(tmp_path / "data.npz", x=x.detach().numpy(), y=y.numpy())
    return (a, ca), (b, cb), x, y, tmp_path / "data.npz"


def test_evaluate_tensor_classification_and_ensemble(mlp_pair):
    (a, ca), (b, cb), x, y, data = mlp_pair
    doc = evaluate_models([("A", load_runnable(ca)), ("B", load_runnable(cb))], data, batch_size=16, ensemble=True)
    assert list(doc) == DOC_KEYS and doc["task"] == "classification"
    assert doc["data"] == {"path": str(data), "samples": 70}
    assert doc["metrics"] == ["accuracy", "f1_weighted", "f1_macro", "ece", "nll"]
    assert doc["higher_is_better"] == {"accuracy": True, "f1_weighted": True, "f1_macro": True, "ece": False, "nll": False}
    assert [r["model"] for r in doc["rows"]] == ["A", "B", "ensemble"]
    assert list(doc["rows"][0]) == ["model", *doc["metrics"]]
    with torch.no_grad():
        pa, pb = torch.softmax(a(x).double(), 1), torch.softmax(b(x).double(), 1)
    for row, p in zip(doc["rows"], (pa, pb, (pa + pb) / 2)):
        assert row["accuracy"] == pytest.approx(float((p.argmax(1) == y).double().mean()))
        assert row["nll"] == pytest.approx(float(nn.functional.nll_loss(p.log(), y)), rel=1e-9)
    accs = {r["model"]: r["accuracy"] for r in doc["rows"]}
    assert accs[doc["best"]["accuracy"]] == max(accs.values())
    json.loads(json.dumps(doc))  # JSON-able
    text = _render(doc)
    assert "ensemble" in text and "%" in text


def _render(doc):
    from rich.console import Console
    console = Console(record=True, width=160)
    console.print(render_table(doc))
    return console.export_text()


def test_classification_errors(mlp_pair, tmp_path):
    (a, ca), (b, cb), x, y, data = mlp_pair
    ra = load_runnable(ca)
    np.savez(tmp_path / "bad.npz", x=x.numpy(), y=np.full(70, 7))
    with pytest.raises(OtfuseError, match=r"label 7 is not in the label set of model 'A', \{0..3\}"):
        evaluate_models([("A", ra)], tmp_path / "bad.npz")
    np.savez(tmp_path / "nolabel.npz", x=x.numpy())
    with pytest.raises(OtfuseError, match="no usable field"):
        evaluate_models([("A", ra)], tmp_path / "nolabel.npz")
    r3 = load_runnable(save(mlp(2, dims=(20, 16, 3)), tmp_path / "c.safetensors"))
    with pytest.raises(OtfuseError, match="different label counts: A=4, C=3"):
        evaluate_models([("A", ra), ("C", r3)], data)
    with pytest.raises(OtfuseError, match="named 'A'"):
        evaluate_models([("A", ra), ("A", ra)], data)
    with pytest.raises(OtfuseError, match="at least two models"):
        evaluate_models([("A", ra)], data, ensemble=True)
    with pytest.raises(OtfuseError, match="unknown task"):
        evaluate_models([("A", ra)], data, task="regression")
    (tmp_path / "t.jsonl").write_text('{"text": "hi", "label": 0}\n')
    with pytest.raises(OtfuseError, match="bare mlp state dict: it takes tensor data"):
        evaluate_models([("A", ra)], tmp_path / "t.jsonl")
    np.savez(tmp_path / "wide.npz", x=np.ones((3, 33), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(OtfuseError, match="cannot run on this data"):
        evaluate_models([("A", ra)], tmp_path / "wide.npz")


def test_interpolation_curve_and_plot(mlp_pair, tmp_path):
    (a, ca), (b, cb), x, y, data = mlp_pair
    res = interpolate(ca.state_dict(), cb.state_dict(), ca, data, steps=5)
    assert [r["alpha"] for r in res["rows"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    ends = evaluate_models([("A", load_runnable(ca)), ("B", load_runnable(cb))], data)["rows"]
    for row, end in zip((res["rows"][0], res["rows"][-1]), ends):
        assert {m: row[m] for m in res["metrics"]} == pytest.approx({m: end[m] for m in res["metrics"]})
    with torch.no_grad():  # the midpoint is the model with averaged weights
        mid = mlp(0)
        mid.load_state_dict({k: (v + b.state_dict()[k]) / 2 for k, v in a.state_dict().items()})
        acc = float((mid(x).argmax(1) == y).double().mean())
    assert res["rows"][2]["accuracy"] == pytest.approx(acc)
    assert res["barrier"]["accuracy"] >= 0 and set(res["best"]) == set(res["metrics"])
    assert "barrier" in _render(res)
    png = plot_curve([res, {**res, "name": "aligned"}], tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".curve")]  # no temp file left
    with pytest.raises(OtfuseError, match="different tensors"):
        interpolate(ca.state_dict(), {"x.weight": torch.zeros(1)}, ca, data)


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    doc = {"metrics": ["accuracy"], "rows": [{"alpha": 0.0, "accuracy": 1.0}]}
    with pytest.raises(OtfuseError, match=r"pip install 'otfuse-cli\[plot\]'"):
        plot_curve(doc, tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


# ------------------------------------------------------------------------ HF models

def tiny_tokenizer(words, specials, template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(list(specials.values()) + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        single, pair = template
        toks = {t for t in (single + " " + pair).split() if not t.startswith("$")}
        tk.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                          special_tokens=[(t, vocab[t.split(":")[0]]) for t in toks])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"}
WORDS = "good bad great awful fine movie film plot was is the a very not".split()


def bert_folder(path, cls_name, seed=0, **extra):
    import transformers
    from transformers import BertConfig
    tok = tiny_tokenizer(WORDS, BERT_SPECIALS, ("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1"))
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, pad_token_id=0, **extra)
    model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    model, tok = bert_folder(root / "cls", "BertForSequenceClassification",
                             id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    rng = np.random.default_rng(0)
    recs = [{"text": " ".join(rng.choice(WORDS, size=rng.integers(2, 8))), "label": ["negative", "positive"][i % 2]}
            for i in range(24)]
    data = root / "test.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in recs))
    return root, model, tok, recs, data


def test_bert_classification_with_label_names(sentiment):
    root, model, tok, recs, data = sentiment
    r = load_runnable(open_checkpoint(root / "cls"))
    assert r.kind == "hf" and r.task_heads == {"classification"} and r.label2id == {"negative": 0, "positive": 1}
    doc = evaluate_models([("bert", r)], data, batch_size=5)
    with torch.no_grad():
        enc = tok([x["text"] for x in recs], padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(1)
    gold = torch.tensor([0 if x["label"] == "negative" else 1 for x in recs])
    assert doc["task"] == "classification" and doc["notes"]["labels"] == ["negative", "positive"]
    assert doc["rows"][0]["accuracy"] == pytest.approx(float((pred == gold).double().mean()))
    # In-memory rebuild (from_config + state dict) computes the same function.
    ck = open_checkpoint(root / "cls")
    mem = runnable_from_state_dict(ck.state_dict(), ck)
    assert evaluate_models([("mem", mem)], data)["rows"][0]["accuracy"] == doc["rows"][0]["accuracy"]


def test_bert_errors(sentiment, tmp_path):
    root, model, tok, recs, data = sentiment
    r = load_runnable(open_checkpoint(root / "cls"))
    (tmp_path / "neutral.jsonl").write_text('{"text": "good film", "label": "neutral"}\n')
    with pytest.raises(OtfuseError, match=r"label 'neutral' is not in the label set of model 'bert', \{negative, positive\}"):
        evaluate_models([("bert", r)], tmp_path / "neutral.jsonl")
    bert_folder(tmp_path / "base", "BertModel")
    base = load_runnable(open_checkpoint(tmp_path / "base"))
    with pytest.raises(OtfuseError, match=r"model 'base' \(BertModel, heads: none\) has no head for classification"):
        evaluate_models([("base", base)], data)
    (tmp_path / "odd.jsonl").write_text('{"id": 1, "score": 2}\n')
    with pytest.raises(OtfuseError, match="no usable field.*fields present: id, score"):
        evaluate_models([("bert", r)], tmp_path / "odd.jsonl")


def test_mlm_deterministic(tmp_path):
    bert_folder(tmp_path / "mlm", "BertForMaskedLM")
    r = load_runnable(open_checkpoint(tmp_path / "mlm"))
    assert r.task_heads == {"mlm"}
    (tmp_path / "t.txt").write_text("the movie was very good\nthe plot is not great\na film\n")
    docs = [evaluate_models([("m", r)], tmp_path / "t.txt", batch_size=bs, seed=3) for bs in (1, 2, 3)]
    assert docs[0]["task"] == "mlm" and docs[0]["metrics"] == ["mlm_accuracy", "pseudo_perplexity", "tokens"]
    for d in docs[1:]:  # masks do not depend on batching (padding changes logits only by rounding)
        assert d["rows"][0]["tokens"] == docs[0]["rows"][0]["tokens"]
        for k in ("mlm_accuracy", "pseudo_perplexity"):
            assert d["rows"][0][k] == pytest.approx(docs[0]["rows"][0][k], rel=1e-6)
    assert docs[0]["rows"][0]["tokens"] >= 3 and 0 <= docs[0]["rows"][0]["mlm_accuracy"] <= 1


def tiny_bart(folder, seed=0):
    """A random 16-wide BART and its tokenizer, saved to `folder`: (model, tokenizer)."""
    from transformers import BartConfig, BartForConditionalGeneration
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    tok = tiny_tokenizer(WORDS, specials, ("$A </s>", "$A </s> $B </s>"))
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                     bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                     init_std=0.5)  # wide enough that greedy decoding says words, not only </s>
    model = BartForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_translation_bleu(tmp_path):
    import sacrebleu
    model, tok = tiny_bart(tmp_path / "mt")
    recs = [{"source": "the film was good", "target": "a good film"}, {"source": "bad plot", "target": "not good"}]
    (tmp_path / "mt.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    r = load_runnable(open_checkpoint(tmp_path / "mt"))
    assert r.task_heads == {"translation"}
    doc = evaluate_models([("mt", r)], tmp_path / "mt.jsonl", max_length=8)
    with torch.no_grad():
        enc = tok([x["source"] for x in recs], padding=True, return_tensors="pt")
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], num_beams=1,
                             do_sample=False, max_new_tokens=8)
    hyps = [h.strip() for h in tok.batch_decode(out, skip_special_tokens=True)]
    refs = [x["target"] for x in recs]
    assert doc["task"] == "translation" and doc["metrics"] == ["bleu", "chrf"]
    assert doc["rows"][0]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert doc["rows"][0]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert doc["rows"][0]["signatures"]["bleu"].startswith("nrefs:1")
    assert doc["rows"][0]["signatures"]["chrf"].startswith("nrefs:1")
    beam = evaluate_models([("mt", r)], tmp_path / "mt.jsonl", max_length=8, num_beams=2)
    assert beam["notes"]["num_beams"] == 2


def _greedy_mean_probabilities(models, tok, source: str, steps: int) -> str:
    """Oracle for the ensemble: one sentence, the whole prefix re-run every step, the mean of the models'
    softmaxes, argmax; the last step is forced to </s> (the models' forced_eos_token_id)."""
    ids = tok(source, return_tensors="pt")["input_ids"]
    out = [2]  # decoder_start_token_id
    with torch.no_grad():
        for step in range(steps):
            probs = sum(torch.softmax(m(input_ids=ids, decoder_input_ids=torch.tensor([out])).logits[0, -1], -1)
                        for m in models) / len(models)
            out.append(2 if step == steps - 1 else int(probs.argmax()))
            if out[-1] == 2:
                break
    return tok.decode(out, skip_special_tokens=True).strip()


def test_translation_ensemble_decodes_with_the_mean_of_the_next_token_probabilities(tmp_path):
    from otfuse_cli.evaluation.generation import translate
    a, tok = tiny_bart(tmp_path / "a", seed=0)
    b, _ = tiny_bart(tmp_path / "b", seed=1)
    sources = ["the film was good", "bad plot", "a very good movie was not bad", "plot"]
    ra, rb = (load_runnable(open_checkpoint(tmp_path / n)) for n in ("a", "b"))
    got = translate([ra, rb], sources, batch_size=3, max_length=8)
    assert got == [_greedy_mean_probabilities([a, b], tok, s, 8) for s in sources]
    assert got != translate([ra], sources, max_length=8)  # the second member changed something
    for beams in (1, 3):  # a model ensembled with itself is the model, in greedy and in beam search
        assert translate([ra, ra], sources, max_length=8, num_beams=beams) == \
            translate([ra], sources, max_length=8, num_beams=beams)


def test_translation_ensemble_cache_gives_the_whole_prefix_distributions_in_beam_search(tmp_path, monkeypatch):
    """The other members decode from caches reordered as beam search reorders its hypotheses. Oracle: at every
    step of a real beam search, the mean of the lead's distribution and the second model's own forward over
    each row's whole prefix (no cache) with its sentence's source."""
    from otfuse_cli.evaluation import generation
    a, tok = tiny_bart(tmp_path / "a", seed=0)
    b, _ = tiny_bart(tmp_path / "b", seed=1)
    sources = ["the film was good", "bad plot", "a very good movie was not bad"]
    ra, rb = (load_runnable(open_checkpoint(tmp_path / n)) for n in ("a", "b"))
    enc = tok(sources, padding=True, return_tensors="pt")
    call, steps = generation.MeanProbabilities.__call__, []

    def checked(self, input_ids, scores):
        mixed = call(self, input_ids, scores)
        with torch.no_grad():
            theirs = b(input_ids=enc["input_ids"].repeat_interleave(3, 0),
                       attention_mask=enc["attention_mask"].repeat_interleave(3, 0),
                       decoder_input_ids=input_ids).logits[:, -1]
        probs = (torch.softmax(scores.double(), -1) + torch.softmax(theirs.double(), -1)) / 2
        live = scores > float("-inf")
        assert torch.allclose(mixed.double()[live], probs.log()[live], atol=1e-5)
        steps.append(input_ids.shape[1])
        return mixed

    monkeypatch.setattr(generation.MeanProbabilities, "__call__", checked)
    generation.translate([ra, rb], sources, batch_size=3, max_length=8, num_beams=3)
    assert len(steps) >= 3 and steps == list(range(1, len(steps) + 1))  # one call per step, prefixes grow by one


def test_translation_columns_ensemble_row_and_progress(tmp_path):
    tiny_bart(tmp_path / "a", seed=0)
    tiny_bart(tmp_path / "b", seed=1)
    (tmp_path / "mt.tsv").write_text("en\tde\nthe film was good\ta good film\nbad plot\tnot good\nplot\tfilm\n")
    ra, rb = (load_runnable(open_checkpoint(tmp_path / n)) for n in ("a", "b"))

    class Bar:
        advanced = 0
        total = None

        def task(self, name, total=None):
            Bar.total = total
            return self

        def advance(self, **_):
            Bar.advanced += 1

    doc = evaluate_models([("a", ra), ("b", rb)], tmp_path / "mt.tsv", max_length=8, batch_size=2, ensemble=True,
                          columns={"source": "en", "target": "de"}, progress=Bar())
    assert [r["model"] for r in doc["rows"]] == ["a", "b", "ensemble"]
    assert all(r["signatures"]["bleu"].startswith("nrefs:1") for r in doc["rows"])
    assert Bar.total == Bar.advanced == 3 * 2  # three generations (a, b, ensemble) of two batches each
    with pytest.raises(OtfuseError, match="missing.*'fr'|'fr'"):
        evaluate_models([("a", ra)], tmp_path / "mt.tsv", columns={"source": "en", "target": "fr"})


# ------------------------------------------------------------------------ generated fixtures (when present)

@pytest.mark.skipif(not (FIXTURES / "digits" / "test.safetensors").is_file(), reason="fixtures not generated")
def test_fixture_digits():
    models = [(n, load_runnable(open_checkpoint(FIXTURES / "digits" / f"{n}.safetensors"))) for n in ("mlp_a", "cnn_a")]
    doc = evaluate_models(models, FIXTURES / "digits" / "test.safetensors", max_samples=300)
    assert all(r["accuracy"] > 0.5 for r in doc["rows"])


@pytest.mark.skipif(not (FIXTURES / "sentiment" / "bert_a").is_dir(), reason="fixtures not generated")
def test_fixture_sentiment():
    r = load_runnable(open_checkpoint(FIXTURES / "sentiment" / "bert_a"))
    doc = evaluate_models([("bert_a", r)], FIXTURES / "sentiment" / "test.jsonl", max_samples=64)
    assert doc["task"] == "classification" and doc["rows"][0]["accuracy"] > 0.5
