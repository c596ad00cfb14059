"""Learning-rate selection (finetune.lr_search): the reference's rates were tuned for the papers'
1.3B model, so each task's rate is chosen again, on the model at hand, before any FT setting runs.

A grid point is (task, searched setting, multiple of the task's rate, seed): finetune on that
seed's demonstrations with that rate, then score the task's dev rows (tasks/split.py: never an
eval row nor any seed's demonstration) zero-shot with the finetuned model. A rate's dev accuracy
is pooled over the seeds; the best rate whose runs all stayed finite wins, ties the smaller rate.
With `lr_select: task` the standard-FT search sets the rate of every FT setting of the task (as in
the papers); with `setting` each FT setting searches with its own loss.

Each point's record is written as soon as it is done (lr_search/<task>/<setting>/), so a rerun
resumes; plain PyTorch sends each point whole to one rank (round robin), a DeepSpeed engine runs
every point on every rank. A point's result never depends on the rank or the world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from icl_scale.errors import first_line
from icl_scale.methods.evaluate import batches, score_batch
from icl_scale.methods.finetune import clipping, finetune, finetuned_scorer, restored
from icl_scale.plan import Job
from icl_scale.prompts import zsl_prompt
from icl_scale.runtime import dist, rundir
from icl_scale.settings import ft_settings


@dataclass(frozen=True)
class Point:
    job: Job
    setting: str     # the FT setting whose loss the search runs
    index: int       # position in finetune.lr_grid
    multiple: float

    @property
    def lr(self) -> float:
        return self.job.lr * self.multiple

    @property
    def name(self) -> str:
        return f"{self.job.task}/{self.setting} lr {self.lr:.3g} seed {self.job.seed}"


def searched_settings(cfg) -> list[str]:
    return ["ft"] if cfg.finetune.lr_select == "task" else ft_settings(cfg.eval.methods)


def points(cfg, jobs: list[Job]) -> list[Point]:
    """The grid points of the drawn demonstration orders (an order control uses their choice)."""
    return [Point(job, s, i, m) for job in jobs if job.order == 0 for s in searched_settings(cfg)
            for i, m in enumerate(cfg.finetune.lr_grid)]


def work(cfg, jobs: list[Job], ranks_per_point: int) -> int:
    """Dev queries the search scores over all ranks (for the overall progress bar)."""
    return sum(len(p.job.dev_rows) for p in points(cfg, jobs)) * ranks_per_point


def run_point(cfg, model, trained, point: Point, backend, progress, network, sizer) -> dict:
    """Finetune for one grid point, score the dev rows zero-shot, put θ0 back; the point's record."""
    job = point.job
    network.use(job.seed)
    clip_mode, clip_value = clipping(cfg.finetune, point.setting)
    prefix = zsl_prompt(job.enc).prefix_ids
    options = job.enc.options()
    progress.start(f"lr search {point.name}", total=len(job.dev_rows), done=0)
    with restored(trained, backend):
        with progress.clock.phase("lr search"):
            log, deltas = finetune(model, point.setting, trained, job.ft_sequences(), point.lr, cfg.finetune.optimizer,
                                   clip_mode, clip_value, backend)
            cache = finetuned_scorer(model, trained, deltas, point.setting, prefix)
            correct, finite = 0, log.skipped == 0
            queries = {r["id"]: job.enc.input_ids(r) for r in job.dev_rows}
            size = sizer.size(model, cache, list(queries.values()), options, cfg.eval.record_position, False)
            for rows in batches(job.dev_rows, size):
                for r, s in zip(rows, score_batch(model, cache, [queries[r["id"]] for r in rows], options,
                                                  do_capture=False)):
                    correct += s.pred == r["label"]
                    finite &= all(math.isfinite(x) for x in s.option_scores)
                progress.advance(len(rows))
    losses = [x for x in log.losses if math.isfinite(x)]
    return {"task": job.task, "setting": point.setting, "seed": job.seed, "index": point.index,
            "multiple": point.multiple, "lr": point.lr, "dev_n": len(job.dev_rows), "dev_correct": int(correct),
            "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "steps": log.steps, "skipped": log.skipped, "finite": bool(finite)}


def search(cfg, model, trained, jobs: list[Job], run_dir, h: str, state, progress, backend, network, sizer) -> None:
    """Run every grid point not yet recorded, then set each job's per-setting rates (job.lrs) and,
    on the main process, write each task's selection (lr_search/<task>.json)."""
    todo = points(cfg, jobs)
    for n, point in enumerate(todo):
        have = rundir.read_lr_point(run_dir, point.job.task, point.setting, point.index, point.job.seed, h)
        if backend.collective:   # every rank runs the point if any rank lacks it
            if dist.all_max(state, int(have is None)) == 0:
                progress.start(f"lr search {point.name}", len(point.job.dev_rows), done=len(point.job.dev_rows))
                continue
            record = run_point(cfg, model, trained, point, backend, progress, network, sizer)
            if state.is_main_process:
                rundir.write_lr_point(run_dir, record, h)
        elif n % state.num_processes != state.process_index:
            continue
        elif have is not None:
            progress.start(f"lr search {point.name}", len(point.job.dev_rows), done=len(point.job.dev_rows))
        else:
            try:
                record = run_point(cfg, model, trained, point, backend, progress, network, sizer)
            except (RuntimeError, MemoryError) as e:   # a failed point cannot win; the others go on
                model.eval()
                record = {"task": point.job.task, "setting": point.setting, "seed": point.job.seed,
                          "index": point.index, "multiple": point.multiple, "lr": point.lr,
                          "dev_n": len(point.job.dev_rows), "dev_correct": 0, "first_loss": None, "final_loss": None,
                          "steps": 0, "skipped": 0, "finite": False, "error": first_line(e)}
            rundir.write_lr_point(run_dir, record, h)
    dist.barrier(state)
    for task in dict.fromkeys(job.task for job in jobs):
        task_jobs = [job for job in jobs if job.task == task]
        summary = select(cfg, [job for job in task_jobs if job.order == 0], run_dir, h)
        for job in task_jobs:   # the order control's jobs too
            job.lrs = dict(summary["rates"])
        if state.is_main_process:
            rundir.write_lr_search(run_dir, task, summary | {"config_hash": h})


def select(cfg, jobs: list[Job], run_dir, h: str) -> dict:
    """One task's selection from its points' records: per searched setting, every grid point's
    pooled dev accuracy and mean final loss, and the rate chosen; `rates`: per FT setting run."""
    first = jobs[0]
    searches = {}
    for setting in searched_settings(cfg):
        grid = []
        for i, m in enumerate(cfg.finetune.lr_grid):
            recs = [rundir.read_lr_point(run_dir, job.task, setting, i, job.seed, h) for job in jobs]
            if any(r is None for r in recs):
                raise RuntimeError(f"learning-rate search of {first.task}/{setting}: grid point {i} has no record")
            n, correct = sum(r["dev_n"] for r in recs), sum(r["dev_correct"] for r in recs)
            losses = [r["final_loss"] for r in recs if r["final_loss"] is not None]
            grid.append({"multiple": m, "lr": first.lr * m, "dev_correct": correct, "dev_n": n,
                         "dev_accuracy": correct / n, "final_loss": sum(losses) / len(losses) if losses else None,
                         "finite": all(r["finite"] for r in recs),
                         "per_seed": {str(r["seed"]): r["dev_correct"] / r["dev_n"] for r in recs}})
        eligible = [g for g in grid if g["finite"]] or grid   # nothing finite: still the smallest best
        best = max(g["dev_correct"] for g in eligible)
        chosen = min((g for g in eligible if g["dev_correct"] == best), key=lambda g: g["lr"])
        searches[setting] = {"grid": grid, "chosen_lr": chosen["lr"], "chosen_multiple": chosen["multiple"],
                             "none_finite": not any(g["finite"] for g in grid)}
    rates = {s: searches["ft" if cfg.finetune.lr_select == "task" else s]["chosen_lr"]
             for s in ft_settings(cfg.eval.methods)}
    return {"task": first.task, "select": cfg.finetune.lr_select, "base_lr": first.lr,
            "seeds": [job.seed for job in jobs], "dev_ids": [r["id"] for r in first.dev_rows],
            "dev_size": len(first.dev_rows), "searches": searches, "rates": rates}
