"""Eval set and demonstrations of a (task, seed), independent of the world size and eval cap.

- eval: the eval split shuffled with the fixed seed 1, first `spec.eval_size` rows, then the
  first `eval_max` of those; with no eval split, that held-out set comes out of train instead and
  demonstrations are never drawn from it;
- demonstrations: the remaining train pool shuffled with the run seed, first k;
- dev (learning-rate selection): what the pool keeps after every seed's k demonstrations are
  taken out, shuffled with the fixed seed 2, first `size` — disjoint from eval and from every
  seed's demonstrations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from icl_scale.errors import UserError
from icl_scale.tasks.sources import SourceRows
from icl_scale.tasks.spec import TaskSpec

EVAL_SHUFFLE_SEED = 1
DEV_SHUFFLE_SEED = 2


@dataclass
class TaskSplit:
    eval_full: list[dict]   # the task's whole eval set (fixes the greedy fit independently of the cap)
    eval: list[dict]        # the capped eval set
    demos: list[dict]       # k demonstrations in draw order
    eval_from_train: bool


def shuffled(rows: list[dict], seed: int) -> list[dict]:
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def corrupt_labels(demos: list[dict], n_labels: int, fraction: float, mode: str, seed: int) -> list[dict]:
    """Label switching: a seeded subset (round(fraction·k) demonstrations) gets wrong labels;
    returns new rows (marked "corrupted") and leaves the pool untouched."""
    rng = np.random.default_rng([seed, 7])
    chosen = sorted(rng.choice(len(demos), size=round(fraction * len(demos)), replace=False).tolist())
    out = [dict(r) for r in demos]
    if mode == "flip":
        for i in chosen:
            out[i]["label"] = (out[i]["label"] + 1) % n_labels
    else:
        labels = [out[i]["label"] for i in chosen]
        for i, j in zip(chosen, rng.permutation(len(chosen))):
            out[i]["label"] = labels[j]
    for i in chosen:
        out[i]["corrupted"] = True
    return out


def _eval_and_pool(spec: TaskSpec, src: SourceRows) -> tuple[list[dict], list[dict]]:
    if src.eval is None:
        held = shuffled(src.train, EVAL_SHUFFLE_SEED)
        size = min(spec.eval_size, len(held) // 2)
        eval_full, pool = held[:size], held[size:]
        pool.sort(key=lambda r: r["id"])
    else:
        eval_full, pool = shuffled(src.eval, EVAL_SHUFFLE_SEED)[: spec.eval_size], src.train
    if not eval_full:
        raise UserError(f"task {spec.name}: eval split is empty")
    return eval_full, pool


def split_task(spec: TaskSpec, src: SourceRows, seed: int, k: int, eval_max: int,
               label_noise: float = 0.0, label_noise_mode: str = "flip") -> TaskSplit:
    eval_full, pool = _eval_and_pool(spec, src)
    if k > len(pool):
        raise UserError(f"config field data.k: {k} is larger than task {spec.name}'s demonstration pool ({len(pool)})")
    demos = shuffled(pool, seed)[:k]
    if label_noise > 0:
        demos = corrupt_labels(demos, len(spec.label_words), label_noise, label_noise_mode, seed)
    return TaskSplit(eval_full, eval_full[:eval_max], demos, src.eval is None)


def dev_split(spec: TaskSpec, src: SourceRows, seeds, k: int, size: int) -> list[dict]:
    """The dev rows of learning-rate selection: never an eval row nor any seed's demonstration."""
    _, pool = _eval_and_pool(spec, src)
    taken = {r["id"] for seed in seeds for r in shuffled(pool, seed)[:k]}
    rest = [r for r in pool if r["id"] not in taken]
    if size > len(rest):
        raise UserError(f"config field finetune.lr_dev_size: {size} is larger than what task {spec.name}'s train pool "
                        f"keeps after the demonstrations of seeds {', '.join(map(str, seeds))} ({len(rest)})")
    return shuffled(rest, DEV_SHUFFLE_SEED)[:size]
