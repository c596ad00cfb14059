"""Finetuning on the demonstrations (DESIGN.md §2.3–2.5): the loss of each method for one sequence.

- standard:     mean token NLL of `<bos> input answer_gold` (input and answer tokens alike)
- layer_causal: every decoder layer's input is detached; each layer's output goes through the
                final norm and the LM head; the per-layer NLLs are summed, so layer l's
                parameters get gradient from loss_l only
- linearized:   f_lin(x; δ) = f(x; θ0) + J_θ f(x; θ0)·δ with δ on the trained parameters only.
                (1) a no-grad forward-mode pass (tangent δ injected at the trained projections)
                gives f0 and Jδ; (2) an ordinary forward at θ0 is made to carry the value f_lin
                and the gradient Jᵀ·∂L/∂f. The backward then leaves ∂L/∂δ in the θ0 parameters'
                .grad, which the optimizer applies to δ, never to θ0.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from icl_scale.errors import UserError
from icl_scale.modeling.params import Trained, decoder_layers, final_norm

METHODS = ("ft", "ft_lc", "ft_lc_clip", "ft_lin")   # ft_lc_clip: layer-causal with its own clipping


def sequence_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ids[1:] given logits[:-1] (logits [1, T, V], ids [1, T])."""
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def standard_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return sequence_nll(model(input_ids=ids).logits, ids)


@contextmanager
def layer_causal(model):
    """Detach every decoder layer's input; yield the list that collects each layer's output."""
    outputs: list[torch.Tensor] = []

    def detach_input(mod, args, kwargs):
        if args:
            return (args[0].detach(), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": kwargs["hidden_states"].detach()}

    def keep_output(mod, args, kwargs, out):
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handles = []
    for layer in decoder_layers(model):
        handles.append(layer.register_forward_pre_hook(detach_input, with_kwargs=True))
        handles.append(layer.register_forward_hook(keep_output, with_kwargs=True))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class _HeadLoss(torch.autograd.Function):
    """loss_l = NLL(head(norm(h_l))) whose gradient with respect to h_l is computed at once and kept
    ([T, d]) instead of the [T, V] logits autograd would keep until the backward: with the head
    frozen, the per-layer logits of all L layers would otherwise be alive together (62 layers ×
    1,024 tokens × 262k vocabulary in float32 is 62 GiB). The same kernels on the same values as
    the plain graph, so the gradients are bit for bit the same."""

    @staticmethod
    def forward(ctx, h, norm, head, ids):
        with torch.enable_grad():
            leaf = h.detach().requires_grad_(h.requires_grad)
            loss = sequence_nll(head(norm(leaf)), ids)
            grad = torch.autograd.grad(loss, leaf)[0] if h.requires_grad else None
        ctx.save_for_backward(grad)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * grad_loss), None, None, None   # × 1.0 is exact


def layer_causal_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(summed loss, per-layer losses)."""
    norm, head = final_norm(model), model.get_output_embeddings()
    with layer_causal(model) as outs:
        model.base_model(input_ids=ids)
    losses = [_HeadLoss.apply(h, norm, head, ids) for h in outs]
    return torch.stack(losses).sum(), losses


# ---- linearization -------------------------------------------------------------------------

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
    forward-mode AD: the SDPA wrapper (modeling/capture.py) writes the attention tangent out."""
    deltas_of = _deltas_by_module(model, trained, deltas)
    patched = [(m, m.__dict__.get("forward")) for m in _projections(model)]
    with ExitStack() as stack:
        stack.enter_context(fwAD.dual_level())
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


def linearized_loss(model, trained, deltas, ids: torch.Tensor) -> torch.Tensor:
    f_lin = linearized_logits(model, trained, deltas, ids)
    f0 = model(input_ids=ids).logits
    carried = f0 + (f_lin - f0).detach()  # value f_lin, gradient through f0: Jᵀ·∂L/∂f at θ0
    return sequence_nll(carried, ids)
