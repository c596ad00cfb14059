"""Everything of the linearized model f_lin(x; δ) = f(x; θ0) + J_θ f(x; θ0)·δ (DESIGN.md §2.5), δ on
the trained parameters only:

- `tangents()`: inside a forward-AD dual level every projection runs its primal and tangent as
  plain matmuls and the trained ones add J·δ; SDPA attention writes its tangent out (`dual_sdpa`);
- `linearized_logits`: f0 + J·δ with no graph; `LinearizedForward`: the evaluation interface
  (methods/evaluate.py) of the linearized model, every capture point primal + tangent;
- `allow_forward_ad_under_zero3`: ZeRO-3's identity autograd Functions given an identity jvp.

Its loss (the gradient Jᵀ·∂L/∂f at θ0) is in methods/losses.py.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from icl_scale.errors import UserError
from icl_scale.modeling.capture import dual_attention, sdpa_primal
from icl_scale.modeling.params import Trained


def _owner(model, name_in_model: str):
    mod_name, _, attr = name_in_model.rpartition(".")
    return model.get_submodule(mod_name), attr


def _projection_forward(mod, delta: dict):
    """A Linear/Conv1D forward for the forward-mode pass: primal and tangent as two plain matmuls
    (the weights carry no tangent), plus J·δ of a trained projection. Forward AD's own rule for
    mm also multiplies by the weights' zero tangent: a third matmul per projection. The primal is
    the module's own forward: a GPU's addmm fuses the bias and rounds unlike a matmul then an add,
    and f must be exact at δ = 0."""
    plain = mod.forward
    conv1d = type(mod).__name__ == "Conv1D"   # GPT-2: x @ W + b, W [in, out]

    def apply(x, w):
        return x @ w if conv1d else F.linear(x, w)

    def forward(x):
        primal, tangent = fwAD.unpack_dual(x)
        out = plain(primal)
        if tangent is not None:
            tangent = apply(tangent, mod.weight)
        if delta:
            extra = apply(primal, delta["weight"]) if "weight" in delta else torch.zeros_like(out)
            if "bias" in delta:
                extra = extra + delta["bias"]
            tangent = extra if tangent is None else tangent + extra
        return out if tangent is None else fwAD.make_dual(out, tangent)
    return forward


def _projections(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


def _deltas_by_module(model, trained: list[Trained], deltas) -> dict[int, dict]:
    """{id(module): {"weight": δ, "bias": δ}}; every trained module must be a projection."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[int, dict] = {}
    for t, d in zip(trained, deltas):
        mod, attr = _owner(model, names[id(t.param)])
        out.setdefault(id(mod), {})[attr] = d
    unsupported = set(out) - {id(m) for m in _projections(model)}
    if unsupported:
        name = next(n for n, m in model.named_modules() if id(m) in unsupported)
        raise UserError(f"linearized FT (ft_lin): trained module {name} is not a linear projection "
                        f"(use finetune.train kv)")
    return out


def check_linearizable(model, trained: list[Trained]) -> None:
    _deltas_by_module(model, trained, [None] * len(trained))


@contextmanager
def tangents(model, trained: list[Trained], deltas: list[torch.Tensor]):
    """Inside a forward-AD dual level, every projection (Linear, GPT-2 Conv1D, the LM head) runs
    its primal and tangent explicitly and the trained ones add J_θ·δ, for whatever weight storage
    the module uses (ZeRO-3 gathers before the forward). Fused attention kernels have no
    forward-mode AD: the SDPA wrapper (modeling/capture.py) runs `dual_sdpa` instead."""
    deltas_of = _deltas_by_module(model, trained, deltas)
    patched = [(m, m.__dict__.get("forward")) for m in _projections(model)]
    with ExitStack() as stack:
        stack.enter_context(fwAD.dual_level())
        stack.enter_context(dual_attention(dual_sdpa))
        for m, _ in patched:
            m.forward = _projection_forward(m, deltas_of.get(id(m), {}))
        try:
            yield
        finally:
            for m, own in patched:
                if own is None:
                    del m.forward
                else:
                    m.forward = own


def linearized_logits(model, trained, deltas, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """f(x; θ0) + J·δ (no graph)."""
    with torch.no_grad(), tangents(model, trained, deltas):
        out = model(input_ids=ids, **kwargs).logits
        primal, tangent = fwAD.unpack_dual(out)
        return primal + tangent if tangent is not None else primal.clone()


def dual_sdpa(module, query, key, value, attention_mask, scaling, kwargs):
    """Attention of the linearized model (query, key, value are dual): the primal through the same
    kernel as a plain forward (so f is exact at δ = 0), the tangent written out,
        o' = (P ⊙ S')·V + P·V' − rowsum(P ⊙ S') ⊙ o,   S' = (Q'·Kᵀ + Q·K'ᵀ)·scaling,
    about half the cost of the math backend's forward-mode AD (its masked safe softmax).
    Grouped-query heads share their K/V without a copy."""
    (qp, qt), (kp, kt), (vp, vt) = (fwAD.unpack_dual(t) for t in (query, key, value))
    out, _ = sdpa_primal(module, qp, kp, vp, attention_mask, scaling, 0.0, kwargs)   # [b, T, h, d]
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


class LinearizedForward:
    """The evaluation interface of PrefixCache for the linearized model f0 + J·δ: each query runs
    whole (the ZSL prefix is one token) in forward mode, so logits and every capture point are
    primal + tangent."""

    max_batch = 1

    def __init__(self, model, trained, deltas, prefix_ids):
        self.model, self.trained, self.deltas, self.prefix = model, trained, deltas, list(prefix_ids)

    def forward(self, chunks, keep):
        assert len(chunks) == 1
        ids = torch.tensor([self.prefix + list(chunks[0])], device=self.model.device)
        return linearized_logits(self.model, self.trained, self.deltas, ids, logits_to_keep=keep).float()


def _identity_jvp(ctx, *tangents):
    return tangents[0] if len(tangents) == 1 else tangents


def allow_forward_ad_under_zero3(model) -> None:
    """ZeRO-3 wraps module outputs and inputs in autograd Functions (`pre_bwd_fn`, `post_bwd_fn`)
    that are identities in value but have no jvp; the forward-mode pass goes through them."""
    for m in model.modules():
        for attr in ("pre_bwd_fn", "post_bwd_fn"):
            fn = m.__dict__.get(attr)
            if fn is not None:
                fn.jvp = staticmethod(_identity_jvp)
