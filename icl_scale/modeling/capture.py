"""Named, scoped capture points shared by every method.

Points (per eval example, at the recording position: the last position of the forward):
    blocks.{l}.attn.out     [B, d_model]         attention block output (after the output
                                                 projection, before the residual add)
    blocks.{l}.attn.scores  [B, n_heads, n_keys] pre-softmax scores q·kᵀ·scaling of that position
                                                 against the last n_keys tokens (the query's own
                                                 tokens; cached demonstrations are excluded)

Two mechanisms make the scores, chosen per architecture from MECHANISMS (by config.model_type):
- "interface" (every architecture on transformers' attention interface): a wrapper around the
  model's own attention function, registered under `icl_eager` / `icl_sdpa` in AttentionInterface
  (and, as it must be, with the matching mask function in AttentionMaskInterface). Outside a
  `capture()` block the wrapper only delegates.
- "projections" (attention modules with their own forward, e.g. XGLM, the papers' fairseq-dense
  family): forward hooks on the module's query and key projections; scores = (q_proj(h)·scaling)
  · k_proj(h)ᵀ per head, as the module computes them. The model runs its own eager attention.
The output point is a forward hook on the attention module under both. Under forward-mode AD
(the linearized model) every point records primal + tangent.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

_ACTIVE: "Captured | None" = None
_DUAL_ATTENTION = None   # attention of dual q/k/v with its tangent written out (methods/linearized.py)
_PREFIX_ATTENTION = None  # attention over a shared, uncopied prefix plus the batch's own keys (methods/evaluate.py)


def _value(t: torch.Tensor) -> torch.Tensor:
    """A recorded tensor's value; under forward-mode AD (the linearized model) primal + tangent."""
    primal, tangent = fwAD.unpack_dual(t)
    return (primal if tangent is None else primal + tangent).detach()


@dataclass(frozen=True)
class Projections:
    """Scores from hooks on an attention module's own projections: query `q` (scaled by the
    module's `scaling` attribute after the projection) and key `k`."""
    q: str = "q_proj"
    k: str = "k_proj"
    scaling: str = "scaling"


# config.model_type → how its scores are captured; absent: the attention interface
MECHANISMS: dict[str, Projections] = {"xglm": Projections()}


def mechanism(model_type: str) -> str:
    return "projections" if model_type in MECHANISMS else "interface"


def implementation(model_type: str, attn: str) -> str:
    """The attention implementation to load: our wrapper over `attn` (sdpa or eager), or the
    model's own eager attention where capture hooks its projections."""
    return f"icl_{attn}" if mechanism(model_type) == "interface" else "eager"


@dataclass
class Captured:
    """The points of one forward, gathered on the model's device into one float32 buffer per kind
    (allocated at a kind's first layer; a hook copies into its slot, so no layer's activations
    are kept alive and nothing waits for the host); `stacked()` is the one copy to the host."""
    n_keys: int
    n_layers: int
    attn_out: torch.Tensor | None = None   # [B, L, d]
    scores: torch.Tensor | None = None     # [B, L, H, n_keys]

    def put(self, kind: str, layer: int, x: torch.Tensor) -> None:
        buf = getattr(self, kind)
        if buf is None:
            buf = x.new_empty((x.shape[0], self.n_layers, *x.shape[1:]), dtype=torch.float32)
            setattr(self, kind, buf)
        buf[:, layer].copy_(x)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """attn_out [B, L, d], scores [B, L, H, n_keys], float32 on the CPU."""
        return self.attn_out.cpu(), self.scores.cpu()


