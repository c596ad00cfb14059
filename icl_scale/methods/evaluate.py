"""Scoring with a cached prefix (DESIGN.md §2.2, §2.6).

The prefix (<bos>, plus the demonstrations for ICL) is run once; a query then extends its KV
cache and the cache is rolled back to the prefix (transformers' dynamic caches grow by
concatenation, never in place, so rolling back is restoring each layer's saved attributes).
A batch of queries shares one copy of the prefix's keys and values: the forward carries only the
queries' own tokens and the attention (`shared_prefix_attention`) scores all B·T query positions
against the one prefix copy in a single matmul per layer, then against their own keys, under one
softmax. Architectures whose capture hooks their projections (modeling/capture.py) attend with
their own module: there the prefix is broadcast into the concatenated cache. Queries of a batch
are left-padded so they all end on the same position (one logits row each, one capture
position); padded slots are masked out of attention and get no position, so a query scores the
same alone or in a batch, to float rounding.

Option score = mean log-softmax (full vocabulary) of the option's answer tokens; prediction =
argmax. Single-token options are all read from the query forward; a multi-token option gets one
more forward of query + its answer tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import DynamicCache

from icl_scale.modeling.capture import capture, mechanism, plain_scores, prefix_attention


def shared_prefix_attention(prefix_kv, own_mask, module, query, key, value, scaling, kwargs):
    """Attention of a batch's queries [B, H, T, d] over one copy of the prefix (`prefix_kv[layer]`:
    keys and values [1, H_kv, P, d]) and their own keys [B, H_kv, T, d] (`own_mask` [B, 1, T, T]:
    True where a key is visible). Output [B, T, H, d], as transformers' attention functions."""
    if not plain_scores(kwargs) or kwargs.get("s_aux") is not None:
        raise RuntimeError("shared-prefix batching needs plain q·kᵀ scores (no position bias, softcap or sinks); "
                           "use --eval.batch_size 1 for this model")
    kp, vp = prefix_kv[module.layer_idx]
    B, H, T, d = query.shape
    n, P = key.shape[1], kp.shape[2]
    g = H // n
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(B, n, g, T, d)
    fold = lambda x: x.transpose(0, 1).reshape(n, B * g * T, -1)           # noqa: E731  [n, B·g·T, ·]
    unfold = lambda x: x.reshape(n, B, g, T, -1).transpose(0, 1)           # noqa: E731  [B, n, g, T, ·]
    s_prefix = unfold(torch.matmul(fold(q), kp[0].transpose(1, 2)))
    s_own = torch.matmul(q, key[:, :, None].transpose(-1, -2)).masked_fill(~own_mask[:, :, None], float("-inf"))
    p = torch.softmax(torch.cat([s_prefix, s_own], dim=-1) * scale, dim=-1, dtype=torch.float32).to(value.dtype)
    out = unfold(torch.matmul(fold(p[..., :P]), vp[0])) + torch.matmul(p[..., P:], value[:, :, None])
    return out.reshape(B, H, T, -1).transpose(1, 2).contiguous(), None


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
        self.shares = mechanism(model.config.model_type) == "interface"   # our wrapper runs the attention

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
        if len(chunks) > 1 and self.shares:
            return self._shared(ids, pads, keep)
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


    def _shared(self, ids: torch.Tensor, pads: torch.Tensor, keep: int) -> torch.Tensor:
        """A batch over the one prefix copy (shared_prefix_attention): only its own tokens run."""
        B, T = ids.shape
        col = torch.arange(T, device=ids.device)
        real = col[None] >= pads[:, None]                                    # [B, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        own_mask = (causal[None] & real[:, None, :])[:, None]                # [B, 1, T, T]
        kv = [(layer.keys, layer.values) for layer in self.cache.layers]
        with torch.no_grad(), prefix_attention(partial(shared_prefix_attention, kv, own_mask)):
            out = self.model(input_ids=ids, attention_mask=real.long(), position_ids=self.length + (col - pads[:, None]).clamp(min=0),
                             use_cache=False, logits_to_keep=keep)
        return out.logits.float()


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
        attn_out, scores = cap.stacked()
    else:
        logits = cache.forward(chunks, keep)
    singles = [i for i, opt in enumerate(options) if len(opt) == 1]
    first = torch.log_softmax(logits[:, 0], dim=-1)[:, [options[i][0] for i in singles]].cpu().tolist()  # one copy
    out = []
    for b, q in enumerate(queries):
        option_scores = [0.0] * len(options)
        for j, i in enumerate(singles):
            option_scores[i] = first[b][j]
        for i, opt in enumerate(options):
            if len(opt) > 1:
                lp = torch.log_softmax(cache.forward([list(q) + opt[:-1]], len(opt))[0], dim=-1)
                option_scores[i] = lp[torch.arange(len(opt)), torch.tensor(opt)].mean().item()
        pred = max(range(len(options)), key=lambda i: option_scores[i])
        s = Scored(pred, option_scores)
        if do_capture:  # the row's own tokens are the last len(chunk) of the padded chunk
            s.attn_out, s.scores = attn_out[b], scores[b, ..., T - len(chunks[b]):]
        out.append(s)
    return out


@dataclass
class BatchSizer:
    """Queries per forward: `fixed` (eval.batch_size ≥ 1), or with 0 found once per scoring pass
    by scoring its longest query at 1, 2, 4, … up to `most` copies (and no more than the pass has): the size with the least time
    per query among those that fit (a CUDA out-of-memory ends the search, as does a size 25% slower
    per query than the best). Under `lockstep` (ZeRO-3: every forward a collective) every rank
    probes every size and `agree` takes the ranks' smallest choice."""
    fixed: int
    most: int = 64
    lockstep: bool = False
    agree: object = staticmethod(lambda b: b)
    probe: dict = field(default_factory=dict)   # the last search: size → seconds per query

    def size(self, model, cache, queries: list[list[int]], options, record: str, do_capture: bool) -> int:
        if self.fixed:
            return self.fixed
        longest = max(queries, key=len)
        most = min(self.most, getattr(cache, "max_batch", None) or self.most, max(1, len(queries)))
        self.probe = {}
        b = 1
        while b <= most:
            try:
                start = _synced_time(model)
                score_batch(model, cache, [longest] * b, options, record, do_capture)
                self.probe[b] = (_synced_time(model) - start) / b
            except torch.OutOfMemoryError:
                if self.lockstep:
                    raise
                torch.cuda.empty_cache()
                break
            if not self.lockstep and self.probe[b] > 1.25 * min(self.probe.values()):
                break
            b *= 2
        best = min(self.probe, key=lambda k: (self.probe[k], -k))
        return self.agree(best)


def _synced_time(model) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


def batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]
