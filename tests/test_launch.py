"""Real `accelerate launch` runs: world-size invariance and kill/resume equivalence."""

import json
import os
import signal
import time

import psutil
import pytest

from conftest import globbed, launch, run_cli
from helpers import assert_same_records, run_records


def args(run_dir, data_dir, *extra):
    return ["run", "--model.name", "tiny-llama", "--data.tasks", "sst2,agnews,cb", "--data.k", "8",
            "--eval.methods", "zsl,icl,ft,ft_lc,ft_lin",
            "--data.eval_max", "12", "--model.max_length", "1500", "--data.data_dir", str(data_dir),
            "--finetune.lr_search", "true", "--finetune.lr_grid", "0.3,1,3", "--finetune.lr_dev_size", "6",
            "--output.run_dir", str(run_dir), "--output.report_dir", str(run_dir.parent / "reports"), *extra]


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    r = launch(args(run_dir, data_dir), nproc=1)
    assert r.returncode == 0, r.stdout + r.stderr
    return run_dir


def test_two_processes_match_one(one_proc, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    r = launch(args(run_dir, data_dir), nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    # the launch really started two ranks and each wrote its share
    manifests = sorted(run_dir.glob("shards/cb/icl/seed1/manifest-r*.json"))
    assert [json.loads(m.read_text())["world_size"] for m in manifests] == [2, 2]
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]
    assert_same_records(run_records(one_proc), run_records(run_dir))
    for log in globbed(one_proc, "ft/*/*/seed1.json"):  # finetuning does not depend on the world size
        assert log.read_text() == (run_dir / log.relative_to(one_proc)).read_text()
    # nor does the learning-rate search: every grid point and the choice, byte for byte
    for path in globbed(one_proc, "lr_search/**/*.json"):
        assert path.read_text() == (run_dir / path.relative_to(one_proc)).read_text(), path
    # the same figures; only the provenance (world size, wall times) differs
    two, one = run_dir.parent / "reports" / "run", one_proc.parent / "reports" / "run"
    assert (two / "metrics.csv").read_text() == (one / "metrics.csv").read_text()
    body = lambda p: p.read_text().split("## Provenance")[0]   # noqa: E731
    assert body(two / "report.md") == body(one / "report.md")
    assert "World size: 2" in (two / "report.md").read_text() and "World size: 1" in (one / "report.md").read_text()


def test_kill_and_rerun_equals_uninterrupted(one_proc, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    a = args(run_dir, data_dir, "--output.shard_mb", "0.001")
    proc = launch(a, nproc=2, popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(run_dir.glob("shards/agnews/zsl/seed1/r*.safetensors"))) < 2:
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)   # the launcher's group; the ranks run in sessions of their own
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=30)
    assert not alive, f"ranks outlived their launcher: {alive}"
    assert not (run_dir.parent / "reports" / "run").exists(), "the run finished before it was killed"
    r = launch(a, nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_records(run_records(one_proc), run_records(run_dir))


def test_changed_config_on_resume_names_fields(one_proc, data_dir):
    before = {p: p.read_bytes() for p in one_proc.rglob("*") if p.is_file() and "logs" not in p.parts}
    r = run_cli(args(one_proc, data_dir, "--data.k", "4", "--eval.record_position", "answer"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.k, eval.record_position differ" in lines[0]
    # two ranks: the launch fails with the same line and writes nothing either
    r = launch(args(one_proc, data_dir, "--data.k", "4"), nproc=2, timeout=300)
    assert r.returncode != 0 and "icl-scale: error: run dir" in r.stderr and "data.k differ" in r.stderr
    after = {p: p.read_bytes() for p in one_proc.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert after == before


def test_report_is_a_function_of_the_run_dir(one_proc, tmp_path):
    r = run_cli(["report", str(one_proc), "--report-dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr
    made, first = tmp_path / "run", one_proc.parent / "reports" / "run"
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())   # noqa: E731
    names = files(made)
    assert names == files(first)
    assert {"report.md", "metrics.csv", "results.json", "sst2_grad_norms.png", "cb_layers.png", "examples.csv",
            "examples/cb.md"} <= set(names)
    for name in names:
        assert (made / name).read_bytes() == (first / name).read_bytes(), name
    text = (made / "report.md").read_text()
    assert "linearized FT accuracy" in text and "## Linearized FT" in text
    # 3 tasks × 3 FT methods × their fitted demonstrations, one step each
    steps = sum(3 * json.loads((one_proc / "jobs" / t / "seed1.json").read_text())["k_effective"]
                for t in ("sst2", "agnews", "cb"))
    assert f"clipping: none; {steps} steps, 0 skipped" in text
