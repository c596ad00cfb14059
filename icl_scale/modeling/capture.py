"""Named, scoped capture points shared by every method.

Points (per eval example, at the recording position: the last position of the forward):
    blocks.{l}.attn.out     [B, d_model]         attention block output (after the output
                                                 projection, before the residual add)
    blocks.{l}.attn.scores  [B, n_heads, n_keys] pre-softmax scores q·kᵀ·scaling of that position
                                                 against the last n_keys tokens (the query's own
                                                 tokens; cached demonstrations are excluded)

The scores come from a wrapper around the model's own attention function, registered under
`icl_eager` / `icl_sdpa` in transformers' AttentionInterface (and, as it must be, with the
matching mask function in AttentionMaskInterface). Outside a `capture()` block the wrapper only
delegates. Under forward-mode AD (the linearized model) every point records primal + tangent.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

_ACTIVE: "Captured | None" = None


def _value(t: torch.Tensor) -> torch.Tensor:
    """A recorded tensor's value; under forward-mode AD (the linearized model) primal + tangent."""
    primal, tangent = fwAD.unpack_dual(t)
    return (primal if tangent is None else primal + tangent).detach()


@dataclass
class Captured:
    n_keys: int
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked(self, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """attn_out [B, L, d], scores [B, L, H, n_keys], both float32 on CPU."""
        out = torch.stack([self.attn_out[l] for l in range(n_layers)], dim=1).float().cpu()
        sc = torch.stack([self.scores[l] for l in range(n_layers)], dim=1).float().cpu()
        return out, sc


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
    cap.scores[module.layer_idx] = _value(s)


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _record_scores(module, query, key, scaling, kwargs)
    base = sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager path
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _record_scores(module, query, key, scaling, kwargs)
    if any(fwAD.unpack_dual(t).tangent is not None for t in (query, key, value)):
        if not dropout and _plain_scores(kwargs) and kwargs.get("s_aux") is None:
            return _dual_sdpa(module, query, key, value, attention_mask, scaling, kwargs)
        with sdpa_kernel([SDPBackend.MATH]):   # the one backend with forward-mode AD
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    return _sdpa_primal(module, query, key, value, attention_mask, scaling, dropout, kwargs)


def _plain_scores(kwargs) -> bool:
    """Scores are q·kᵀ·scaling plus the mask: no position bias, no softcap."""
    return kwargs.get("position_bias") is None and not kwargs.get("softcap")


def _sdpa_primal(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    if (query.device.type == "cpu" and query.shape[1] != key.shape[1] and attention_mask is not None
            and attention_mask.dtype == torch.bool and _plain_scores(kwargs)):
        # With a mask (every cached query) transformers repeats K/V per query head; the CPU kernel
        # takes grouped-query attention natively, which saves that copy (~10% of a cached query).
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask[:, :, :, : key.shape[-2]], dropout_p=dropout, scale=scaling,
            enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _dual_sdpa(module, query, key, value, attention_mask, scaling, kwargs):
    """Attention of the linearized model (query, key, value are dual): the primal through the same
    kernel as a plain forward (so f is exact at δ = 0), the tangent written out,
        o' = (P ⊙ S')·V + P·V' − rowsum(P ⊙ S') ⊙ o,   S' = (Q'·Kᵀ + Q·K'ᵀ)·scaling,
    about half the cost of the math backend's forward-mode AD (its masked safe softmax).
    Grouped-query heads share their K/V without a copy."""
    (qp, qt), (kp, kt), (vp, vt) = (fwAD.unpack_dual(t) for t in (query, key, value))
    out, _ = _sdpa_primal(module, qp, kp, vp, attention_mask, scaling, 0.0, kwargs)   # [b, T, h, d]
    b, h, T, d = qp.shape
    n_kv, Tk = kp.shape[1], kp.shape[2]
    g = h // n_kv
    scale = scaling if scaling is not None else d ** -0.5
    rows = lambda x: x.reshape(b, n_kv, g * T, x.shape[-1])   # noqa: E731  [b, h, T, ·] -> grouped rows
    q_rows = rows(qp)   # a copy when the model hands over a transposed query: made once
    s = (q_rows @ kp.transpose(-1, -2)).mul_(scale).view(b, n_kv, g, T, Tk)
    if attention_mask is None:
        causal = kwargs.get("is_causal")
        if T > 1 and (causal if causal is not None else getattr(module, "is_causal", True)):
            keep = torch.ones(T, Tk, dtype=torch.bool, device=s.device).tril(Tk - T)
            s.masked_fill_(~keep, float("-inf"))
    else:
        m = attention_mask[..., :Tk]
        m = m[:, :, None] if m.shape[1] == 1 else m.reshape(b, n_kv, g, T, Tk)
        if m.dtype == torch.bool:
            s.masked_fill_(~m, float("-inf"))
        else:
            s.add_(m)
    p = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(qp.dtype).nan_to_num_(0.0)
    del s
    ds = None
    if qt is not None:
        ds = rows(qt) @ kp.transpose(-1, -2)
    if kt is not None:
        qk = q_rows @ kt.transpose(-1, -2)
        ds = qk if ds is None else ds.add_(qk)
    p = p.view(b, n_kv, g * T, Tk)
    o = out.view(b, T, n_kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, n_kv, g * T, d)
    tangent = torch.zeros_like(o)
    if ds is not None:
        a = ds.mul_(scale).mul_(p)
        tangent += a @ vp - a.sum(-1, keepdim=True) * o
        del a, ds
    if vt is not None:
        tangent += p @ vt
    tangent = tangent.view(b, n_kv, g, T, d).permute(0, 3, 1, 2, 4).reshape(b, T, h, d)
    return fwAD.make_dual(out, tangent.contiguous()), None


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


@contextmanager
def capture(model, n_keys: int):
    """Record every capture point at the last position of the forward inside the block, with
    scores against the last `n_keys` tokens."""
    global _ACTIVE
    cap = Captured(n_keys)
    handles = []
    for m in attention_modules(model):
        def hook(mod, args, output, _l=m.layer_idx):
            out = output[0] if isinstance(output, tuple) else output
            cap.attn_out[_l] = _value(out[:, -1])
        handles.append(m.register_forward_hook(hook))
    _ACTIVE = cap
    try:
        yield cap
    finally:
        _ACTIVE = None
        for h in handles:
            h.remove()
