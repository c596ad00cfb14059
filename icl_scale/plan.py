"""Planning: every rank builds the same jobs (data, eval sets, prompts) and the same schedule
before anything is written, so bad input fails here, and the work never depends on timing.

A job is one task × seed: its eval rows, the prompt each setting scores after (settings.py), the
finetuning data in order, the learning rate of each FT setting (the task's rate until the
learning-rate search, lr_search.py, replaces it) and the task's dev rows for that search. The schedule says which rank runs which
(job, setting): every rank its share of the eval set, or one rank a whole job (`whole`: plain
PyTorch finetuning, which cannot be split, goes round robin).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icl_scale import config as C
from icl_scale.errors import UserError
from icl_scale.prompts import Encoder, Prompt, fit_prompt, zsl_prompt
from icl_scale.settings import SETTINGS
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import dev_split, split_task


@dataclass
class Job:
    """One task × seed: its eval rows and the prompt of each setting."""
    task: str
    seed: int
    enc: Encoder
    eval_rows: list[dict]
    prompts: dict[str, Prompt]     # per setting: the prompt it scores after
    ft_rows: list[dict]            # finetuning data, in order
    lr: float                      # the task's rate (finetune.lrs or the reference's): the search's centre
    meta: dict
    dev_rows: list[dict] = field(default_factory=list)   # the task's dev split (learning-rate search)
    lrs: dict[str, float] = field(default_factory=dict)  # per FT setting: the rate it trains with
    order: int = 0                 # demonstration order (data.orders): 0 the drawn order, o > 0 a permutation

    @property
    def key(self) -> str:
        """The job's name in run-dir paths (seed<key>): the seed, with its order where o > 0."""
        return str(self.seed) if self.order == 0 else f"{self.seed}o{self.order}"

    def lr_of(self, setting: str) -> float:
        return self.lrs.get(setting, self.lr)

    def ft_sequences(self) -> list[list[int]]:
        """One `<bos> input answer_gold` sequence per finetuning step."""
        return [[self.enc.bos] + self.enc.demo_ids(r) for r in self.ft_rows]


TEXT_CHARS = 300   # of each eval example's text kept in the job meta, for the per-example view


def plan(cfg: C.RunConfig, tok, model_max: int) -> list[Job]:
    """Load every task's data and build every prompt; any bad input fails here, before writing."""
    max_len = min(cfg.model.max_length, model_max)
    jobs = []
    for task in cfg.data.tasks:
        spec = get_task(task)
        source = C.source_for(cfg, task)
        src = load_source(spec, source, cfg.data.data_dir, cfg.data.files_dir)
        enc = Encoder(spec, tok)
        seeds = C.seeds_for(cfg, task)
        dev = (dev_split(spec, src, seeds, cfg.data.k, cfg.finetune.lr_dev_size)
               if cfg.finetune.lr_search and any(SETTINGS[m].finetunes for m in cfg.eval.methods) else [])
        for seed in seeds:
            split = split_task(spec, src, seed, cfg.data.k, cfg.data.eval_max, cfg.data.label_noise,
                               cfg.data.label_noise_mode)
            by_kind = {"icl": fit_prompt(enc, split.demos, split.eval_full, max_len), "zsl": zsl_prompt(enc)}
            icl = by_kind["icl"]
            ft_rows = split.demos[: icl.k_effective] if cfg.finetune.demos == "icl" else split.demos
            if any(SETTINGS[m].finetunes for m in cfg.eval.methods):
                for r in ft_rows:   # each FT step is one demonstration; none may be cut
                    n = 1 + len(enc.demo_ids(r))
                    if n > max_len:
                        raise UserError(f"task {task} seed {seed}: finetuning demonstration id {r['id']} is {n} "
                                        f"tokens, over model.max_length {max_len} (raise it, or use "
                                        f"finetune.demos icl: only the demonstrations that fit the ICL prompt)")
            lr = C.lr_for(cfg, task, spec.ft_lr)
            meta = {"task": task, "seed": seed, "source": src.description, "eval_ids": [r["id"] for r in split.eval],
                    "eval_texts": [" / ".join(r[f] for f in spec.fields)[:TEXT_CHARS] for r in split.eval],
                    "eval_size_full": len(split.eval_full), "eval_from_train": split.eval_from_train,
                    "k_requested": icl.k_requested, "k_effective": icl.k_effective, "demo_ids": list(icl.demo_ids),
                    "prefix_tokens": len(icl.prefix_ids), "max_length": max_len,
                    "label_words": list(spec.label_words), "options": enc.options(),
                    "ft_demo_ids": [r["id"] for r in ft_rows], "ft_lr": lr,
                    "corrupted_demo_ids": [r["id"] for r in split.demos if r.get("corrupted")],
                    "dev_ids": [r["id"] for r in dev],
                    "untrained_init_seed": seed if cfg.model.untrained else None}
            prompts = {s: by_kind[SETTINGS[s].prompt] for s in cfg.eval.methods}
            jobs.append(Job(task, seed, enc, split.eval, prompts, ft_rows, lr, meta, dev))
            jobs += order_jobs(cfg, jobs[-1], split.demos, split.eval_full, max_len)
    return jobs


def order_jobs(cfg: C.RunConfig, job: Job, demos: list[dict], eval_full: list[dict], max_len: int) -> list[Job]:
    """The demonstration-order control (data.orders): per order o > 0 the fitted demonstrations in a
    seeded permutation — the same one for the ICL prompt and for FT — and every setting that sees
    them (ZSL does not: its order-0 records serve)."""
    icl = job.prompts.get("icl") or fit_prompt(job.enc, demos, eval_full, max_len)
    by_id = {r["id"]: r for r in demos}
    fitted = [by_id[i] for i in icl.demo_ids]
    out = []
    for order in range(1, cfg.data.orders):
        perm = np.random.default_rng([job.seed, order]).permutation(len(fitted))
        rows = [fitted[i] for i in perm]
        prompt = fit_prompt(job.enc, rows, eval_full, max_len)
        assert prompt.k_effective == len(rows)   # the same demonstrations, the same length
        ft = rows + [r for r in job.ft_rows if r["id"] not in set(icl.demo_ids)]   # demos=all: the rest after
        prompts = {s: prompt if SETTINGS[s].prompt == "icl" else p for s, p in job.prompts.items()
                   if SETTINGS[s].prompt == "icl" or SETTINGS[s].finetunes}
        meta = job.meta | {"order": order, "demo_ids": list(prompt.demo_ids), "ft_demo_ids": [r["id"] for r in ft]}
        out.append(Job(job.task, job.seed, job.enc, job.eval_rows, prompts, ft, job.lr, meta, job.dev_rows, order=order))
    return out


def schedule(jobs: list[Job], world_size: int, whole_ft_jobs: bool) -> list[tuple[Job, str, int | None]]:
    """(job, setting, owner) in run order; owner None: every rank scores its share. With
    `whole_ft_jobs`, each finetuning job goes whole to one rank, round robin."""
    out, n_ft = [], 0
    for job in jobs:
        for setting in job.prompts:
            owner = None
            if whole_ft_jobs and SETTINGS[setting].finetunes:
                owner, n_ft = n_ft % world_size, n_ft + 1
            out.append((job, setting, owner))
    return out
