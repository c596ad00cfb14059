"""Scoring with a cached prefix (DESIGN.md §2.2, §2.6).

The prefix (<bos>, plus the demonstrations for ICL) is run once; each query then extends its KV
cache and the cache is rolled back to the prefix. transformers' dynamic caches grow by
concatenation (never in place), so rolling back is restoring each layer's saved attributes: no
per-query copy.

Option score = mean log-softmax (full vocabulary) of the option's answer tokens; prediction =
argmax. Single-token options are all read from the query forward; a multi-token option gets one
more forward of query + its answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from icl_scale.modeling.capture import capture


class PrefixCache:
    """The KV cache of a fixed prefix, reusable by any number of queries."""

    def __init__(self, model, prefix_ids):
        self.model = model
        self.length = len(prefix_ids)
        self.cache = DynamicCache(config=model.config)
        ids = torch.tensor([list(prefix_ids)], device=model.device)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        self._saved = [dict(vars(layer)) for layer in self.cache.layers]

    def forward(self, ids: list[int], keep: int):
        """Logits [keep, V] of the last `keep` positions of prefix + `ids`; the cache is rolled back after."""
        try:
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([ids], device=self.model.device), past_key_values=self.cache,
                                 use_cache=True, logits_to_keep=keep)
            return out.logits[0].float()
        finally:
            for layer, saved in zip(self.cache.layers, self._saved):
                vars(layer).clear()
                vars(layer).update(saved)


@dataclass
class Scored:
    pred: int
    option_scores: list[float]
    attn_out: torch.Tensor | None = None   # [L, d]
    scores: torch.Tensor | None = None     # [L, H, n_query]


def score_query(model, cache: PrefixCache, query_ids: list[int], options: list[list[int]],
                record: str = "prediction", do_capture: bool = True) -> Scored:
    """Score every option after the cached prefix and, optionally, capture at the recording position.

    record="prediction": the last query token (the position that predicts the answer);
    record="answer": the first option's first answer token (the reference's choice)."""
    q = list(query_ids)
    chunk = q + [options[0][0]] if record == "answer" else q
    rec = len(chunk) - 1
    n_layers = model.config.num_hidden_layers
    keep = len(chunk) - (len(q) - 1)  # logits from the prediction position on: the LM head skips the rest
    if do_capture:
        with capture(model, rec) as cap:
            logits = cache.forward(chunk, keep)
        attn_out, scores = cap.stacked(n_layers)
    else:
        logits, attn_out, scores = cache.forward(chunk, keep), None, None
    first = torch.log_softmax(logits[0], dim=-1)
    option_scores = []
    for opt in options:
        if len(opt) == 1:
            option_scores.append(first[opt[0]].item())
            continue
        lp = torch.log_softmax(cache.forward(q + opt[:-1], len(opt)), dim=-1)
        option_scores.append(lp[torch.arange(len(opt)), torch.tensor(opt)].mean().item())
    pred = max(range(len(options)), key=lambda i: option_scores[i])
    return Scored(pred, option_scores, attn_out, scores)


def score_full(model, prefix_ids, query_ids, options, record="prediction", do_capture=True) -> Scored:
    """The same scoring with no cache reuse: every forward recomputes the whole sequence.
    Used by tests and the prefix-cache benchmark as the reference."""

    class NoReuse:
        def forward(self, ids, keep):
            full = list(prefix_ids) + list(ids)
            with torch.no_grad():
                out = model(input_ids=torch.tensor([full], device=model.device), use_cache=False, logits_to_keep=keep)
            return out.logits[0].float()

    if not do_capture:
        return score_query(model, NoReuse(), query_ids, options, record, False)
    # capture positions are chunk-relative; here the chunk is the whole sequence, so shift them
    q = list(query_ids)
    chunk = q + [options[0][0]] if record == "answer" else q
    full = list(prefix_ids) + chunk
    with capture(model, len(full) - 1) as cap:
        with torch.no_grad():
            model(input_ids=torch.tensor([full], device=model.device), use_cache=False)
    attn_out, scores = cap.stacked(model.config.num_hidden_layers)
    res = score_query(model, NoReuse(), query_ids, options, record, False)
    res.attn_out, res.scores = attn_out, scores[..., len(prefix_ids):]
    return res
