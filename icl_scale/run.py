"""The main job: plan → jobs → (finetune) → evaluate → shards → report.

    ACCELERATE_USE_CPU=true accelerate launch --config_file launcher/cpu_2proc.yaml \\
        -m icl_scale run --config launcher/default.yaml --data.eval_max 50

Every rank builds the same plan (data, eval sets, prompts) and validates it before anything is
written; each rank then takes eval examples rank::world_size of every job and streams its records
to its own shards. Rerunning the same command skips what complete shards hold.

Settings share one evaluation and capture path: zsl and icl score after their prompt's prefix;
ft, ft_lc, ft_lc_clip and ft_lin finetune on the demonstrations (batch 1, at most k steps), then
score zero-shot with the finetuned model — the linearized one through its dual pass — and put θ0
back. With plain PyTorch each FT job goes whole to one rank (round robin: FT is the costly part
and cannot be split); under DeepSpeed every rank takes part in every FT step and then scores its
share. Either way the results do not depend on the world size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import yaml

from icl_scale import config as C
from icl_scale.capture.shards import ShardWriter, done_ids
from icl_scale.methods.evaluate import PrefixCache, score_batch
from icl_scale.methods.finetune import METHODS as FT_METHODS, check_linearizable
from icl_scale.methods.train import LinearizedForward, finetune, restored
from icl_scale.runtime.engine import DeepSpeedBackend, TorchBackend, deepspeed_accelerator, loading
from icl_scale.modeling.params import partitioned, trained_params
from icl_scale.modeling.load import load_model, max_positions
from icl_scale.prompts import Encoder, Prompt, fit_prompt, zsl_prompt
from icl_scale.errors import first_line
from icl_scale.runtime import dist, rundir
from icl_scale.runtime.progress import Clock, Progress
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import split_task

log = logging.getLogger("icl_scale")


@dataclass
class Job:
    """One task × seed: its eval rows and the prompt of each setting."""
    task: str
    seed: int
    enc: Encoder
    eval_rows: list[dict]
    prompts: dict[str, Prompt]     # per setting: the prompt it scores after
    ft_rows: list[dict]            # finetuning data, in order
    lr: float
    meta: dict


def plan(cfg: C.RunConfig, tok, model_max: int) -> list[Job]:
    """Load every task's data and build every prompt; any bad input fails here, before writing."""
    max_len = min(cfg.model.max_length, model_max)
    jobs = []
    for task in cfg.data.tasks:
        spec = get_task(task)
        source = C.source_for(cfg, task)
        src = load_source(spec, source, cfg.data.data_dir, cfg.data.files_dir)
        enc = Encoder(spec, tok)
        for seed in cfg.data.seeds:
            split = split_task(spec, src, seed, cfg.data.k, cfg.data.eval_max, cfg.data.label_noise,
                               cfg.data.label_noise_mode)
            icl = fit_prompt(enc, split.demos, split.eval_full, max_len)
            zsl = zsl_prompt(enc)
            ft_rows = split.demos[: icl.k_effective] if cfg.finetune.demos == "icl" else split.demos
            lr = C.lr_for(cfg, task, spec.ft_lr)
            meta = {"task": task, "seed": seed, "source": src.description, "eval_ids": [r["id"] for r in split.eval],
                    "eval_size_full": len(split.eval_full), "eval_from_train": split.eval_from_train,
                    "k_requested": icl.k_requested, "k_effective": icl.k_effective, "demo_ids": list(icl.demo_ids),
                    "prefix_tokens": len(icl.prefix_ids), "max_length": max_len,
                    "label_words": list(spec.label_words), "options": enc.options(),
                    "ft_demo_ids": [r["id"] for r in ft_rows], "ft_lr": lr,
                    "corrupted_demo_ids": [r["id"] for r in split.demos if r.get("corrupted")]}
            prompts = {m: icl if m == "icl" else zsl for m in cfg.eval.methods}
            jobs.append(Job(task, seed, enc, split.eval, prompts, ft_rows, lr, meta))
    return jobs


