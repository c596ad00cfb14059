"""The finetuning loop shared by every finetuning setting: batch 1, one epoch over the
demonstrations in order, the per-task learning rate, the setting's loss (methods/losses.py),
gradient clipping, and what is recorded per step (loss, per-layer L2 norm of the trained
parameters' gradient before clipping, skipped steps). The backend (methods/backend.py) runs the
backward and the update.

Finetuning changes the model in place; `restored()` puts θ0 back after the job's evaluation.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from icl_scale.methods.backend import TorchBackend
from icl_scale.methods.losses import LOSSES
from icl_scale.modeling.params import Trained, full_shape
from icl_scale.settings import SETTINGS


@dataclass
class FTLog:
    method: str
    lr: float
    clip: str
    clip_value: float
    steps: int = 0
    skipped: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[list[float]] = field(default_factory=list)   # steps × layers
    clipped: list[list[int]] = field(default_factory=list)        # per step: the layers the clip changed


def _sq_by_layer(trained: list[Trained], grads: list[torch.Tensor], n_layers: int) -> torch.Tensor:
    """Squared L2 norm of the gradient per layer, float64 [n_layers + 1] on the gradients' device;
    the last slot holds the parameters outside the layers (layer -1)."""
    sq = torch.zeros(n_layers + 1, dtype=torch.float64, device=grads[0].device)
    for t, g in zip(trained, grads):
        sq[t.layer] += g.double().pow(2).sum()
    return sq


def _layer_sq_norms(trained: list[Trained], grads: list[torch.Tensor], n_layers: int) -> torch.Tensor:
    return _sq_by_layer(trained, grads, n_layers)[:n_layers]


def clip_(trained: list[Trained], grads: list[torch.Tensor], how: str, value: float) -> torch.Tensor:
    """Clip in place (settings.CLIP_MODES); returns which layers the clip changed, bool
    [n_layers] on the device (all trained layers when one factor scales the whole gradient), for
    how often each bound binds. No host synchronisation: a gradient that stays is multiplied by
    exactly 1."""
    n_layers = 1 + max(t.layer for t in trained)
    dev = grads[0].device
    trained_layers = torch.zeros(n_layers, dtype=torch.bool, device=dev)
    trained_layers[[t.layer for t in trained if t.layer >= 0]] = True
    if how == "none":
        return torch.zeros_like(trained_layers)
    if how == "elem_clamp":
        hit = torch.zeros(n_layers + 1, dtype=torch.bool, device=dev)
        for t, g in zip(trained, grads):
            hit[t.layer] |= (g.abs() > value).any()
            g.clamp_(-value, value)
        return hit[:n_layers] & trained_layers
    if how == "linf_rescale":
        top = torch.stack([g.abs().max() for g in grads]).max().double()
        factor = torch.where(top > value, value / top, 1.0)
        for g in grads:
            g.mul_(factor)
        return trained_layers & (top > value)
    if how == "global_l2":
        norm = torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt()
        factor = torch.where(norm > value, value / norm, 1.0)
        for g in grads:
            g.mul_(factor)
        return trained_layers & (norm > value)
    norm = _sq_by_layer(trained, grads, n_layers).sqrt()   # layer_l2
    factor = torch.where(norm > value, value / norm, 1.0)
    for t, g in zip(trained, grads):
        g.mul_(factor[t.layer])
    return (norm > value)[:n_layers] & trained_layers


def finetune(model, method: str, trained: list[Trained], sequences: list[list[int]], lr: float,
             optimizer: str = "sgd", clip: str = "none", clip_value: float = 1.0, backend=None):
    """Run one FT setting (`method`, a name of settings.py); returns (log, deltas) — δ for the
    linearized model, else None. `backend` runs backward and the update: plain PyTorch by default.
    What a step records stays on the device until the job ends (one copy to the host); a step
    whose loss or gradient is not finite is skipped — without asking the host where the backend
    can mask the update (plain SGD: a zero gradient leaves the weights exactly as they were)."""
    backend = backend or TorchBackend()
    setting = SETTINGS[method]
    loss_of = LOSSES[setting.loss]
    n_layers = model.config.num_hidden_layers
    deltas = ([torch.zeros(full_shape(t.param), dtype=t.param.dtype, device=model.device) for t in trained]
              if setting.linearized else None)
    opt = backend.optimizer(optimizer, lr, trained, deltas)
    steps = []
    model.train()  # dropout is 0 everywhere; train mode only for modules that care
    for seq in sequences:
        ids = torch.tensor([seq], device=model.device)
        loss = loss_of(model, ids, trained, deltas)
        grads = backend.grads(loss, trained)  # masked to k/v parts by the parameter hooks
        finite = torch.isfinite(loss.detach()) & torch.stack([torch.isfinite(g).all() for g in grads]).all()
        norms = _layer_sq_norms(trained, grads, n_layers).sqrt()
        hit = clip_(trained, grads, clip, clip_value)
        if backend.masks(opt):
            backend.apply(trained, [torch.where(finite, g, 0.0) for g in grads], opt, deltas)
        elif bool(finite):
            backend.apply(trained, grads, opt, deltas)
        steps.append(torch.cat([loss.detach().double().reshape(1), norms, hit.double(), finite.double().reshape(1)]))
    model.eval()
    return _log(method, lr, clip, clip_value, steps, n_layers), deltas


def _log(method, lr, clip, clip_value, steps: list[torch.Tensor], n_layers: int) -> FTLog:
    """The job's log from its per-step device rows [loss, norms (L), clipped (L), finite]."""
    log = FTLog(method, lr, clip, clip_value, steps=len(steps))
    for row in (torch.stack(steps).cpu().tolist() if steps else []):
        if not row[-1]:   # counted and reported, never silent
            log.skipped += 1
            log.losses.append(float("nan"))
            log.grad_norms.append([float("nan")] * n_layers)
            log.clipped.append([])
            continue
        log.losses.append(row[0])
        log.grad_norms.append(row[1:1 + n_layers])
        log.clipped.append([i for i, h in enumerate(row[1 + n_layers:1 + 2 * n_layers]) if h])
    return log


@contextmanager
def restored(trained: list[Trained], backend=None):
    """Run a block that may finetune the model; θ0 of the trained parameters comes back after."""
    backend = backend or TorchBackend()
    saved = backend.full(trained)
    try:
        yield
    finally:
        backend.restore(trained, saved)


def clipping(finetune_cfg, setting: str) -> tuple[str, float]:
    """(mode, value) that clip a setting: the finetune.* fields its registry entry names."""
    mode, value = SETTINGS[setting].clip
    return getattr(finetune_cfg, mode), getattr(finetune_cfg, value)


def finetuned_scorer(model, trained: list[Trained], deltas, setting: str, prefix_ids):
    """What the finetuned model scores through after `prefix_ids`: the linearized model's dual
    pass, or the model itself with the prefix cached."""
    from icl_scale.methods.evaluate import PrefixCache
    from icl_scale.methods.linearized import LinearizedForward

    if SETTINGS[setting].linearized:
        return LinearizedForward(model, trained, deltas, prefix_ids)
    return PrefixCache(model, prefix_ids)
