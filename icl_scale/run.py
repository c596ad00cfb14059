"""The main job: plan → jobs → (finetune) → evaluate → shards → report.

    ACCELERATE_USE_CPU=true accelerate launch --config_file launcher/cpu_2proc.yaml \\
        -m icl_scale run --config launcher/default.yaml --data.eval_max 50

Every rank builds the same plan (plan.py) and validates it before anything is written; each rank
then runs its part of the schedule and streams its records to its own shards. Rerunning the same
command skips what complete shards hold.

Settings (settings.py) share one evaluation and capture path: each scores after its prompt's
prefix; a finetuning setting first trains on the demonstrations (batch 1, at most k steps), then
scores zero-shot with the finetuned model — the linearized one through its dual pass — and puts
θ0 back. With plain PyTorch each FT job goes whole to one rank (round robin: FT is the costly part
and cannot be split); under DeepSpeed every rank takes part in every FT step and then scores its
share. Either way the results do not depend on the world size.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import yaml

from icl_scale import config as C
from icl_scale import lr_search
from icl_scale.capture.shards import ShardWriter, done_ids
from icl_scale.errors import UserError, first_line
from icl_scale.methods.backend import DeepSpeedBackend, TorchBackend
from icl_scale.methods.calibration import calibration_record, content_free_rows
from icl_scale.methods.evaluate import BatchSizer, PrefixCache, batches, score_batch
from icl_scale.methods.finetune import clipping, finetune, finetuned_scorer, restored
from icl_scale.methods.learners import learner_predictions
from icl_scale.methods.linearized import check_linearizable
from icl_scale.modeling.load import SeededNetwork, load_model, max_positions
from icl_scale.modeling.params import Trained, partitioned, trained_params
from icl_scale.modeling.precision import keep_trained_fp32
from icl_scale.plan import Job, plan, schedule
from icl_scale.runtime import dist, rundir
from icl_scale.runtime.engine import Process, loading, prepare_process
from icl_scale.runtime.progress import Clock, Progress
from icl_scale.runtime.tracking import Trackers
from icl_scale.settings import SETTINGS

log = logging.getLogger("icl_scale")


def run_setting(cfg, model, trained: list[Trained], job: Job, setting: str, run_dir: Path, h: str, state, progress,
                backend, network: SeededNetwork, sizer: BatchSizer, owner: int | None = None) -> None:
    """Evaluate one setting of a job on this rank's share (finetuning first for FT settings).
    Under ZeRO-3 every forward is a collective: all ranks finetune if any rank has work left, and
    score the same number of queries (the shorter shares padded with discarded ones)."""
    if owner is not None and owner != state.process_index:
        return   # another rank finetunes and evaluates this one whole
    jd = rundir.job_dir(run_dir, job.task, setting, job.key)
    share = job.eval_rows if owner is not None else job.eval_rows[state.process_index::state.num_processes]
    done = done_ids(jd, h)
    todo = [r for r in share if r["id"] not in done]
    steps = dist.all_max(state, len(todo)) if backend.lockstep else len(todo)
    writer = ShardWriter(jd, {"config_hash": h, "task": job.task, "setting": setting, "seed": job.seed},
                         state.process_index, state.num_processes, int(cfg.output.shard_mb * 2**20),
                         cfg.output.record_dtype)
    progress.start(f"{job.task}/{setting} seed {job.key}", total=len(share), done=len(share) - len(todo))
    filler = (share or job.eval_rows)[0]
    redo = side_records_missing(cfg, job, setting, run_dir, h)   # the shards are whole, but not its FT log
    if backend.lockstep:
        redo = bool(dist.all_max(state, int(redo)))
    if steps or redo:
        network.use(job.seed)
        spec = SETTINGS[setting]
        prefix = job.prompts[setting].prefix_ids
        if spec.finetunes:
            with restored(trained, backend):
                cache = finetune_job(cfg, model, trained, job, setting, run_dir, h, state, progress, backend, owner)
                with progress.clock.phase("evaluate"):
                    calibrate(cfg, model, job, setting, cache, run_dir, h)
                    score_share(cfg, model, job, cache, todo, writer, progress, steps, filler, sizer)
        else:
            with progress.clock.phase("evaluate"):
                cache = PrefixCache(model, prefix)
                calibrate(cfg, model, job, setting, cache, run_dir, h)
                score_share(cfg, model, job, cache, todo, writer, progress, steps, filler, sizer)
    writer.close()
    log.info("job %s/%s seed %s: %d done now, %d before", job.task, setting, job.key, len(todo), len(share) - len(todo))


def side_records_missing(cfg, job: Job, setting: str, run_dir: Path, h: str) -> bool:
    """Whether a record beside the shards is missing, damaged or another config's: the FT log (and
    trained weights) of an FT setting, the calibration record. The job then runs again (finetuning,
    content-free inputs) without rescoring what its shards hold."""
    if SETTINGS[setting].finetunes:
        if rundir.read_ft_log(run_dir, job.task, setting, job.key, h, repair=True) is None:
            return True
        if cfg.output.save_ft_weights and not rundir.ft_weights_path(run_dir, job.task, setting, job.key).is_file():
            return True
    return (cfg.eval.calibration != "none"
            and rundir.read_calibration(run_dir, job.task, setting, job.key, h, repair=True) is None)


def finetune_job(cfg, model, trained, job: Job, setting: str, run_dir: Path, h: str, state, progress, backend,
                 owner: int | None):
    """Finetune the model in place for one FT setting; write its log (and trained tensors); return
    what the finetuned model scores through."""
    spec = SETTINGS[setting]
    clip_mode, clip_value = clipping(cfg.finetune, setting)
    with progress.clock.phase("finetune"):
        ft_log, deltas = finetune(model, setting, trained, job.ft_sequences(), job.lr_of(setting),
                                  cfg.finetune.optimizer,
                                  clip_mode, clip_value, backend)
    weights = None
    if cfg.output.save_ft_weights:   # a collective under ZeRO-3: every rank gathers
        weights = deltas if spec.linearized else backend.full(trained)
    if state.is_main_process or owner is not None:
        rundir.write_ft_log(run_dir, job.task, setting, job.key, ft_log, h)
        if progress.trackers is not None:
            progress.trackers.ft_job(job.task, setting, job.key, ft_log)
        if weights is not None:
            rundir.write_ft_weights(run_dir, job.task, setting, job.key, trained, weights, h)
    return finetuned_scorer(model, trained, deltas, setting, job.prompts[setting].prefix_ids)


def calibrate(cfg, model, job: Job, setting: str, cache, run_dir: Path, h: str) -> None:
    """Score the content-free inputs after the setting's prefix (eval.calibration) and record
    their option distribution; written before any query, so a resumed job has it."""
    if cfg.eval.calibration == "none":
        return
    rows = content_free_rows(job.enc.spec, cfg.eval.calibration, job.ft_rows, job.seed)
    record = calibration_record(model, cache, job.enc, rows, cfg.eval.calibration, cfg.eval.record_position)
    rundir.write_calibration(run_dir, job.task, setting, job.key, record, h)


def learner_pass(cfg, model, jobs: list[Job], run_dir: Path, h: str, state, backend, network) -> None:
    """The learner baselines of every job not yet recorded: each rank its share of the eval rows
    (under ZeRO-3 every rank the same number of forwards, the shorter shares padded)."""
    for job in (j for j in jobs if j.order == 0):
        share = job.eval_rows[state.process_index::state.num_processes]
        missing = rundir.read_learners(run_dir, job.task, job.seed, h, state.process_index, repair=True) is None
        rows = share
        if backend.lockstep:
            if dist.all_max(state, int(missing)) == 0:
                continue
            rows = share + [job.eval_rows[0]] * (dist.all_max(state, len(share)) - len(share))
        elif not missing:
            continue
        network.use(job.seed)
        preds = learner_predictions(model, job.enc, job.ft_rows, rows)
        rundir.write_learners(run_dir, job.task, job.seed, state.process_index,
                              {"ids": [r["id"] for r in share]} | {k: v[:len(share)] for k, v in preds.items()}, h)


def score_share(cfg, model, job: Job, cache, todo: list[dict], writer: ShardWriter, progress, steps: int,
                filler: dict, sizer: BatchSizer) -> None:
    """Score `todo`, then (lockstep) `filler` until `steps` queries ran; only todo is recorded."""
    if not steps:
        return
    options = job.enc.options()
    queries = sorted(((job.enc.input_ids(r), r) for r in todo), key=lambda qr: len(qr[0]))  # less padding
    queries += [(job.enc.input_ids(filler), None)] * (steps - len(todo))
    size = sizer.size(model, cache, [q for q, _ in queries], options, cfg.eval.record_position, cfg.eval.capture)
    writer.note(batch_size=size, batch_probe_s_per_query=sizer.probe if not sizer.fixed else None)
    for batch in batches(queries, size):
        scored = score_batch(model, cache, [q for q, _ in batch], options, cfg.eval.record_position, cfg.eval.capture)
        for (_, row), s in zip(batch, scored):
            if row is not None:
                writer.add({"id": row["id"], "gold": row["label"], "pred": s.pred, "option_scores": s.option_scores,
                            "attn_out": s.attn_out, "scores": s.scores})
        progress.advance(sum(row is not None for _, row in batch))


def run(cfg: C.RunConfig, proc: Process | None = None) -> dict | None:
    """One run; on the main process, its report's analysis results. With `proc` (a suite's), the
    process group stays up for the next run."""
    owns_process = proc is None
    proc = proc or prepare_process(cfg)
    proc.check(cfg)
    state = proc.state
    run_dir = Path(cfg.output.run_dir)
    clock = Clock()
    finetunes = any(SETTINGS[m].finetunes for m in cfg.eval.methods)
    with clock.phase("load"):
        accelerator = proc.accelerator(cfg, finetunes)   # before the model: under ZeRO-3 each rank loads its share
        model, tok = load_model(cfg.model.name, cfg.model.attn, cfg.model.dtype, cfg.model.cache_dir,
                                main_first=lambda: dist.main_first(state), untrained=cfg.model.untrained,
                                loading=partial(loading, accelerator))
        at_load = partitioned(model)
        if not at_load:
            model.to(state.device)
    with clock.phase("plan"):
        jobs = plan(cfg, tok, max_positions(model))
        trained = trained_params(model, cfg.finetune.train) if finetunes else []
        precision = keep_trained_fp32(model, trained)
        if any(SETTINGS[m].linearized for m in cfg.eval.methods):   # before anything is written
            check_linearizable(model, trained)
    h = C.config_hash(cfg)
    ds_config = (None if proc.ds_config is None else
                 {"file": proc.ds_file, "config": proc.ds_config, "partitioned_at_load": at_load})
    launch = {"deepspeed": ds_config, "precision": precision,
              "n_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}
    rundir.check_config(cfg, run_dir)
    lock = rundir.RunLock(run_dir)
    problem = None
    if state.is_main_process:
        held_by = lock.acquire()
        problem = (f"output.run_dir {run_dir}: in use by another launch ({held_by}); one launch at a time per "
                   f"run dir") if held_by else rundir.unrepairable(run_dir)
    if dist.all_max(state, int(problem is not None)):   # every rank stops, with the reason
        lock.release()
        raise UserError(problem or f"output.run_dir {run_dir}: refused by the main process (its error says why)")
    if state.is_main_process:
        from rich.syntax import Syntax

        from icl_scale.runtime.progress import console

        rundir.check_or_save_config(cfg, run_dir)
        console().print(Syntax(yaml.safe_dump(C.to_dict(cfg), sort_keys=False) + f"# config hash {h}\n", "yaml"))
        removed = rundir.remove_orphans(run_dir, h)
        if removed:   # a killed launch's or damaged files: their records are redone
            console().print(f"resuming: removed {len(removed)} unfinished or damaged file(s), e.g. {removed[0]}")
        for job in jobs:
            rundir.write_job_meta(run_dir, job.task, job.key, job.meta | {"config_hash": h})
        rundir.write_invocation(run_dir, clock, state, launch, finished=False, peak_gpu_mib=dist.peak_gpu_mib(state))
    dist.barrier(state)
    with clock.phase("load"):
        # a DeepSpeed engine is built before any forward (ZeRO-3 partitions the model if zero.Init did not)
        backend = (TorchBackend() if accelerator is None else
                   DeepSpeedBackend(accelerator, model, trained, cfg.finetune.optimizer))
    # Plain PyTorch: no collective inside a job, so a failing job is recorded and skipped, and each
    # FT job goes whole to one rank. Under DeepSpeed every rank takes part in every FT step.
    network = SeededNetwork(model, cfg.model.untrained, after=lambda: backend.resync(trained))
    sizer = BatchSizer(cfg.eval.batch_size, cfg.eval.max_batch, backend.lockstep,
                       agree=(lambda b: dist.all_min(state, b)) if backend.lockstep else (lambda b: b))
    tolerant = not backend.collective
    work = schedule(jobs, state.num_processes, whole_ft_jobs=tolerant)
    total = sum(len(job.eval_rows) * len(job.prompts) for job in jobs)
    searching = cfg.finetune.lr_search and finetunes
    if searching:
        total += lr_search.work(cfg, jobs, state.num_processes if backend.collective else 1)
    trackers = (Trackers(cfg.output.trackers, run_dir, state.process_index, state.is_main_process, run_dir.name,
                         C.to_dict(cfg)) if cfg.output.trackers else None)
    with Progress(state, run_dir, clock, total=total, jobs=len(work), trackers=trackers) as progress:
        log.info("rank %d/%d, model %s, %d jobs", state.process_index, state.num_processes, cfg.model.name, len(jobs))
        if searching:
            lr_search.search(cfg, model, trained, jobs, run_dir, h, state, progress, backend, network, sizer)
        for job, setting, owner in work:
            try:
                run_setting(cfg, model, trained, job, setting, run_dir, h, state, progress, backend, network, sizer, owner)
                rundir.clear_failure(run_dir, job.task, setting, job.key, state.process_index)
            except (RuntimeError, MemoryError) as e:
                if not tolerant:
                    raise
                model.eval()
                rundir.write_failure(run_dir, job.task, setting, job.key, state.process_index, e, h)
                log.error("job %s/%s seed %s failed: %s", job.task, setting, job.key, first_line(e))
                progress.failed(f"{job.task}/{setting} seed {job.key}: {first_line(e)}")
            progress.job_done()
        if cfg.eval.learners:
            with clock.phase("learners"):
                learner_pass(cfg, model, jobs, run_dir, h, state, backend, network)
    dist.barrier(state)
    if accelerator is not None:
        accelerator.free_memory()   # the engine and its partitions: a suite's next run loads its own
    results = None
    if state.is_main_process:
        from icl_scale.report.render import write_report

        rundir.write_invocation(run_dir, clock, state, launch, finished=True, peak_gpu_mib=dist.peak_gpu_mib(state))
        results = write_report(run_dir, Path(cfg.output.report_dir), console=progress.console)
        if trackers is not None:
            trackers.results(results)
    if trackers is not None:
        trackers.finish()
        log.info("done in %.1fs", time.time() - clock.started)
    lock.release()
    if owns_process:
        dist.shutdown(state)
    return results