def run_setting(cfg, model, job: Job, setting: str, run_dir: Path, h: str, state, progress, backend,
                owner: int | None = None) -> None:
    """Evaluate one setting of a job on this rank's share (finetuning first for FT settings).
    Under ZeRO-3 every forward is a collective: all ranks finetune if any rank has work left, and
    score the same number of queries (the shorter shares padded with discarded ones)."""
    jd = rundir.job_dir(run_dir, job.task, setting, job.seed)
    if owner is not None and owner != state.process_index:
        return   # another rank finetunes and evaluates this one whole
    share = job.eval_rows if owner is not None else job.eval_rows[state.process_index::state.num_processes]
    done = done_ids(jd, h)
    todo = [r for r in share if r["id"] not in done]
    lockstep = getattr(backend, "lockstep", False)
    steps = dist.all_max(state, len(todo)) if lockstep else len(todo)
    writer = ShardWriter(jd, {"config_hash": h, "task": job.task, "setting": setting, "seed": job.seed},
                         state.process_index, state.num_processes, int(cfg.output.shard_mb * 2**20))
    progress.start(f"{job.task}/{setting} seed {job.seed}", total=len(share), done=len(share) - len(todo))
    prefix = job.prompts[setting].prefix_ids
    filler = (share or job.eval_rows)[0]
    if steps and setting in FT_METHODS:
        trained = trained_params(model, cfg.finetune.train)
        with restored(trained, backend):
            seqs = [[job.enc.bos] + job.enc.demo_ids(r) for r in job.ft_rows]
            clip = ((cfg.finetune.lc_clip, cfg.finetune.lc_clip_value) if setting == "ft_lc_clip"
                    else (cfg.finetune.clip, cfg.finetune.clip_value))
            with progress.clock.phase("finetune"):
                ft_log, deltas = finetune(model, setting, trained, seqs, job.lr, cfg.finetune.optimizer, *clip,
                                          backend)
            weights = None
            if cfg.output.save_ft_weights:   # a collective under ZeRO-3: every rank gathers
                weights = deltas if deltas is not None else backend.full(trained)
            if state.is_main_process or owner is not None:
                rundir.write_ft_log(run_dir, job.task, setting, job.seed, ft_log, h)
                if weights is not None:
                    rundir.write_ft_weights(run_dir, job.task, setting, job.seed, trained, weights, h)
            cache = (LinearizedForward(model, trained, deltas, prefix) if setting == "ft_lin"
                     else PrefixCache(model, prefix))
            with progress.clock.phase("evaluate"):
                score_share(cfg, model, job, cache, todo, writer, progress, steps, filler)
    elif steps:
        with progress.clock.phase("evaluate"):
            score_share(cfg, model, job, PrefixCache(model, prefix), todo, writer, progress, steps, filler)
    writer.close(expected=len(share))
    log.info("job %s/%s seed %d: %d done now, %d before", job.task, setting, job.seed, len(todo), len(share) - len(todo))


def ft_accelerator(cfg):
    """The DeepSpeed Accelerator when finetune.deepspeed is set and the run finetunes, else None."""
    if not cfg.finetune.deepspeed or not set(cfg.eval.methods) & set(FT_METHODS):
        return None
    return deepspeed_accelerator(cfg.finetune.deepspeed)


def ft_backend(cfg, model, accelerator):
    """The finetuning backend of the run: a DeepSpeed engine (built before any forward: ZeRO-3
    partitions the model if zero.Init did not) or plain PyTorch."""
    if accelerator is None:
        return TorchBackend()
    return DeepSpeedBackend(accelerator, model, trained_params(model, cfg.finetune.train), cfg.finetune.optimizer)


def score_share(cfg, model, job: Job, cache, todo: list[dict], writer: ShardWriter, progress, steps: int,
                filler: dict) -> None:
    """Score `todo`, then (lockstep) `filler` until `steps` queries ran; only todo is recorded."""
    options = job.enc.options()
    queries = sorted(((job.enc.input_ids(r), r) for r in todo), key=lambda qr: len(qr[0]))  # less padding
    queries += [(job.enc.input_ids(filler), None)] * (steps - len(todo))
    for i in range(0, len(queries), cfg.eval.batch_size):
        batch = queries[i:i + cfg.eval.batch_size]
        scored = score_batch(model, cache, [q for q, _ in batch], options, cfg.eval.record_position, cfg.eval.capture)
        for (_, row), s in zip(batch, scored):
            if row is not None:
                writer.add({"id": row["id"], "gold": row["label"], "pred": s.pred, "option_scores": s.option_scores,
                            "attn_out": s.attn_out, "scores": s.scores})
        progress.advance(sum(row is not None for _, row in batch))


def _injected_fault(job: Job, setting: str, rank: int) -> None:
    """Testing aid for fault tolerance: ICL_SCALE_FAIL=<task>/<setting>/<seed>[/<rank>] makes that
    job fail as an out-of-memory would."""
    spec = os.environ.get("ICL_SCALE_FAIL", "")
    if spec and spec.split("/")[:3] == [job.task, setting, str(job.seed)] and spec.split("/")[3:] in ([], [str(rank)]):
        raise RuntimeError(f"injected failure of {spec} (ICL_SCALE_FAIL)")


