"""Every config file in the repository loads: launcher YAMLs through accelerate's own loader,
DeepSpeed JSONs through DeepSpeed's config parser, run configs through ours."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, globbed
from icl_scale import config as C

LAUNCHERS = globbed(ROOT / "launcher", "*_*.yaml") + [ROOT / "launcher" / "multinode.yaml"]
DS = globbed(ROOT / "ds_configs", "*.json")


@pytest.mark.parametrize("path", sorted(set(LAUNCHERS)), ids=lambda p: p.name)
def test_launcher_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 2 and cfg.distributed_type.value == "MULTI_GPU"
    assert getattr(cfg, "mixed_precision", "no") in (None, "no")  # precision belongs in the DS JSON


@pytest.mark.parametrize("path", DS, ids=lambda p: p.name)
def test_deepspeed_configs_parse(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = json.loads(path.read_text())
    concrete = json.loads(json.dumps(raw).replace('"auto"', "1"))
    concrete["bf16"] = {"enabled": False}
    concrete["fp16"] = {"enabled": False}
    ds = DeepSpeedConfig(concrete)
    assert ds.zero_optimization_stage == raw["zero_optimization"]["stage"]
    assert raw["zero_force_ds_cpu_optimizer"] is False


def test_run_configs_load():
    for path in globbed(ROOT / "launcher", "default*.yaml"):
        cfg = C.load(str(path))
        assert set(cfg.data.tasks) == set(C.ALL_TASKS)
