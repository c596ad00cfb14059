"""The finetuning loop shared by every finetuning setting: batch 1, one epoch over the
demonstrations in order, the per-task learning rate, the setting's loss (methods/losses.py),
gradient clipping, and what is recorded per step (loss, per-layer L2 norm of the trained
parameters' gradient before clipping, skipped steps). The backend (methods/backend.py) runs the
backward and the update.

Finetuning changes the model in place; `restored()` puts θ0 back after the job's evaluation.
"""

from __future__ import annotations

import math
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


def _layer_norms(trained: list[Trained], grads: list[torch.Tensor], n_layers: int) -> list[float]:
    sq = [0.0] * n_layers
    for t, g in zip(trained, grads):
        if t.layer >= 0:
            sq[t.layer] += float(g.double().pow(2).sum())
    return [math.sqrt(v) for v in sq]


def clip_(trained: list[Trained], grads: list[torch.Tensor], how: str, value: float) -> list[int]:
    """Clip in place (settings.CLIP_MODES); returns the layers the clip changed (all trained
    layers when one factor scales the whole gradient), for how often each bound binds."""
    if how == "none":
        return []
    layers = sorted({t.layer for t in trained if t.layer >= 0})
    if how == "elem_clamp":
        hit = set()
        for t, g in zip(trained, grads):
            if bool((g.abs() > value).any()):
                hit.add(t.layer)
                g.clamp_(-value, value)
        return sorted(hit & set(layers))
    if how == "linf_rescale":
        top = max(float(g.abs().max()) for g in grads)
        if top <= value:
            return []
        for g in grads:
            g.mul_(value / top)
        return layers
    groups: dict[int, list[torch.Tensor]] = {}
    for t, g in zip(trained, grads):
        groups.setdefault(-1 if how == "global_l2" else t.layer, []).append(g)
    hit = []
    for layer, gs in groups.items():
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gs))
        if norm > value:
            hit.append(layer)
            for g in gs:
                g.mul_(value / norm)
    if how == "global_l2":
        return layers if hit else []
    return sorted(h for h in hit if h >= 0)


def finetune(model, method: str, trained: list[Trained], sequences: list[list[int]], lr: float,
             optimizer: str = "sgd", clip: str = "none", clip_value: float = 1.0, backend=None):
    """Run one FT setting (`method`, a name of settings.py); returns (log, deltas) — δ for the
    linearized model, else None. `backend` runs backward and the update: plain PyTorch by default."""
    backend = backend or TorchBackend()
    setting = SETTINGS[method]
    loss_of = LOSSES[setting.loss]
    log = FTLog(method, lr, clip, clip_value)
    n_layers = model.config.num_hidden_layers
    deltas = ([torch.zeros(full_shape(t.param), dtype=t.param.dtype, device=model.device) for t in trained]
              if setting.linearized else None)
    opt = backend.optimizer(optimizer, lr, trained, deltas)
    model.train()  # dropout is 0 everywhere; train mode only for modules that care
    for seq in sequences:
        ids = torch.tensor([seq], device=model.device)
        loss = loss_of(model, ids, trained, deltas)
        grads = backend.grads(loss, trained)  # masked to k/v parts by the parameter hooks
        log.steps += 1
        if not torch.isfinite(loss) or not all(torch.isfinite(g).all() for g in grads):
            log.skipped += 1   # counted and reported, never silent
            log.losses.append(float("nan"))
            log.grad_norms.append([float("nan")] * n_layers)
            log.clipped.append([])
            continue
        log.losses.append(float(loss.detach()))
        log.grad_norms.append(_layer_norms(trained, grads, n_layers))
        log.clipped.append(clip_(trained, grads, clip, clip_value))
        backend.apply(trained, grads, opt, deltas)
    model.eval()
    return log, deltas


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