def run(cfg: C.RunConfig, state=None) -> Path | None:
    """One run. With `state` (a suite's), the process group stays up for the next run."""
    if cfg.finetune.deepspeed:
        from icl_scale.runtime.engine import read_ds_config

        read_ds_config(cfg.finetune.deepspeed)  # bad JSON, unknown key, unsupported stage: before any work
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # the process state must be DeepSpeed's from the start
    owns_state = state is None
    state = state or dist.init_state()
    run_dir = Path(cfg.output.run_dir)
    clock = Clock()
    with clock.phase("load"):
        accelerator = ft_accelerator(cfg)   # before the model: under ZeRO-3 each rank loads its share
        model, tok = load_model(cfg.model.name, cfg.model.attn, cfg.model.dtype, cfg.model.cache_dir,
                                main_first=lambda: dist.main_first(state), untrained=cfg.model.untrained,
                                loading=partial(loading, accelerator))
        at_load = partitioned(model)
        if not at_load:
            model.to(state.device)
    with clock.phase("plan"):
        jobs = plan(cfg, tok, max_positions(model))
        if "ft_lin" in cfg.eval.methods:   # before anything is written
            check_linearizable(model, trained_params(model, cfg.finetune.train))
    h = C.config_hash(cfg)
    ds_config = None
    if cfg.finetune.deepspeed:
        from icl_scale.runtime.engine import read_ds_config

        ds_config = {"file": cfg.finetune.deepspeed, "config": read_ds_config(cfg.finetune.deepspeed),
                     "partitioned_at_load": at_load}
    rundir.check_config(cfg, run_dir)
    if state.is_main_process:
        from rich.syntax import Syntax

        from icl_scale.runtime.progress import console

        rundir.check_or_save_config(cfg, run_dir)
        console().print(Syntax(yaml.safe_dump(C.to_dict(cfg), sort_keys=False) + f"# config hash {h}\n", "yaml"))
        rundir.remove_orphans(run_dir)
        for job in jobs:
            rundir.write_job_meta(run_dir, job.task, job.seed, job.meta | {"config_hash": h})
        rundir.write_invocation(run_dir, clock, state, ds_config, finished=False)
    dist.barrier(state)
    with clock.phase("load"):
        backend = ft_backend(cfg, model, accelerator)
    # Plain PyTorch: no collective inside a job, so a failing job is recorded and skipped, and each
    # FT job goes whole to one rank (round robin). Under DeepSpeed every rank takes part in every
    # FT step and scores its share of the eval set.
    tolerant = not backend.collective
    ft_jobs = 0
    total = sum(len(job.eval_rows) * len(job.prompts) for job in jobs)
    with Progress(state, run_dir, clock, total=total, jobs=sum(len(job.prompts) for job in jobs)) as progress:
        log.info("rank %d/%d, model %s, %d jobs", state.process_index, state.num_processes, cfg.model.name, len(jobs))
        for job in jobs:
            for setting in job.prompts:
                owner = None
                if tolerant and setting in FT_METHODS:
                    owner, ft_jobs = ft_jobs % state.num_processes, ft_jobs + 1
                try:
                    if owner in (None, state.process_index):
                        _injected_fault(job, setting, state.process_index)
                    run_setting(cfg, model, job, setting, run_dir, h, state, progress, backend, owner)
                    rundir.clear_failure(run_dir, job.task, setting, job.seed, state.process_index)
                except (RuntimeError, MemoryError) as e:
                    if not tolerant:
                        raise
                    model.eval()
                    rundir.write_failure(run_dir, job.task, setting, job.seed, state.process_index, e, h)
                    log.error("job %s/%s seed %d failed: %s", job.task, setting, job.seed, first_line(e))
                    progress.failed(f"{job.task}/{setting} seed {job.seed}: {first_line(e)}")
                progress.job_done()
    dist.barrier(state)
    if accelerator is not None:
        accelerator.free_memory()   # the engine and its partitions: a suite's next run loads its own
    out = None
    if state.is_main_process:
        from icl_scale.report.render import write_report

        rundir.write_invocation(run_dir, clock, state, ds_config, finished=True)
        out = write_report(run_dir, Path(cfg.output.report_dir), console=progress.console)
        log.info("done in %.1fs", time.time() - clock.started)
    if owns_state:
        dist.shutdown(state)
    return out
