"""The finetuning losses of one sequence (DESIGN.md §2.3–2.5), by the name a setting gives
(settings.py `loss`; the table `LOSSES` at the end):

- standard:     mean token NLL of `<bos> input answer_gold` (input and answer tokens alike)
- layer_causal: every decoder layer's input is detached; each layer's output goes through the
                final norm and the LM head; the per-layer NLLs are summed, so layer l's
                parameters get gradient from loss_l only
- linearized:   f_lin(x; δ) = f(x; θ0) + J_θ f(x; θ0)·δ with δ on the trained parameters only.
                (1) a no-grad forward-mode pass (methods/linearized.py) gives f0 and Jδ; (2) an
                ordinary forward at θ0 is made to carry the value f_lin and the gradient
                Jᵀ·∂L/∂f. The backward then leaves ∂L/∂δ in the θ0 parameters' .grad, which the
                optimizer applies to δ, never to θ0.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from icl_scale.methods.linearized import linearized_logits
from icl_scale.modeling.params import decoder_layers, final_norm


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


def linearized_loss(model, trained, deltas, ids: torch.Tensor) -> torch.Tensor:
    f_lin = linearized_logits(model, trained, deltas, ids)
    f0 = model(input_ids=ids).logits
    carried = f0 + (f_lin - f0).detach()  # value f_lin, gradient through f0: Jᵀ·∂L/∂f at θ0
    return sequence_nll(carried, ids)


# name (settings.py) -> loss(model, ids, trained, deltas) of one sequence
LOSSES = {
    "standard": lambda model, ids, trained, deltas: standard_loss(model, ids),
    "layer_causal": lambda model, ids, trained, deltas: layer_causal_loss(model, ids)[0],
    "linearized": lambda model, ids, trained, deltas: linearized_loss(model, trained, deltas, ids),
}
