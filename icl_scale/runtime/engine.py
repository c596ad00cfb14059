"""What a launch sets up once: the process state, the DeepSpeed config of `finetune.deepspeed`
(read and checked once, before any work) and the Accelerator that prepares its engine.

The Accelerator is made before the model is loaded: under ZeRO-3 it keeps transformers' DeepSpeed
config alive, so a checkpoint loads partitioned (zero.Init: each rank keeps its share, never the
whole model). accelerate allows one per process: a suite's runs share it.
"""

from __future__ import annotations

import copy
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from icl_scale.errors import UserError
from icl_scale.runtime import dist

DS_KEYS = {"train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping",
           "zero_force_ds_cpu_optimizer", "zero_optimization", "bf16", "fp16", "steps_per_print", "wall_clock_breakdown",
           "zero_allow_untested_optimizer"}


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
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (0, 1, 2, 3):
        raise UserError(f"DeepSpeed config {path}: zero_optimization.stage {stage!r} is not one of 0, 1, 2, 3")
    _validate_sections(cfg, path)
    return cfg


def _validate_sections(cfg: dict, path: str) -> None:
    """The nested sections checked by DeepSpeed's own config models, before anything is written
    (DeepSpeed itself would stop inside the engine, after the run dir exists)."""
    import pydantic
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                       ("fp16", DeepSpeedFP16Config)):
        if key not in cfg:
            continue
        if not isinstance(cfg[key], dict):
            raise UserError(f"DeepSpeed config {path}: {key} must be a JSON object, not {json.dumps(cfg[key])}")
        try:   # "auto": accelerate fills it in from the model
            model(**{k: v for k, v in cfg[key].items() if v != "auto"})
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, (key, *err["loc"])))
            raise UserError(f"DeepSpeed config {path}: {where}: {err['msg']}") from None


@dataclass
class Process:
    state: object                      # accelerate's PartialState
    ds_file: str = ""                  # finetune.deepspeed of the launch
    ds_config: dict | None = None      # as read from ds_file
    _accelerator: object = None

    def accelerator(self, cfg, finetunes: bool):
        """The DeepSpeed Accelerator of the launch (made on first use) when the run has the
        launch's DeepSpeed config and finetunes; else None (plain PyTorch)."""
        if self.ds_config is None or not finetunes or not cfg.finetune.deepspeed:
            return None
        if self._accelerator is None:
            self._accelerator = _new_accelerator(self.ds_config)
        return self._accelerator

    def check(self, cfg) -> None:
        """A run of the launch finetunes under the launch's DeepSpeed config, or plainly (a sweep's
        model without one)."""
        if cfg.finetune.deepspeed not in ("", self.ds_file):
            raise UserError(f"finetune.deepspeed: one DeepSpeed config per launch ({self.ds_file or 'none'}, "
                            f"then {cfg.finetune.deepspeed})")


def prepare_process(cfg, ds_file: str | None = None) -> Process:
    """The process of a launch (`icl-scale run`, `suite` or `sweep`; `ds_file`: the launch's
    DeepSpeed config, by default finetune.deepspeed): a bad DeepSpeed JSON fails here, before any
    work; with one, the process state is DeepSpeed's from the start."""
    ds_file = cfg.finetune.deepspeed if ds_file is None else ds_file
    ds_config = read_ds_config(ds_file) if ds_file else None
    if ds_config is not None:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    return Process(dist.init_state(), ds_file, ds_config)


def _new_accelerator(ds_config: dict):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    cfg = copy.deepcopy(ds_config)
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


