"""Learning-rate selection: the dev split, the choice, its records and the divergence flags."""

import json
import math

import pytest

from conftest import run_cli
from icl_scale import config as C
from icl_scale.plan import Job
from icl_scale.report.metrics import diverged
from icl_scale.runtime import rundir
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import dev_split, split_task


@pytest.mark.parametrize("task", ["sst2", "sst5", "mr", "subj", "agnews", "cb"])
def test_dev_split_is_disjoint_from_eval_and_every_seeds_demonstrations(data_dir, task):
    spec = get_task(task)
    src = load_source(spec, "offline", str(data_dir), "data")
    seeds, k = (1, 2, 3), 32
    dev = dev_split(spec, src, seeds, k, 64)
    ids = [r["id"] for r in dev]
    assert len(ids) == 64 == len(set(ids))
    train = {r["id"]: r for r in src.train}
    assert all(train[r["id"]] == r for r in dev)   # rows of train
    for seed in seeds:
        split = split_task(spec, src, seed, k, 10**6)
        if split.eval_from_train:   # else eval is another split: ids number its own rows
            assert not set(ids) & {r["id"] for r in split.eval_full}
        assert not set(ids) & {r["id"] for r in split.demos}
    # the same rows whichever order the seeds come in; a new seed can only take rows out
    assert [r["id"] for r in dev_split(spec, src, (3, 1, 2), k, 64)] == ids


def _job(task, seed, lr=0.1):
    return Job(task, seed, None, [], {}, [], lr, {}, dev_rows=[{"id": i} for i in range(4)])


def _record(run_dir, seed, index, multiple, correct, finite=True, h="h"):
    rundir.write_lr_point(run_dir, {"task": "sst2", "setting": "ft", "seed": seed, "index": index,
                                    "multiple": multiple, "lr": 0.1 * multiple, "dev_n": 4, "dev_correct": correct,
                                    "first_loss": 1.0, "final_loss": 0.5, "steps": 3, "skipped": 0,
                                    "finite": finite}, h)


def test_selection_pools_seeds_prefers_the_smaller_rate_and_skips_non_finite(tmp_path):
    from icl_scale.lr_search import select

    cfg = C.build(overrides={"finetune.lr_grid": "0.1,1,10", "eval.methods": "zsl,ft,ft_lin",
                             "finetune.lr_search": True})
    jobs = [_job("sst2", 1), _job("sst2", 2)]
    # pooled dev accuracy: ×0.1 → 5/8, ×1 → 5/8 (a tie: the smaller wins), ×10 → 8/8 but non-finite
    for seed, correct in ((1, (2, 4, 4)), (2, (3, 1, 4))):
        for i, m in enumerate((0.1, 1, 10)):
            _record(tmp_path, seed, i, m, correct[i], finite=not (m == 10 and seed == 2))
    out = select(cfg, jobs, tmp_path, "h")
    grid = out["searches"]["ft"]["grid"]
    assert [g["dev_correct"] for g in grid] == [5, 5, 8] and [g["finite"] for g in grid] == [True, True, False]
    assert math.isclose(out["searches"]["ft"]["chosen_lr"], 0.1 * 0.1)
    assert out["rates"] == {"ft": out["searches"]["ft"]["chosen_lr"], "ft_lin": out["searches"]["ft"]["chosen_lr"]}
    # a record of another config is not this run's: the point counts as missing
    _record(tmp_path, 2, 0, 0.1, 4, h="other")
    with pytest.raises(RuntimeError, match="grid point 0 has no record"):
        select(cfg, jobs, tmp_path, "h")


def test_divergence_flag():
    log = lambda losses, skipped=0: {"losses": losses, "skipped": skipped}   # noqa: E731
    assert not diverged(log([4.0, 3.0, 1.0]))
    assert diverged(log([4.0, 3.0, 4.5]))            # last above first
    assert diverged(log([4.0, float("nan")], 1))     # non-finite
    assert diverged(log([4.0, float("inf")]))
    assert not diverged(log([]))


def test_search_run_records_disjoint_dev_and_flags_a_diverged_run(tmp_path, data_dir):
    run_dir, reports = tmp_path / "run", tmp_path / "reports"
    common = ["--model.name", "tiny-llama", "--data.tasks", "sst2,cb", "--data.k", "6", "--data.eval_max", "6",
              "--data.seeds", "1,2", "--model.max_length", "1500", "--data.data_dir", str(data_dir),
              "--eval.methods", "zsl,icl,ft,ft_lin", "--finetune.lr_search", "true", "--finetune.lr_grid", "0.1,1",
              "--finetune.lr_dev_size", "8", "--finetune.lrs", "sst2=1e4",   # sst2: every rate of the grid blows up
              "--output.run_dir", str(run_dir), "--output.report_dir", str(reports)]
    r = run_cli(["run", *common])
    assert r.returncode == 0, r.stderr[-3000:]
    for task in ("sst2", "cb"):
        summary = json.loads((run_dir / "lr_search" / f"{task}.json").read_text())
        dev = set(summary["dev_ids"])
        assert len(dev) == 8 and summary["seeds"] == [1, 2]
        for seed in (1, 2):
            meta = rundir.read_job_meta(run_dir, task, seed, summary["config_hash"])
            assert meta["dev_ids"] == summary["dev_ids"]
            assert not (meta["eval_from_train"] and dev & set(meta["eval_ids"])) and not dev & set(meta["demo_ids"])
            assert not dev & set(meta["ft_demo_ids"])
            for setting in ("ft", "ft_lin"):   # every FT setting trained with the chosen rate
                log = rundir.read_ft_log(run_dir, task, setting, seed, summary["config_hash"])
                assert log["lr"] == summary["rates"][setting] == summary["searches"]["ft"]["chosen_lr"]
    results = json.loads((reports / "run" / "results.json").read_text())
    flagged = results["tasks"]["sst2"]["diverged"]
    assert flagged == {"ft_lin": [1, 2]}   # the linearized model's loss explodes; standard FT's falls
    md = (reports / "run" / "report.md").read_text()
    assert "## Learning-rate selection" in md and "**diverged**" in md
    assert "(seed 1, 2 diverged)" in md
    acc = next(line for line in md.splitlines() if line.startswith("| linearized FT accuracy"))
    assert not acc.rstrip(" |").endswith(")")   # included: averaged over both tasks
    # resumes: a lost grid point is recomputed alone, to the same record and the same choice
    point = run_dir / "lr_search" / "cb" / "ft" / "m1_seed2.json"
    summary, before = (run_dir / "lr_search" / "cb.json").read_text(), point.read_text()
    point.unlink()
    r = run_cli(["run", *common])
    assert r.returncode == 0, r.stderr[-3000:]
    assert point.read_text() == before and (run_dir / "lr_search" / "cb.json").read_text() == summary
    # left out of every mean: the cell says so and the average names the task it is over
    r = run_cli(["report", str(run_dir), "--report-dir", str(tmp_path / "excl"), "--report.exclude_diverged", "true"])
    assert r.returncode == 0, r.stderr[-3000:]
    md = (tmp_path / "excl" / "run" / "report.md").read_text()
    acc = next(line for line in md.splitlines() if line.startswith("| linearized FT accuracy"))
    assert "diverged (seed 1, 2 diverged, left out)" in acc and "(over cb)" in acc
