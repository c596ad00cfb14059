"""`icl-scale sweep`: models × k in one launch, a run dir per member, a failing model recorded
without taking the others down, the sweep report (tables, CSV, PNGs) with each figure's interval
against an independent computation, and kill / rerun giving the same report."""

import csv
import json
import math
import os
import signal
import time

import numpy as np
import pytest

from conftest import launch, run_cli

BASE = ["--data.tasks", "sst2", "--data.eval_max", "4", "--eval.methods", "zsl,icl,ft,ft_lin",
        "--model.max_length", "1500"]


def args(tmp, data_dir, models="tiny-llama,tiny-gpt2", ks="2,4", *extra):
    return ["sweep", *BASE, "--sweep.models", models, "--sweep.k", ks, "--data.data_dir", str(data_dir),
            "--output.run_dir", str(tmp / "sw"), "--output.report_dir", str(tmp / "reports"), *extra]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("sweep")
    r = launch(args(tmp, data_dir), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp


def test_sweep_runs_every_member_and_reports_figures_against_size_and_k(swept):
    members = json.loads((swept / "sw/sweep.json").read_text())["members"]
    assert [(m["model"], m["k"]) for m in members] == [("tiny-llama", 2), ("tiny-llama", 4), ("tiny-gpt2", 2),
                                                      ("tiny-gpt2", 4)]
    for m in members:   # a run of its own, with its own k, on two ranks
        cfg = json.loads((swept / "sw" / m["run_dir"] / "config.json").read_text())
        cfg = cfg.get("config", cfg)
        assert cfg["model"]["name"] == m["model"] and cfg["data"]["k"] == m["k"]
        assert json.loads((swept / "sw" / m["run_dir"] / "shards/sst2/icl/seed1/manifest-r1.json").read_text())[
            "world_size"] == 2
        assert (swept / "reports/sw" / m["run_dir"] / "report.md").is_file()
    report = (swept / "reports/sw/report.md").read_text()
    for title in ("## ICL accuracy", "## SimAOU excess over shuffled pairs (FT)", "## SimAM (before FT)"):
        assert title in report, title
    for png in ("acc_icl_vs_params.png", "acc_icl_vs_k.png", "simaou_ft_excess_vs_k.png"):
        assert (swept / "reports/sw" / png).stat().st_size > 1000 and f"]({png})" in report


def test_sweep_figures_equal_an_independent_computation(swept):
    """Each CSV row: the mean over tasks of the member's per-task means, and the interval from
    the per-task bootstrap intervals (normal approximation), recomputed from each member's
    results.json."""
    rows = list(csv.DictReader((swept / "reports/sw/metrics.csv").open()))
    assert {r["member"] for r in rows} == {"tiny-llama-k2", "tiny-llama-k4", "tiny-gpt2-k2", "tiny-gpt2-k4"}
    checked = 0
    for row in rows:
        res = json.loads((swept / "reports/sw" / row["member"] / "results.json").read_text())
        per_task = [t["summary"][row["figure"]] for t in res["tasks"].values() if row["figure"] in t["summary"]]
        per_task = [p for p in per_task if p["mean"] is not None]
        means = np.array([p["mean"] for p in per_task])
        assert float(row["mean"]) == pytest.approx(means.mean(), rel=1e-5, abs=1e-9)
        if row["ci_low"]:
            se = np.array([(p["ci"][1] - p["ci"][0]) / (2 * 1.959964) for p in per_task])
            half = 1.959964 * math.sqrt((se ** 2).sum()) / len(se)
            assert float(row["ci_low"]) == pytest.approx(means.mean() - half, rel=1e-5, abs=1e-9)
            assert float(row["ci_high"]) == pytest.approx(means.mean() + half, rel=1e-5, abs=1e-9)
            checked += 1
        assert int(row["parameters"]) > 0
    assert checked > 10


def test_failing_model_is_reported_and_the_others_finish(tmp_path, data_dir):
    r = run_cli(args(tmp_path, data_dir, "tiny-llama,no-such-model", "2"))
    assert r.returncode == 1 and "1 member(s) failed: no-such-model-k2" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "reports/sw/tiny-llama-k2/report.md").is_file()
    failure = json.loads((tmp_path / "sw/failures/no-such-model-k2.json").read_text())
    assert "unknown model 'no-such-model'" in failure["error"]
    report = (tmp_path / "reports/sw/report.md").read_text()
    assert "`no-such-model-k2`: failed: UserError: unknown model" in report and "| `tiny-llama` (" in report


def test_killed_sweep_rerun_gives_the_same_report(swept, tmp_path, data_dir):
    p = launch(args(tmp_path, data_dir), nproc=2, popen=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (tmp_path / "sw/tiny-gpt2-k2/shards").exists():
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)   # mid-way: two members done, the third started
    p.wait()
    assert not (tmp_path / "reports/sw/report.md").exists()
    r = run_cli(args(tmp_path, data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("report.md", "metrics.csv"):
        assert (tmp_path / "reports/sw" / name).read_text() == (swept / "reports/sw" / name).read_text(), name


@pytest.mark.parametrize("extra, message", [
    (["--sweep.k", "2,0"], "config field sweep.k"),
    (["--sweep.models", "tiny-llama=ds_configs/zero2.json,tiny-gpt2=ds_configs/zero3_offload.json"],
     "one per launch"),
    (["--sweep.models", "a/tiny-llama,b/tiny-llama"], "the same run dir name"),
])
def test_bad_sweep_input(tmp_path, data_dir, extra, message):
    r = run_cli(["sweep", *BASE, "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp_path / "sw"), *extra])
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "sw").exists()
