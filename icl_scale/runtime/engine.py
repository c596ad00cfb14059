"""Where finetuning steps run: plain PyTorch on every rank, or a DeepSpeed ZeRO engine prepared by
accelerate from a `ds_configs/*.json` file.

Both see the same data on every rank (batch 1), so a step's gradient is the same whatever the
world size: DeepSpeed averages identical gradients. Both hand the loop full, unpartitioned
gradients of the trained parameters (for per-layer norms and every clipping mode) and take back
the clipped ones.

Under ZeRO-3 every parameter is partitioned over the ranks and gathered inside each module's
forward, so every forward is a collective: the ranks must run the same forwards in lockstep
(`lockstep`), evaluation included (run.py pads the shorter shares).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from icl_scale.errors import UserError
from icl_scale.modeling.params import full_shape

DS_KEYS = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
           "zero_force_ds_cpu_optimizer", "zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown",
           "zero_allow_untested_optimizer"}


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

    def apply(self, trained, grads, opt_targets, opt):
        for x, g in zip(opt_targets, grads):
            x.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    def full(self, trained) -> list[torch.Tensor]:
        """Copies of the trained parameters, whole."""
        return [t.param.detach().clone() for t in trained]

    def restore(self, trained, saved):
        with torch.no_grad():
            for t, s in zip(trained, saved):
                t.param.copy_(s)


def read_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config field finetune.deepspeed: {path} not found")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"DeepSpeed config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path}: not a JSON object")
    unknown = sorted(set(cfg) - DS_KEYS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown key {unknown[0]!r}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config {path}: zero_optimization.stage {stage!r} is not one of 0, 1, 2, 3")
    return cfg


def _identity_jvp(ctx, *tangents):
    return tangents[0] if len(tangents) == 1 else tangents


_accelerator: tuple[str, object] | None = None   # (config path, Accelerator) of this process


def deepspeed_accelerator(path: str):
    """The Accelerator of a DeepSpeed run, made before the model is loaded: under ZeRO-3 it keeps
    transformers' DeepSpeed config alive, so a checkpoint loads partitioned (zero.Init: each rank
    keeps its share, never the whole model). accelerate allows one per process: a suite's runs,
    which share the finetuning config, share it."""
    global _accelerator
    if _accelerator is None:
        _accelerator = (path, _new_accelerator(path))
    elif _accelerator[0] != path:
        raise UserError(f"finetune.deepspeed: one DeepSpeed config per launch ({_accelerator[0]}, then {path})")
    return _accelerator[1]


def _new_accelerator(path: str):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    cfg = read_ds_config(path)
    # fixed by the study: batch 1, no accumulation; clipping is ours (all three modes), fp32
    cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
               zero_force_ds_cpu_optimizer=False, bf16={"enabled": False}, fp16={"enabled": False})
    cfg.pop("train_batch_size", None)
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        # ZeRO-3's memory-efficient F.linear is an autograd Function without forward-mode AD
        cfg["zero_optimization"]["memory_efficient_linear"] = False
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29533")):
        os.environ.setdefault(key, value)  # a plain one-process run: no MPI discovery
    # accelerate skips DeepSpeed when ACCELERATE_USE_CPU is set, which CPU launches of several
    # processes need: the process group is up already, so hide the flag while the state is built
    cpu_flag = os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg, zero3_init_flag=True))
    finally:
        if cpu_flag is not None:
            os.environ["ACCELERATE_USE_CPU"] = cpu_flag


@contextmanager
def loading(accelerator, partitioned: bool):
    """The context a model is loaded in. Transformers loads partitioned (zero.Init) while a ZeRO-3
    config is registered with it: kept for a ZeRO-3 run's checkpoint, taken away otherwise (a
    previous run of a suite may have left one). A model built from a config is built whole, so
    its seeded initialisation is the same under every backend (zero.Init initialises by module)."""
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    if plugin is not None and plugin.zero_stage == 3 and partitioned:
        plugin.set_deepspeed_weakref()
    else:
        unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if plugin is not None:
            plugin.set_deepspeed_weakref()


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
            # ZeRO-3 wraps module outputs and inputs in autograd Functions that are identities in
            # value but have no jvp; the forward-mode pass of linearized FT goes through them
            for m in model.modules():
                for attr in ("pre_bwd_fn", "post_bwd_fn"):
                    fn = m.__dict__.get(attr)
                    if fn is not None:
                        fn.jvp = staticmethod(_identity_jvp)

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

    def apply(self, trained, grads, opt_targets, opt):
        from deepspeed.utils import safe_set_full_grad

        linearized = opt is not self.engine.optimizer   # δ is ours; θ0 must not move
        for t, g in zip(trained, grads):
            if self.lockstep:   # ZeRO-3 cuts the flat gradient into equal, padded partitions
                g = torch.nn.functional.pad(g.flatten(), (0, -g.numel() % self.accelerator.num_processes))
            safe_set_full_grad(t.param, g)
        if linearized:
            # a zero-rate engine step: the engine's own step is what clears its (possibly
            # offloaded) gradient buffers; zero_grad alone lets them accumulate
            rates = [group["lr"] for group in self.engine.optimizer.param_groups]
            for group in self.engine.optimizer.param_groups:
                group["lr"] = 0.0
            self.engine.step()
            for group, lr in zip(self.engine.optimizer.param_groups, rates):
                group["lr"] = lr
            TorchBackend.apply(self, trained, grads, opt_targets, opt)
        else:
            self.engine.step()

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
