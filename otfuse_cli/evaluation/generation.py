"""Translation by generation: one model's `generate`, or an output ensemble decoded as one model.

The ensemble (fairseq's convention) decodes with the mean of the members' next-token probabilities at every
step, in the same search (greedy or beam) a single model uses: the first member drives `generate` and a
logits processor mixes in the others' distributions for every running hypothesis. The first member's own
generation rules stay in force (a token it forbids, e.g. a forced language token or an n-gram ban, stays
forbidden); the other members run their decoders on the whole prefix each step (no cache), which costs
O(length²) — fine for sentences, slow for documents."""

from __future__ import annotations

import math
from typing import Callable

import torch
from transformers import LogitsProcessor

from otfuse_cli.data import batched, tokenize_texts
from otfuse_cli.errors import OtfuseError
from otfuse_cli.runnable import quiet_transformers


class MeanProbabilities(LogitsProcessor):
    """Next-token log-probabilities of the mean of the lead's (as generate processed them) and the other
    members' distributions. `others`: [(runnable, encoder output, source mask)] already repeated per beam."""

    def __init__(self, others: list):
        self.others = others

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        lps = [torch.log_softmax(scores.float(), -1)]  # greedy passes logits, beam search log-probabilities
        for m, encoded, mask in self.others:
            out = m.module(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=input_ids.to(m.device),
                           use_cache=False)
            lps.append(torch.log_softmax(out.logits[:, -1].float(), -1).to(scores.device))
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
                                                                    for m in members[1:]])]
                gen = lead.module.generate(**enc, num_beams=num_beams, do_sample=False, max_new_tokens=ml, **extra)
            except (RuntimeError, ValueError) as e:
                raise OtfuseError(f"model {name!r} failed to generate: {str(e).splitlines()[0]}") from None
        out.extend(t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True))
        if on_batch:
            on_batch()
    return out
