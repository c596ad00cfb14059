"""Finetuning under DeepSpeed ZeRO through accelerate: the same results as plain PyTorch on one
process — records, FT logs and the trained weights after FT — for ZeRO-2, ZeRO-2 with optimizer
offload and ZeRO-3 with parameter and optimizer offload, on 1 and 2 launched processes (world size
asserted). 5 eval examples on 2 ranks: uneven shares, so ZeRO-3's lockstep padding runs."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import globbed, launch, run_cli
from helpers import assert_same_records, run_records

ARGS = ["run", "--model.name", "tiny-llama", "--data.tasks", "cb,sst2", "--data.k", "6", "--data.eval_max", "5",
        "--eval.methods", "ft,ft_lc,ft_lin", "--model.max_length", "1500", "--finetune.clip", "layer_l2",
        "--finetune.clip_value", "0.5", "--output.save_ft_weights", "true",
        "--finetune.lr_search", "true", "--finetune.lr_select", "setting", "--finetune.lr_grid", "0.5,2",
        "--finetune.lr_dev_size", "3"]


def args(tmp, data_dir, *extra):
    return ARGS + ["--data.data_dir", str(data_dir), "--output.run_dir", str(tmp / "run"),
                   "--output.report_dir", str(tmp / "reports"), *extra]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, data_dir):
    """One-process plain PyTorch runs, per optimizer."""
    runs = {}

    def get(optimizer):
        if optimizer not in runs:
            tmp = tmp_path_factory.mktemp(f"plain-{optimizer}")
            r = run_cli(args(tmp, data_dir, "--finetune.optimizer", optimizer), env={"CUDA_VISIBLE_DEVICES": ""})
            assert r.returncode == 0, r.stderr
            runs[optimizer] = tmp / "run"
        return runs[optimizer]
    return get


@pytest.mark.parametrize("ds, nproc, optimizer", [
    ("", 2, "sgd"),                  # plain PyTorch on every rank
    ("zero2", 2, "sgd"),
    ("zero2_offload", 2, "sgd"),
    ("zero2", 1, "adamw"),
    ("zero3_offload", 2, "sgd"),
    ("zero3_offload", 1, "adamw"),
])
def test_finetuning_does_not_depend_on_zero_stage_or_world_size(plain, tmp_path, data_dir, ds, nproc, optimizer):
    ref = plain(optimizer)
    extra = ["--finetune.optimizer", optimizer] + (["--finetune.deepspeed", f"ds_configs/{ds}.json"] if ds else [])
    r = launch(args(tmp_path, data_dir, *extra), nproc=nproc)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "shards/cb/ft/seed1/manifest-r0.json").read_text())
    assert manifest["world_size"] == nproc
    assert_same_finetuning(ref, run_dir, optimizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("ds", ["", "zero2", "zero2_offload", "zero3_offload"])
def test_finetuning_on_gpu_matches_cpu(plain, tmp_path, data_dir, ds):
    """One GPU process, plain or under each ZeRO config, against the plain CPU run."""
    extra = ["--finetune.deepspeed", f"ds_configs/{ds}.json"] if ds else []
    r = launch(args(tmp_path, data_dir, *extra), nproc=1, gpu=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    invocation = json.loads(next((tmp_path / "run" / "invocations").glob("*.json")).read_text())
    assert invocation["device"].startswith("cuda"), invocation["device"]
    assert_same_finetuning(plain("sgd"), tmp_path / "run", "sgd")


@pytest.mark.parametrize("untrained", [False, True])
def test_zero3_loads_a_checkpoint_partitioned_with_the_same_results(checkpoint, tmp_path, data_dir, untrained):
    """Under ZeRO-3 each rank loads only its share of a checkpoint (zero.Init); the untrained
    control re-initialises the gathered blocks. Results equal a whole-model plain run."""
    extra = ["--model.name", str(checkpoint), "--model.untrained", str(untrained).lower()]
    r = run_cli(args(tmp_path / "plain", data_dir, *extra), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(args(tmp_path / "zero3", data_dir, *extra, "--finetune.deepspeed", "ds_configs/zero3_offload.json"),
               nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    invocation = json.loads(next((tmp_path / "zero3/run/invocations").glob("*.json")).read_text())
    assert invocation["world_size"] == 2 and invocation["deepspeed"]["partitioned_at_load"] is True
    assert_same_finetuning(tmp_path / "plain/run", tmp_path / "zero3/run", "sgd")


@pytest.mark.parametrize("ds", ["", "zero2", "zero3_offload"])
def test_xglm_finetuning_on_two_processes_matches_one(tmp_path, data_dir, ds):
    """The papers' architecture (capture through its own projections): plain PyTorch on two
    processes and ZeRO-2 / ZeRO-3 with offload on two give the one-process plain results."""
    xglm = ["--model.name", "tiny-xglm"]
    r = run_cli(args(tmp_path / "plain", data_dir, *xglm), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    extra = ["--finetune.deepspeed", f"ds_configs/{ds}.json"] if ds else []
    r = launch(args(tmp_path / "two", data_dir, *xglm, *extra), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(next((tmp_path / "two/run/invocations").glob("*.json")).read_text())["world_size"] == 2
    assert_same_finetuning(tmp_path / "plain/run", tmp_path / "two/run", "sgd", n_weights=2 * 4)


def test_automatic_batch_size_in_zero3_lockstep(plain, tmp_path, data_dir):
    """ZeRO-3 runs every forward as a collective: the automatic batch size is probed by every rank
    at every size and agreed (the ranks' smallest), so the lockstep holds; the records equal the
    batch-1 plain run to float rounding."""
    r = launch(args(tmp_path, data_dir, "--finetune.deepspeed", "ds_configs/zero3_offload.json",
                    "--eval.batch_size", "0", "--eval.max_batch", "4"), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for job in globbed(tmp_path / "run", "shards/*/*/seed1"):
        sizes = {json.loads((job / f"manifest-r{k}.json").read_text())["batch_size"] for k in (0, 1)}
        assert len(sizes) == 1 and sizes <= {1, 2, 4}, job
    assert_same_finetuning(plain("sgd"), tmp_path / "run", "sgd")


def assert_same_finetuning(ref, run_dir, optimizer, n_weights=3 * 2):
    """Records, FT logs and the trained k/v weights of two runs agree."""
    # records are fp16: a 1e-9 difference in fp32 can move one value by one fp16 step
    assert_same_records(run_records(ref), run_records(run_dir), rtol=2**-10)
    # Adam divides by √v: where a gradient element is near its ε (1e-8), summation-order rounding
    # of 1e-12 moves that element's step by up to ~1e-3 · lr (the CB rate is 0.08), and later steps
    # see it
    atol = 1e-5 if optimizer == "sgd" else 1e-4
    steps = []
    for log in globbed(ref, "ft/*/*/seed1.json"):
        a, b = json.loads(log.read_text()), json.loads((run_dir / log.relative_to(ref)).read_text())
        # one fp32 ulp on a loss of ~16 is 2e-6: hence rel as well as abs
        assert a["losses"] == pytest.approx(b["losses"], rel=2**-22, abs=atol / 10) and a["steps"] == b["steps"]
        assert np.allclose(a["grad_norms"], b["grad_norms"], atol=atol / 10)
        steps.append(a["steps"])
        wa = load_file(log.with_suffix(".safetensors"))
        wb = load_file((run_dir / log.relative_to(ref)).with_suffix(".safetensors"))
        assert wa.keys() == wb.keys() and len(wa) == n_weights   # k and v (weights, biases) of every layer
        for name in wa:
            assert wb[name].shape == wa[name].shape
            assert np.allclose(wa[name].numpy(), wb[name].numpy(), atol=atol, rtol=0), (log, name)
    assert len(steps) == 6 and max(steps) > 1
    # the learning-rate search (each FT setting its own) chose the same rates from the same dev scores
    for task in ("cb", "sst2"):
        a, b = (json.loads((r / "lr_search" / f"{task}.json").read_text()) for r in (ref, run_dir))
        assert a["rates"] == b["rates"] and set(a["rates"]) == {"ft", "ft_lc", "ft_lin"}
        for setting, sa in a["searches"].items():
            for ga, gb in zip(sa["grid"], b["searches"][setting]["grid"]):
                assert ga["dev_correct"] == gb["dev_correct"] and ga["finite"] == gb["finite"]
                assert ga["final_loss"] == pytest.approx(gb["final_loss"], rel=1e-5, abs=atol)


@pytest.mark.parametrize("content, message", [
    ('{"zero_optimization": {"stage": 2}', "not valid JSON"),
    ('{"zero_optimisation": {"stage": 2}}', "unknown key 'zero_optimisation'"),
    ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage 4 is not one of 0, 1, 2, 3"),
    ('[1, 2]', "not a JSON object"),
])
def test_bad_deepspeed_config(tmp_path, data_dir, content, message):
    bad = tmp_path / "ds.json"
    bad.write_text(content)
    r = run_cli(args(tmp_path, data_dir, "--finetune.deepspeed", str(bad)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and "ds.json" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
