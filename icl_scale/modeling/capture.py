"""Named, scoped capture points shared by every method.

Points (per eval example, at the recording position `pos` of the forward chunk):
    blocks.{l}.attn.out     [B, d_model]       attention block output (after the output
                                               projection, before the residual add)
    blocks.{l}.attn.scores  [B, n_heads, pos+1] pre-softmax scores q·kᵀ·scaling of `pos` against
                                               the chunk's own tokens 0..pos (the query tokens;
                                               the cached demonstrations are excluded)

The scores come from a wrapper around the model's own attention function, registered under
`icl_eager` / `icl_sdpa` in transformers' AttentionInterface (and, as it must be, with the
matching mask function in AttentionMaskInterface). Outside a `capture()` block the wrapper only
delegates.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

_ACTIVE: "Captured | None" = None


@dataclass
class Captured:
    pos: int
    attn_out: dict[int, torch.Tensor] = field(default_factory=dict)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def stacked(self, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """attn_out [B, L, d], scores [B, L, H, pos+1], both float32 on CPU."""
        out = torch.stack([self.attn_out[l] for l in range(n_layers)], dim=1).float().cpu()
        sc = torch.stack([self.scores[l] for l in range(n_layers)], dim=1).float().cpu()
        return out, sc


def _record_scores(module, query, key, scaling, kwargs):
    cap = _ACTIVE
    if cap is None:
        return
    n = query.shape[-2]
    pos = cap.pos
    keys = key[:, :, key.shape[-2] - n: key.shape[-2] - n + pos + 1]   # the chunk's own keys 0..pos
    keys = keys.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # grouped-query attention
    s = torch.einsum("bhd,bhkd->bhk", query[:, :, pos], keys) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    softcap = kwargs.get("softcap")
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    cap.scores[module.layer_idx] = s.detach()


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _record_scores(module, query, key, scaling, kwargs)
    base = sys.modules[type(module).__module__].eager_attention_forward  # the model's own eager path
    return base(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    _record_scores(module, query, key, scaling, kwargs)
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


@contextmanager
def capture(model, pos: int):
    """Record every capture point at chunk position `pos` during the forwards inside the block."""
    global _ACTIVE
    cap = Captured(pos)
    handles = []
    for m in attention_modules(model):
        def hook(mod, args, output, _l=m.layer_idx):
            out = output[0] if isinstance(output, tuple) else output
            cap.attn_out[_l] = out[:, pos].detach()
        handles.append(m.register_forward_hook(hook))
    _ACTIVE = cap
    try:
        yield cap
    finally:
        _ACTIVE = None
        for h in handles:
            h.remove()
