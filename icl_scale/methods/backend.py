"""Where finetuning steps run: plain PyTorch, or a DeepSpeed ZeRO engine prepared by accelerate
(runtime/engine.py makes the Accelerator).

Both see the same data on every rank (batch 1), so a step's gradient is the same whatever the
world size: DeepSpeed averages identical gradients. Both hand the loop full, unpartitioned
gradients of the trained parameters (for per-layer norms and every clipping mode) and take back
the clipped ones. The loop tells `apply` when it steps a linearized model: then δ moves, θ0 not.

Under ZeRO-3 every parameter is partitioned over the ranks and gathered inside each module's
forward, so every forward is a collective: the ranks must run the same forwards in lockstep
(`lockstep`), evaluation included (run.py pads the shorter shares).
"""

from __future__ import annotations

import torch

from icl_scale.methods.linearized import allow_forward_ad_under_zero3
from icl_scale.modeling.params import full_shape


def make_optimizer(name: str, params, lr: float):
    if name == "sgd":  # plain SGD: no momentum, no weight decay
        return torch.optim.SGD(params, lr=lr, momentum=0.0, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class TorchBackend:
    lockstep = False      # every forward a collective (ZeRO-3)
    collective = False    # FT steps hold collectives (any DeepSpeed engine)

    def optimizer(self, name, lr, trained, deltas=None):
        """The optimizer of one job: over δ for the linearized model, else the trained parameters."""
        return make_optimizer(name, deltas if deltas is not None else [t.param for t in trained], lr)

    def grads(self, loss, trained):
        return list(torch.autograd.grad(loss, [t.param for t in trained]))

    def masks(self, opt) -> bool:
        """Whether a zero gradient is a skipped step (plain SGD), so a non-finite step can be
        skipped on the device; else the loop asks the host."""
        return type(opt) is torch.optim.SGD

    def apply(self, trained, grads, opt, deltas=None):
        """One update with the (clipped) gradients: of the trained parameters, or with `deltas`
        (the linearized model) of δ."""
        for x, g in zip(deltas if deltas is not None else [t.param for t in trained], grads):
            x.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    def resync(self, trained) -> None:
        """The model's weights were rewritten outside the optimizer (the untrained control's
        re-initialisation): nothing to do without an engine."""

    def full(self, trained) -> list[torch.Tensor]:
        """Copies of the trained parameters, whole."""
        return [t.param.detach().clone() for t in trained]

    def restore(self, trained, saved):
        with torch.no_grad():
            for t, s in zip(trained, saved):
                t.param.copy_(s)


class DeepSpeedBackend(TorchBackend):
    """One engine for the whole run, built before any forward (ZeRO-3 partitions the model, if
    zero.Init did not at load); per step: engine backward, full gradients out, clipped gradients
    back in, engine step."""

    def __init__(self, accelerator, model, trained, optimizer: str):
        self.accelerator = accelerator
        self.stage = accelerator.state.deepspeed_plugin.zero_stage
        self.lockstep = self.stage == 3
        self.collective = True
        opt = make_optimizer(optimizer, [t.param for t in trained], 1.0)
        self.engine, self.opt = self.accelerator.prepare(model, opt)
        if self.lockstep:
            allow_forward_ad_under_zero3(model)

    def optimizer(self, name, lr, trained, deltas=None):
        """The engine's optimizer with fresh state and this job's rate; linearized FT trains δ
        outside the engine with a plain one."""
        inner = self.engine.optimizer
        while hasattr(inner, "optimizer"):   # ZeRO wrapper(s) → the torch optimizer of the partitions
            inner = inner.optimizer
        inner.state.clear()   # per job: no Adam moments carried over
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return TorchBackend.optimizer(self, name, lr, trained, deltas) if deltas is not None else self.engine.optimizer

    def grads(self, loss, trained):
        from deepspeed.utils import safe_get_full_grad

        self.engine.backward(loss)
        out = []
        for t in trained:
            g = safe_get_full_grad(t.param).detach().clone().reshape(full_shape(t.param))
            out.append(g * t.mask if t.mask is not None else g)
        return out

    def masks(self, opt) -> bool:
        return False   # the engine steps its own state

    def apply(self, trained, grads, opt, deltas=None):
        from deepspeed.utils import safe_set_full_grad

        for t, g in zip(trained, grads):
            if self.lockstep:   # ZeRO-3 cuts the flat gradient into equal, padded partitions
                g = torch.nn.functional.pad(g.flatten(), (0, -g.numel() % self.accelerator.num_processes))
            safe_set_full_grad(t.param, g)
        if deltas is not None:   # δ is ours; θ0 must not move
            # a zero-rate engine step: the engine's own step is what clears its (possibly
            # offloaded) gradient buffers; zero_grad alone lets them accumulate
            rates = [group["lr"] for group in self.engine.optimizer.param_groups]
            for group in self.engine.optimizer.param_groups:
                group["lr"] = 0.0
            self.engine.step()
            for group, lr in zip(self.engine.optimizer.param_groups, rates):
                group["lr"] = lr
            TorchBackend.apply(self, trained, grads, opt, deltas)
        else:
            self.engine.step()

    def resync(self, trained) -> None:
        """The optimizer's fp32 master copies taken again from the model's (rewritten) weights."""
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            if self.lockstep:
                self.engine.empty_partition_cache()
                self.engine.optimizer.refresh_fp32_params()
            else:
                for t in trained:
                    safe_set_full_fp32_param(t.param, t.param.detach().clone())

    def full(self, trained) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        out = []
        for t in trained:
            p = safe_get_full_fp32_param(t.param)
            out.append((p if p is not None else t.param).detach().clone().reshape(full_shape(t.param)))
        return out

    def restore(self, trained, saved):
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            if not self.lockstep:
                for t, s in zip(trained, saved):
                    safe_set_full_fp32_param(t.param, s)   # the optimizer's master copy
                    t.param.copy_(s)
                return
            # ZeRO-3: the model's partitions, then the master copy refreshed from them. On a GPU the
            # last forward may have left prefetched parameters in flight, which cannot be gathered.
            self.engine.empty_partition_cache()
            with deepspeed.zero.GatheredParameters([t.param for t in trained], modifier_rank=0):
                for t, s in zip(trained, saved):
                    t.param.copy_(s)
            self.engine.optimizer.refresh_fp32_params()
