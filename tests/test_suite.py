"""`icl-scale suite`: every variant in one launch, resumable after a rank is killed, tolerant of one
failing job; presets."""

import json
import os
import signal
import time

import psutil
import pytest

from conftest import globbed, launch, run_cli
from helpers import assert_same_records, run_records
from icl_scale import config as C


def suite_args(root, data_dir, *extra):
    return ["suite", "--preset", "smoke", "--data.data_dir", str(data_dir), "--data.eval_max", "5",
            "--output.run_dir", str(root / "runs" / "smoke"), "--output.report_dir", str(root / "reports"),
            "--output.shard_mb", "0.002", *extra]


def report_files(root):
    """Every file of the suite's reports whose content is a function of the results alone."""
    out = {}
    base = root / "reports" / "smoke"
    for p in globbed(base, "**/*"):
        if p.suffix == ".json":   # all but where the run and its reports were
            results = json.loads(p.read_text())
            results["config"].pop("output")
            out[str(p.relative_to(base))] = results | {"run_dir": None}
        elif p.suffix in (".csv", ".png") or p == base / "report.md":
            out[str(p.relative_to(base))] = p.read_bytes()
        elif p.name == "report.md":   # a variant's report: all but its provenance (wall times, world size)
            out[str(p.relative_to(base))] = p.read_text().split("## Provenance")[0].encode()
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("clean")
    r = launch(suite_args(root, data_dir), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root


def test_suite_runs_every_variant_and_reports_them(clean):
    runs = clean / "runs" / "smoke"
    assert sorted(p.name for p in runs.iterdir()) == ["base", "label_switch", "untrained"]
    assert json.loads((runs / "label_switch" / "config.json").read_text())["config"]["data"]["label_noise"] == 0.5
    assert json.loads((runs / "untrained" / "config.json").read_text())["config"]["model"]["untrained"] is True
    meta = json.loads((runs / "label_switch" / "jobs" / "sst2" / "seed1.json").read_text())
    assert len(meta["corrupted_demo_ids"]) == 2   # half of k=4
    text = (clean / "reports" / "smoke" / "report.md").read_text()
    for title in ("# Base (`base`)", "# Label switching (`label_switch`)", "# Untrained-model control (`untrained`)",
                  "## Layer-causal FT with clipping", "## Linearized FT"):
        assert title in text
    # the variants side by side: each cell the task average of that variant's metrics.csv
    side = text.split("# Variants side by side")[1].split("\n# ")[0]
    rows = {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ")[1:]
            for line in side.splitlines() if line.startswith("| ") and not line.startswith("| metric")}
    for row, key in (("ICL accuracy", "acc/icl"), ("SimAOU (FT)", "simaou/ft"), ("SimAM (after FT)", "simam/ft")):
        for variant, shown in zip(("base", "label_switch", "untrained"), rows[row]):
            lines = [l.split(",") for l in (clean / "reports" / "smoke" / variant / "metrics.csv").read_text().splitlines()]
            values = [float(l[4]) for l in lines if l[1] == "all" and l[2] == key and l[3] == "mean" and l[4]]
            assert float(shown) == pytest.approx(sum(values) / len(values), abs=1e-4), (row, variant)
    # overall progress: every rank's counts add up to every example of every setting
    for variant in ("base", "untrained"):
        counts = [json.loads((runs / variant / "progress" / f"r{r}.json").read_text()) for r in (0, 1)]
        assert sum(c["done"] for c in counts) == 2 * 6 * 5 and {c["jobs_done"] for c in counts} == {12}


def test_suite_under_zero3_loads_every_variant_partitioned(clean, checkpoint, tmp_path, data_dir):
    """A suite's runs share one process group; each ZeRO-3 run loads the checkpoint partitioned
    (the untrained control too) and gives the records of the plain suite on the same weights."""
    r = launch(suite_args(tmp_path, data_dir, "--model.name", str(checkpoint),
                          "--finetune.deepspeed", "ds_configs/zero3_offload.json"), nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for variant in ("base", "label_switch", "untrained"):
        run_dir = tmp_path / "runs" / "smoke" / variant
        invocation = json.loads(next((run_dir / "invocations").glob("*.json")).read_text())
        assert invocation["deepspeed"]["partitioned_at_load"] is True, variant
        assert_same_records(run_records(clean / "runs" / "smoke" / variant), run_records(run_dir), rtol=2**-10)


def test_kill_one_rank_mid_suite_then_rerun_gives_the_clean_report(clean, tmp_path, data_dir):
    args = suite_args(tmp_path, data_dir)
    proc = launch(args, nproc=2, popen=True)
    target = tmp_path / "runs" / "smoke" / "label_switch" / "shards"
    deadline = time.time() + 600
    while time.time() < deadline and len(list(target.rglob("r1-*.safetensors"))) < 2:
        time.sleep(0.05)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if p.environ().get("LOCAL_RANK") == "1" and "icl_scale" in " ".join(p.cmdline())]
    assert ranks, "rank 1 not found (did the suite finish before the kill?)"
    os.kill(ranks[0].pid, signal.SIGKILL)
    proc.communicate(timeout=300)   # read its output: a full pipe would block the launcher
    assert proc.returncode != 0
    assert not (tmp_path / "reports" / "smoke" / "report.md").exists(), "the suite finished before the kill"
    r = launch(args, nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert report_files(tmp_path) == report_files(clean)


FAULT = """
import icl_scale.run as R
plain = R.run_setting
def failing(cfg, model, trained, job, setting, *args, **kwargs):
    if (job.task, setting, job.seed) == ("cb", "ft_lc", 1):
        raise RuntimeError("injected failure of cb/ft_lc/1 (as an out-of-memory would)")
    return plain(cfg, model, trained, job, setting, *args, **kwargs)
R.run_setting = failing
"""


def test_one_failing_job_is_reported_and_the_rest_run(tmp_path, data_dir):
    args = ["run", "--preset", "smoke", "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp_path / "run"),
            "--output.report_dir", str(tmp_path / "reports")]
    r = run_cli(args, prelude=FAULT)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "reports" / "run"
    text = (out / "report.md").read_text()
    assert "## Failed jobs" in text and "| cb | 1 | layer-causal FT | 0 | RuntimeError: injected failure" in text
    row = next(line for line in text.splitlines() if line.startswith("| layer-causal FT accuracy |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]   # metric, sst2, cb, average
    assert cells[2] == "failed" and cells[1] not in ("failed", "–")
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"]["cb"]["failed"] == {"ft_lc": [1]}
    assert "acc/ft" in results["tasks"]["cb"]["summary"] and "acc/ft_lc" not in results["tasks"]["cb"]["summary"]
    # the same command without the fault retries the failed job only, and the report is whole
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "run" / "failures").rglob("*.json"))
    results = json.loads((out / "results.json").read_text())
    assert "acc/ft_lc" in results["tasks"]["cb"]["summary"] and "## Failed jobs" not in (out / "report.md").read_text()
    clean = tmp_path / "clean"
    r = run_cli(["run", "--preset", "smoke", "--data.data_dir", str(data_dir), "--output.run_dir", str(clean / "run"),
                 "--output.report_dir", str(clean / "reports")])
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.csv").read_text() == (clean / "reports" / "run" / "metrics.csv").read_text()


def test_presets():
    paper = C.load(None, {}, "paper")
    assert paper.data.k == 32 and paper.data.seeds == (1, 2, 3) and len(paper.data.tasks) == 6
    assert set(paper.eval.methods) == {"zsl", "icl", "ft", "ft_lc", "ft_lc_clip", "ft_lin"}
    assert paper.suite.variants == ("base", "label_switch", "untrained") and paper.finetune.lrs == ()
    # the revisited paper's Table 3 run clipped each layer's L2 norm at 12; rates selected on a dev split
    assert (paper.finetune.lc_clip, paper.finetune.lc_clip_value, paper.finetune.lr_search) == ("layer_l2", 12.0, True)
    ref = C.load(None, {}, "reference")
    assert ref.eval.record_position == "answer" and ref.finetune.demos == "all" and ref.finetune.lc_clip == "global_l2"
    assert not ref.finetune.lr_search
    reference_grid = {"sst2": (2, 3, 4), "sst5": (5, 6, 7), "mr": (5, 6, 7), "subj": (4, 5, 6), "agnews": (3, 4, 5),
                      "cb": (3, 4, 5)}
    assert {t: C.seeds_for(ref, t) for t in ref.data.tasks} == reference_grid
    # options override the preset
    assert C.load(None, {"data.seeds": "4"}, "paper").data.seeds == (4,)
