"""Where finetuning steps run: plain PyTorch on every rank, or a DeepSpeed ZeRO engine prepared by
accelerate from a `ds_configs/*.json` file.

Both see the same data on every rank (batch 1), so a step's gradient is the same whatever the
world size: DeepSpeed averages identical gradients. Both hand the loop full, unpartitioned
gradients of the trained parameters (for per-layer norms and every clipping mode) and take back
the clipped ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from icl_scale.errors import UserError

DS_KEYS = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
           "zero_force_ds_cpu_optimizer", "zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown",
           "zero_allow_untested_optimizer"}


class TorchBackend:
    def grads(self, loss, trained):
        return list(torch.autograd.grad(loss, [t.param for t in trained]))

    def apply(self, trained, grads, opt_targets, opt):
        for x, g in zip(opt_targets, grads):
            x.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

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
    unknown = sorted(set(cfg) - DS_KEYS)
    if unknown:
        raise UserError(f"DeepSpeed config {path}: unknown key {unknown[0]!r}")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise UserError(f"DeepSpeed config {path}: ZeRO stage {stage} is not supported for finetuning yet (use 0-2)")
    return cfg


class DeepSpeedBackend:
    """One engine for the whole run (built at the first finetuning job); per step: engine
    backward, full gradients out, clipped gradients back in, engine step."""

    def __init__(self, model, trained, path: str):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        cfg = read_ds_config(path)
        # fixed by the study: batch 1, no accumulation; clipping is ours (all three modes), fp32
        cfg.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, gradient_clipping=0.0,
                   zero_force_ds_cpu_optimizer=False, bf16={"enabled": False}, fp16={"enabled": False})
        cfg.pop("train_batch_size", None)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", "29533")):
            os.environ.setdefault(key, value)  # a plain one-process run: no MPI discovery
        # accelerate skips DeepSpeed when ACCELERATE_USE_CPU is set, which CPU launches of several
        # processes need: the process group is up already, so hide the flag while the state is built
        cpu_flag = os.environ.pop("ACCELERATE_USE_CPU", None)
        try:
            self.accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg))
        finally:
            if cpu_flag is not None:
                os.environ["ACCELERATE_USE_CPU"] = cpu_flag
        opt = torch.optim.SGD([t.param for t in trained], lr=1.0)
        self.engine, self.optimizer = self.accelerator.prepare(model, opt)

    def grads(self, loss, trained):
        from deepspeed.utils import safe_get_full_grad

        self.engine.backward(loss)
        out = []
        for t in trained:
            g = safe_get_full_grad(t.param).detach().clone()
            out.append(g * t.mask if t.mask is not None else g)
        return out

    def apply(self, trained, grads, opt_targets, opt):
        from deepspeed.utils import safe_set_full_grad

        linearized = opt_targets[0] is not trained[0].param   # δ is ours; θ0 must not move
        for t, g in zip(trained, grads):
            safe_set_full_grad(t.param, g)
        for group in self.engine.optimizer.param_groups:
            # a zero-rate step for the linearized model: the engine's own step is what clears its
            # (possibly offloaded) gradient buffers; zero_grad alone lets them accumulate
            group["lr"] = 0.0 if linearized else opt.param_groups[0]["lr"]
        self.engine.step()
        if linearized:
            TorchBackend.apply(self, trained, grads, opt_targets, opt)

    def restore(self, trained, saved):
        from deepspeed.utils import safe_set_full_fp32_param

        with torch.no_grad():
            for t, s in zip(trained, saved):
                safe_set_full_fp32_param(t.param, s)
                t.param.copy_(s)
