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


HEAD_CHUNK_BYTES = 2**30   # logits (and their gradient) of the layers that share one LM-head matmul


class _HeadLosses(torch.autograd.Function):
    """loss_l = NLL(head(norm(h_l))) for a chunk of layers, their head passes as one matmul over
    the chunk's stacked tokens (full matmul efficiency, one launch per chunk). The gradient with
    respect to each h_l is computed at once and kept ([T, d]) instead of the [T, V] logits
    autograd would keep until the backward: with the head frozen, the per-layer logits of all L
    layers would otherwise be alive together (62 layers × 1,024 tokens × 262k vocabulary in
    float32 is 62 GiB); a chunk is sized so its logits stay within HEAD_CHUNK_BYTES."""

    @staticmethod
    def forward(ctx, norm, head, ids, *hs):
        with torch.enable_grad():
            leaves = [h.detach().requires_grad_(h.requires_grad) for h in hs]
            logits = head(torch.cat([norm(leaf) for leaf in leaves], dim=1))   # [1, c·T, V]
            T = ids.shape[1]
            losses = torch.stack([sequence_nll(logits[:, i * T:(i + 1) * T], ids) for i in range(len(hs))])
            need = [leaf for leaf in leaves if leaf.requires_grad]
            grads = list(torch.autograd.grad(losses.sum(), need)) if need else []
        ctx.save_for_backward(*grads)
        ctx.has = [h.requires_grad for h in hs]
        return losses.detach()

    @staticmethod
    def backward(ctx, grad_losses):
        grads = iter(ctx.saved_tensors)
        out = [next(grads) * grad_losses[i] if has else None for i, has in enumerate(ctx.has)]   # × 1.0 is exact
        return (None, None, None, *out)


def head_chunks(n_layers: int, tokens: int, vocab: int) -> int:
    """Layers per head matmul: logits and their gradient (float32) of the chunk within HEAD_CHUNK_BYTES."""
    return max(1, min(n_layers, HEAD_CHUNK_BYTES // max(1, 2 * 4 * tokens * vocab)))


def layer_causal_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(summed loss, per-layer losses)."""
    norm, head = final_norm(model), model.get_output_embeddings()
    with layer_causal(model) as outs:
        model.base_model(input_ids=ids)
    c = head_chunks(len(outs), ids.shape[1], model.config.vocab_size)
    losses = [loss for i in range(0, len(outs), c) for loss in _HeadLosses.apply(norm, head, ids, *outs[i:i + c])]
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