def _record_scores(module, query, key, scaling, kwargs):
    cap = _ACTIVE
    if cap is None:
        return
    keys = key[:, :, -cap.n_keys:]
    b, h, d = query.shape[0], query.shape[1], query.shape[-1]
    q = query[:, :, -1].reshape(b, key.shape[1], h // key.shape[1], d)   # grouped-query attention, no K copy
    s = torch.einsum("bngd,bnkd->bngk", q, keys).reshape(b, h, -1) * (scaling if scaling is not None else d ** -0.5)
    softcap = kwargs.get("softcap")
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    cap.put("scores", module.layer_idx, _value(s))


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _record_scores(module, query, key, scaling, kwargs)
    if _PREFIX_ATTENTION is not None:
        return _PREFIX_ATTENTION(module, query, key, value, scaling, kwargs)
    base = sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager path
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _record_scores(module, query, key, scaling, kwargs)
    if _PREFIX_ATTENTION is not None:
        return _PREFIX_ATTENTION(module, query, key, value, scaling, kwargs)
    if any(fwAD.unpack_dual(t).tangent is not None for t in (query, key, value)):
        if _DUAL_ATTENTION and not dropout and plain_scores(kwargs) and kwargs.get("s_aux") is None:
            return _DUAL_ATTENTION(module, query, key, value, attention_mask, scaling, kwargs)
        with sdpa_kernel([SDPBackend.MATH]):   # the one backend with forward-mode AD
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    return sdpa_primal(module, query, key, value, attention_mask, scaling, dropout, kwargs)


@contextmanager
def dual_attention(fn):
    """Inside the block, SDPA attention of dual inputs (forward-mode AD) runs `fn(module, query,
    key, value, attention_mask, scaling, kwargs)` where the scores are plain; elsewhere (and
    outside the block) SDPA's math backend, the one with forward-mode AD."""
    global _DUAL_ATTENTION
    before, _DUAL_ATTENTION = _DUAL_ATTENTION, fn
    try:
        yield
    finally:
        _DUAL_ATTENTION = before


@contextmanager
def prefix_attention(fn):
    """Inside the block the wrapper's attention is `fn(module, query, key, value, scaling, kwargs)`:
    the forward carries only the batch's own tokens and `fn` adds the prefix it holds."""
    global _PREFIX_ATTENTION
    before, _PREFIX_ATTENTION = _PREFIX_ATTENTION, fn
    try:
        yield
    finally:
        _PREFIX_ATTENTION = before


def plain_scores(kwargs) -> bool:
    """Scores are q·kᵀ·scaling plus the mask: no position bias, no softcap."""
    return kwargs.get("position_bias") is None and not kwargs.get("softcap")


def sdpa_primal(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    if (query.device.type == "cpu" and query.shape[1] != key.shape[1] and attention_mask is not None
            and attention_mask.dtype == torch.bool and plain_scores(kwargs)):
        # With a mask (every cached query) transformers repeats K/V per query head; the CPU kernel
        # takes grouped-query attention natively, which saves that copy (~10% of a cached query).
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[-2]], dropout_p=dropout, scale=scaling,
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register("icl_eager", _eager)
AttentionInterface.register("icl_sdpa", _sdpa)
AttentionMaskInterface.register("icl_eager", eager_mask)
AttentionMaskInterface.register("icl_sdpa", sdpa_mask)


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of each decoder layer, in layer order."""
    mods = [m for m in model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]
    mods.sort(key=lambda m: m.layer_idx)
    if not mods or [m.layer_idx for m in mods] != list(range(len(mods))):
        raise RuntimeError(f"cannot find one attention module per layer in {type(model).__name__}")
    return mods


def _projection_hooks(attn, names: Projections, cap: Captured) -> list:
    """Scores of the last position from the module's own q and k projections (per head)."""
    last_q = {}

    def on_q(mod, args, output):
        last_q["q"] = output[:, -1] * getattr(attn, names.scaling)

    def on_k(mod, args, output):
        q, keys = last_q.pop("q"), output[:, -cap.n_keys:]
        b, n, h = keys.shape[0], keys.shape[1], attn.num_heads
        s = torch.einsum("bhd,bnhd->bhn", q.reshape(b, h, -1), keys.reshape(b, n, h, -1))
        cap.put("scores", attn.layer_idx, _value(s))

    return [getattr(attn, names.q).register_forward_hook(on_q), getattr(attn, names.k).register_forward_hook(on_k)]


@contextmanager
def capture(model, n_keys: int):
    """Record every capture point at the last position of the forward inside the block, with
    scores against the last `n_keys` tokens."""
    global _ACTIVE
    modules = attention_modules(model)
    cap = Captured(n_keys, len(modules))
    handles = []
    names = MECHANISMS.get(model.config.model_type)
    for m in modules:
        def hook(mod, args, output, _l=m.layer_idx):
            out = output[0] if isinstance(output, tuple) else output
            cap.put("attn_out", _l, _value(out[:, -1]))
        handles.append(m.register_forward_hook(hook))
        if names is not None:
            handles += _projection_hooks(m, names, cap)
    _ACTIVE = cap
    try:
        yield cap
    finally:
        _ACTIVE = None
        for h in handles:
            h.remove()
