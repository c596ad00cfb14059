"""Finetuning under DeepSpeed ZeRO through accelerate: the same results as plain PyTorch on one
process, with 2 launched processes (world size asserted)."""

import json

import numpy as np
import pytest

from conftest import launch, run_cli
from helpers import assert_same_records, run_records

ARGS = ["run", "--model.name", "tiny-llama", "--data.tasks", "cb,sst2", "--data.k", "6", "--data.eval_max", "4",
        "--eval.methods", "ft,ft_lc,ft_lin", "--model.max_length", "1500", "--finetune.clip", "layer_l2",
        "--finetune.clip_value", "0.5"]


def args(tmp, data_dir, *extra):
    return ARGS + ["--data.data_dir", str(data_dir), "--output.run_dir", str(tmp / "run"),
                   "--output.report_dir", str(tmp / "reports"), *extra]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("plain")
    r = run_cli(args(tmp, data_dir))
    assert r.returncode == 0, r.stderr
    return tmp / "run"


@pytest.mark.parametrize("ds", ["zero2", "zero2_offload"])
def test_zero2_on_two_processes_matches_plain_pytorch(plain, tmp_path, data_dir, ds):
    r = launch(args(tmp_path, data_dir, "--finetune.deepspeed", f"ds_configs/{ds}.json"), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "shards/cb/ft/seed1/manifest-r1.json").read_text())["world_size"] == 2
    assert_same_records(run_records(plain), run_records(run_dir))
    steps = []
    for log in sorted(plain.glob("ft/*/*/seed1.json")):
        a, b = json.loads(log.read_text()), json.loads((run_dir / log.relative_to(plain)).read_text())
        assert a["losses"] == pytest.approx(b["losses"], abs=1e-6) and a["steps"] == b["steps"]
        assert np.allclose(a["grad_norms"], b["grad_norms"], atol=1e-6)
        steps.append(a["steps"])
    assert len(steps) == 6 and max(steps) > 1


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 2}', "not valid JSON"),
    ('{"zero_optimisation": {"stage": 2}}', "unknown key 'zero_optimisation'"),
    ('{"zero_optimization": {"stage": 3}}', "ZeRO stage 3 is not supported"),
])
def test_bad_deepspeed_config(tmp_path, data_dir, content, message):
    bad = tmp_path / "ds.json"
    bad.write_text(content)
    r = run_cli(args(tmp_path, data_dir, "--finetune.deepspeed", str(bad)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "ds.json" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
