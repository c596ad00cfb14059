"""Which parameters finetuning trains, per layer, and the decoder's layer structure.

The study trains attention key and value projections only (weights and biases, all layers).
Separate k/v linears (Llama, Gemma, OPT, …) are trained whole; fused projections are trained on
their k and v parts only, through an element mask applied to their gradients:
  GPT-2 `c_attn` (Conv1D, weight [d, 3d], columns q | k | v),
  GPT-NeoX `query_key_value` (Linear, rows per head as q, k, v),
  Phi-3 `qkv_proj` (Linear, rows q (all query heads) | k | v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from icl_scale.errors import UserError
from icl_scale.modeling.capture import attention_modules


@dataclass
class Trained:
    name: str
    param: torch.nn.Parameter
    layer: int
    mask: torch.Tensor | None = None    # 1 where trained (fused projections), None: all of it


def _fused_mask(attn, name: str, p: torch.Tensor) -> torch.Tensor | None:
    """Element mask of the k and v parts of a fused qkv parameter, or None if `name` is not fused."""
    if name.startswith("c_attn."):  # GPT-2 Conv1D: last dim is [q | k | v]
        d = p.shape[-1] // 3
        m = torch.zeros_like(p)
        m[..., d:] = 1
        return m
    if name.startswith("query_key_value."):  # GPT-NeoX: first dim is heads × (q, k, v) × head_dim
        heads = attn.config.num_attention_heads
        m = torch.zeros_like(p).view(heads, 3, -1, *p.shape[1:])
        m[:, 1:] = 1
        return m.view_as(p)
    if name.startswith("qkv_proj."):  # Phi-3: first dim is [q: heads × head_dim | k | v]
        m = torch.zeros_like(p)
        m[attn.config.num_attention_heads * attn.head_dim:] = 1
        return m
    return None


KV_NAMES = ("k_proj.", "v_proj.", "key.", "value.")


def trained_params(model, which: str = "kv") -> list[Trained]:
    """The trained parameters (requires_grad set on exactly these; gradient masks for fused parts).
    Select them once per model: each selection registers the mask hooks."""
    trained = _select(model, which)
    for p in model.parameters():
        p.requires_grad_(False)
    for t in trained:
        t.param.requires_grad_(True)
    return trained


def _select(model, which: str) -> list[Trained]:
    out = []
    for attn in attention_modules(model):
        for name, p in attn.named_parameters():
            if which == "kv":
                mask = _fused_mask(attn, name, p)
                if mask is None and not name.startswith(KV_NAMES):
                    continue
            elif which in ("attn", "all"):
                mask = None
            else:
                raise UserError(f"config field finetune.train: {which!r} is not one of kv, attn, all")
            out.append(Trained(f"layers.{attn.layer_idx}.{name}", p, attn.layer_idx, mask))
    if which == "all":
        seen = {id(t.param) for t in out}
        out += [Trained(n, p, -1) for n, p in model.named_parameters() if id(p) not in seen]
    if not out:
        raise UserError(f"model {type(model).__name__}: no key/value projections found to train")
    for t in out:
        if t.mask is not None:
            t.param.register_hook(lambda g, m=t.mask: g * m.to(g.dtype))
    return out


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's whole shape, also when ZeRO-3 has partitioned it (its data is then empty)."""
    return getattr(p, "ds_shape", p.shape)


def partitioned(module) -> bool:
    """Whether ZeRO-3 partitioned the module's parameters (at load, through zero.Init)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def decoder_layers(model) -> torch.nn.ModuleList:
    n = model.config.num_hidden_layers
    for m in model.base_model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__}")


def final_norm(model) -> torch.nn.Module:
    base = model.base_model
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "layer_norm"):
        if isinstance(getattr(base, name, None), torch.nn.Module):
            return getattr(base, name)
    decoder = getattr(base, "decoder", None)  # OPT
    if decoder is not None and isinstance(getattr(decoder, "final_layer_norm", None), torch.nn.Module):
        return decoder.final_layer_norm
    raise RuntimeError(f"cannot find the final norm of {type(model).__name__}")
