"""Translation by generation: one model's `generate`, or an output ensemble decoded as one model.

The ensemble (fairseq's convention) decodes with the mean of the members' next-token probabilities at every
step, in the same search (greedy or beam) a single model uses: the first member drives `generate` and a
logits processor mixes in the others' distributions for every running hypothesis. The first member's own
generation rules stay in force (a token it forbids, e.g. a forced language token or an n-gram ban, stays
forbidden). The other members decode with their own key/value caches: each step feeds them only the new token,
after reordering their caches the way the search reordered its hypotheses (beam search keeps the best beams
of a sentence and drops the rest; which row each new row continues is read off the prefixes)."""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from transformers import LogitsProcessor

from otfuse_cli.data import batched, tokenize_texts
from otfuse_cli.errors import OtfuseError
from otfuse_cli.runnable import quiet_transformers


def _cache_argument(module) -> str:
    """The forward's name for the key/value cache: `cache` from transformers 5.x, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class MeanProbabilities(LogitsProcessor):
    """Next-token log-probabilities of the mean of the lead's (as generate processed them) and the other
    members' distributions. `others`: [(runnable, encoder output, source mask)] already repeated per beam;
    `beams`: hypotheses per sentence (rows of one sentence are adjacent, as generate lays them out)."""

    def __init__(self, others: list, beams: int = 1):
        self.others, self.beams = others, beams
        self.cache_names = [_cache_argument(m.module) for m, _, _ in others]  # read once, not every step
        self.caches: list = [None] * len(others)
        self.seen: torch.Tensor | None = None  # the prefixes the caches hold

    def _parents(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """For each row, a row of the last step whose prefix it extends, within its own sentence (the same
        prefix in another sentence has another encoder output); None when the caches cannot be continued."""
        prev = self.seen
        if prev is None or prev.shape != (input_ids.shape[0], input_ids.shape[1] - 1):
            return None
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, prev):
            return torch.arange(len(prev), device=prev.device)
        rows = prev.view(-1, self.beams, prev.shape[1])
        same = (prefix.view(-1, self.beams, 1, prefix.shape[1]) == rows.unsqueeze(1)).all(-1)  # (sent, new, old)
        if not same.any(-1).all():
            return None
        first = same.float().argmax(-1)  # any matching row: equal prefixes of one sentence have equal caches
        return (first + torch.arange(rows.shape[0], device=prev.device).unsqueeze(1) * self.beams).flatten()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lps = [torch.log_softmax(scores.float(), -1)]  # greedy passes logits, beam search log-probabilities
        parents = self._parents(input_ids)
        for k, (m, encoded, mask) in enumerate(self.others):
            ids = input_ids.to(m.device)
            cache = self.caches[k] if parents is not None else None
            if cache is not None:
                cache.reorder_cache(parents.to(m.device))
                ids = ids[:, -1:]
            name = self.cache_names[k]
            out = m.module(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=ids, use_cache=True,
                           **{name: cache})
            self.caches[k] = getattr(out, name)
            lps.append(torch.log_softmax(out.logits[:, -1].float(), -1).to(scores.device))
        self.seen = input_ids.clone()
        mixed = torch.logsumexp(torch.stack(lps), 0) - math.log(len(lps))
        return mixed.masked_fill(scores == float("-inf"), float("-inf"))  # the lead's rules still hold


def _encoded(m, enc: dict, repeat: int):
    with torch.no_grad():
        out = m.module.get_encoder()(input_ids=enc["input_ids"].to(m.device),
                                     attention_mask=enc["attention_mask"].to(m.device))
    out.last_hidden_state = out.last_hidden_state.repeat_interleave(repeat, 0)
    return out, enc["attention_mask"].to(m.device).repeat_interleave(repeat, 0)


def translate(members: list, sources: list[str], *, batch_size=32, max_length=256, num_beams=1,
              name="model", on_batch: Callable[[], None] | None = None) -> list[str]:
    """Translations of `sources` by one model ([runnable]) or the mean-probability ensemble of several
    (which must share one tokenizer: checked on the sources)."""
    lead = members[0]
    tok = lead.require_tokenizer()
    ml = min(m.token_limit(max_length) for m in members)
    out: list[str] = []
    for s in batched(len(sources), batch_size):
        enc = tokenize_texts(tok, sources[s], max_length=ml)
        for other in members[1:]:
            theirs = tokenize_texts(other.require_tokenizer(), sources[s], max_length=ml)["input_ids"]
            if not torch.equal(theirs, enc["input_ids"]):
                raise OtfuseError(f"--ensemble needs identical tokenization; the members of {name!r} tokenize "
                                  "the sources differently")
        enc = {k: v.to(lead.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad(), quiet_transformers():
            try:
                extra = {}
                if len(members) > 1:
                    extra["logits_processor"] = [MeanProbabilities([(m, *_encoded(m, enc, num_beams))
                                                                    for m in members[1:]], num_beams)]
                gen = lead.module.generate(**enc, num_beams=num_beams, do_sample=False, max_new_tokens=ml, **extra)
            except (RuntimeError, ValueError) as e:
                raise OtfuseError(f"model {name!r} failed to generate: {str(e).splitlines()[0]}") from None
        out.extend(t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True))
        if on_batch:
            on_batch()
    return out
