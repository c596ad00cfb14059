"""Scoring with a cached prefix (DESIGN.md §2.2, §2.6).

The prefix (<bos>, plus the demonstrations for ICL) is run once; each batch of queries then
extends its KV cache and the cache is rolled back to the prefix. transformers' dynamic caches grow
by concatenation (never in place), so rolling back is restoring each layer's saved attributes: no
per-query copy. Queries of a batch are left-padded so they all end on the same position (one
logits row each, one capture position); padded slots are masked out of attention and get no
position, so a query scores the same alone or in a batch.

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
        # A sliding window counts cache slots, padded ones included: such models score one query at a time.
        self.max_batch = 1 if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers) else None

    def _restore(self, batch: int) -> None:
        for layer, saved in zip(self.cache.layers, self._saved):
            vars(layer).clear()
            vars(layer).update(saved)
            if batch > 1 and getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
                layer.keys = layer.keys.expand(batch, -1, -1, -1)
                layer.values = layer.values.expand(batch, -1, -1, -1)

    def forward(self, chunks: list[list[int]], keep: int) -> torch.Tensor:
        """Logits [B, keep, V] of the last `keep` positions of prefix + each (left-padded) chunk."""
        dev, P = self.model.device, self.length
        T = max(len(c) for c in chunks)
        pads = torch.tensor([T - len(c) for c in chunks], device=dev)
        ids = torch.tensor([[c[0]] * (T - len(c)) + list(c) for c in chunks], device=dev)
        kwargs = {}
        if pads.any():
            col = torch.arange(T, device=dev)[None]
            kwargs["attention_mask"] = torch.cat([torch.ones(len(chunks), P, dtype=torch.long, device=dev),
                                                  (col >= pads[:, None]).long()], dim=1)
            kwargs["position_ids"] = P + (col - pads[:, None]).clamp(min=0)
        self._restore(len(chunks))
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=keep, **kwargs)
            return out.logits.float()
        finally:
            self._restore(1)


@dataclass
class Scored:
    pred: int
    option_scores: list[float]
    attn_out: torch.Tensor | None = None   # [L, d]
    scores: torch.Tensor | None = None     # [L, H, n_query]


def score_batch(model, cache, queries: list[list[int]], options: list[list[int]],
                record: str = "prediction", do_capture: bool = True) -> list[Scored]:
    """Score every option of every query after the cached prefix and, optionally, capture at the
    recording position: the last query token (the position that predicts the answer), or with
    record="answer" the first option's first answer token (the reference's choice)."""
    step = getattr(cache, "max_batch", None)
    if step and len(queries) > step:
        return [s for i in range(0, len(queries), step)
                for s in score_batch(model, cache, queries[i:i + step], options, record, do_capture)]
    extra = 1 if record == "answer" else 0
    chunks = [list(q) + [options[0][0]] * extra for q in queries]
    T = max(len(c) for c in chunks)
    keep = 1 + extra  # logits from the prediction position on: the LM head skips the rest
    if do_capture:
        with capture(model, T) as cap:
            logits = cache.forward(chunks, keep)
        attn_out, scores = cap.stacked(model.config.num_hidden_layers)
    else:
        logits = cache.forward(chunks, keep)
    first = torch.log_softmax(logits[:, 0], dim=-1)
    out = []
    for b, q in enumerate(queries):
        option_scores = []
        for opt in options:
            if len(opt) == 1:
                option_scores.append(first[b, opt[0]].item())
                continue
            lp = torch.log_softmax(cache.forward([list(q) + opt[:-1]], len(opt))[0], dim=-1)
            option_scores.append(lp[torch.arange(len(opt)), torch.tensor(opt)].mean().item())
        pred = max(range(len(options)), key=lambda i: option_scores[i])
        s = Scored(pred, option_scores)
        if do_capture:  # the row's own tokens are the last len(chunk) of the padded chunk
            s.attn_out, s.scores = attn_out[b], scores[b, ..., T - len(chunks[b]):]
        out.append(s)
    return out
