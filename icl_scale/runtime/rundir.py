"""The run dir: resolved config (saved before work starts), job metadata, job dirs, logs.

    <run>/config.yaml            resolved config, as a user would write it
    <run>/config.json            resolved config + hash + the result fields the hash covers
    <run>/jobs/<task>/seed<s>.json   data source, eval ids, effective K, demonstration ids
    <run>/shards/<task>/<setting>/seed<s>/   record shards (capture/shards.py)
    <run>/ft/<task>/<setting>/seed<s>.json   per-step FT loss, per-layer gradient norms, skipped steps
    <run>/ft/<task>/<setting>/seed<s>.safetensors   trained parameters after FT (output.save_ft_weights)
    <run>/logs/rank<r>.log
    <run>/failures/<task>/<setting>/seed<s>-r<rank>.json   a job that failed on that rank (error,
                                 traceback); removed when a rerun completes it
    <run>/progress/r<rank>.json  examples and jobs this rank has done (the main process's overall bar)
    <run>/invocations/<start>.json   one per launch: world size, device, package versions, DeepSpeed
                                 config, wall time per phase (the report's provenance)
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from icl_scale import atomic
from icl_scale import config as C
from icl_scale import records
from icl_scale.capture.shards import read_manifests, rebuild_manifest
from icl_scale.errors import UserError
from icl_scale.settings import SETTINGS

log = logging.getLogger("icl_scale")


def job_dir(run_dir: Path, task: str, setting: str, seed: int) -> Path:
    return run_dir / "shards" / task / setting / f"seed{seed}"


def job_meta_path(run_dir: Path, task: str, seed: int) -> Path:
    return run_dir / "jobs" / task / f"seed{seed}.json"


def check_writable(path: Path, field: str) -> None:
    """A directory the run will write: one that is there or can be made, and writable (probed with a
    temporary file, since permission bits do not bind root). Checked before any work; `field` names
    the option in the error ("config field output.run_dir", "option --to")."""
    import tempfile

    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{field}: {path} is a file, not a directory")
    there = path
    while not there.exists():
        there = there.parent
    if not there.is_dir():
        raise UserError(f"{field}: {path} is under a file ({there})")
    try:
        with tempfile.TemporaryFile(dir=there):
            pass
    except OSError as e:
        raise UserError(f"{field}: {there} is not writable ({e.strerror})") from None


def check_config(cfg: C.RunConfig, run_dir: Path) -> str:
    """On resume, a changed result field is an error naming the fields. Reads only, so every rank
    runs it and each stops with the reason, not only the main one. A damaged config.json is
    rewritten by this launch, unless the shards say the dir holds another config's run."""
    h = C.config_hash(cfg)
    old = records.repairable(run_dir / "config.json", "run config")
    if old is not None and C.hash_of(old["result_fields"]) != old["config_hash"]:
        old = None   # damaged
    if old is not None and old["config_hash"] != h:
        fields = C.diff_fields(old["result_fields"], C.result_dict(cfg))
        raise UserError(f"run dir {run_dir} holds a run of another config: {', '.join(fields)} differ "
                        f"(use another output.run_dir)")
    if old is None:
        for p in sorted((run_dir / "shards").glob("*/*/*/manifest-r*.json")):
            m = records.repairable(p, "manifest")
            if m is not None and m["config_hash"] != h:
                raise UserError(f"run dir {run_dir} holds shards of another config ({p} was written by "
                                f"config {m['config_hash']}) and no sound config.json: use another output.run_dir")
    return h


def check_or_save_config(cfg: C.RunConfig, run_dir: Path) -> str:
    """Save the resolved config after `check_config`."""
    h = check_config(cfg, run_dir)
    atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(C.to_dict(cfg), sort_keys=False))
    atomic.write_json(run_dir / "config.json", {"config_hash": h, "config": C.to_dict(cfg),
                                                "result_fields": C.result_dict(cfg)})
    return h


def load_run(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"run dir {run_dir}: no config.json (not a run dir)")
    return records.read(path, "run config")


def read_config(run_dir: Path) -> tuple[C.RunConfig, str]:
    """The run's resolved config, typed again, and its hash."""
    run = load_run(run_dir)
    if C.hash_of(run["result_fields"]) != run["config_hash"]:
        raise records.Damaged(f"run config {run_dir / 'config.json'}: its config_hash is not its result fields' "
                              f"({records.HINTS['run config']})")
    return C.build(run["config"], source=str(run_dir / "config.json")), run["config_hash"]


def write_job_meta(run_dir: Path, task: str, seed: int, meta: dict) -> None:
    atomic.write_json(job_meta_path(run_dir, task, seed), meta)


def read_job_meta(run_dir: Path, task: str, seed: int, config_hash: str) -> dict:
    """For the report; every launch rewrites the job metas, so a rerun repairs a damaged one."""
    p = job_meta_path(run_dir, task, seed)
    return records.of_config(records.read(p, "job meta"), config_hash, p, "job meta")


def ft_log_path(run_dir: Path, task: str, setting: str, seed: int) -> Path:
    return run_dir / "ft" / task / setting / f"seed{seed}.json"


def write_ft_log(run_dir: Path, task: str, setting: str, seed: int, log, config_hash: str) -> None:
    """Per-step loss, per-layer gradient norms and skipped steps of one finetuning run."""
    import dataclasses

    atomic.write_json(ft_log_path(run_dir, task, setting, seed), dataclasses.asdict(log) | {"config_hash": config_hash},
                      indent=None)


def read_ft_log(run_dir: Path, task: str, setting: str, seed: int, config_hash: str,
                repair: bool = False) -> dict | None:
    """This config's FT log. `repair` (the run): None when missing, damaged or another config's,
    so the job finetunes again; else (the report) each of those is an error naming the file."""
    return _side_record(ft_log_path(run_dir, task, setting, seed), "FT log", config_hash, repair, required=True)


def _side_record(p: Path, kind: str, config_hash: str, repair: bool, required: bool = False) -> dict | None:
    if repair:
        return records.repairable(p, kind, config_hash)
    record = records.read(p, kind) if required else records.read_if_any(p, kind)
    return records.of_config(record, config_hash, p, kind)


def calibration_path(run_dir: Path, task: str, setting: str, seed: int) -> Path:
    return run_dir / "calibration" / task / setting / f"seed{seed}.json"


def write_calibration(run_dir: Path, task: str, setting: str, seed: int, record: dict, config_hash: str) -> None:
    """The content-free inputs of one (task, setting, seed) and their option distributions
    (methods/calibration.py)."""
    atomic.write_json(calibration_path(run_dir, task, setting, seed), record | {"config_hash": config_hash})


def read_calibration(run_dir: Path, task: str, setting: str, seed: int, config_hash: str,
                     repair: bool = False, required: bool = False) -> dict | None:
    """This config's calibration record (None: not written, unless `required`); `repair` as for
    `read_ft_log`."""
    return _side_record(calibration_path(run_dir, task, setting, seed), "calibration record", config_hash, repair,
                        required)


def learners_path(run_dir: Path, task: str, seed: int, rank: int) -> Path:
    return run_dir / "learners" / task / f"seed{seed}-r{rank}.json"


def write_learners(run_dir: Path, task: str, seed: int, rank: int, record: dict, config_hash: str) -> None:
    """One rank's learner-baseline predictions (methods/learners.py) of its share of a job's eval rows."""
    atomic.write_json(learners_path(run_dir, task, seed, rank), record | {"config_hash": config_hash})


def read_learners(run_dir: Path, task: str, seed: int, config_hash: str, rank: int | None = None,
                  repair: bool = False, required_ids: list[int] | None = None) -> dict | None:
    """{"knn"|"logreg": {example id: prediction}} over every rank's file of this config (or one
    rank's); None when there is none; `repair` as for `read_ft_log`; `required_ids`: an id without
    a prediction is an error naming the files."""
    paths = ([learners_path(run_dir, task, seed, rank)] if rank is not None
             else sorted((run_dir / "learners" / task).glob(f"seed{seed}-r*.json")))
    out: dict[str, dict[int, int]] = {}
    for p in paths:
        record = _side_record(p, "learner record", config_hash, repair)
        if record is None:
            continue
        for name in ("knn", "logreg"):
            out.setdefault(name, {}).update(zip(record["ids"], record[name]))
    missing = [i for i in required_ids or () if any(i not in out.get(n, {}) for n in ("knn", "logreg"))]
    if missing:
        raise records.Damaged(f"learner records {learners_path(run_dir, task, seed, 0).parent}/seed{seed}-r*.json: "
                              f"no prediction for example id {missing[0]} ({records.RERUN})")
    return out or None


def lr_point_path(run_dir: Path, task: str, setting: str, index: int, seed: int) -> Path:
    return run_dir / "lr_search" / task / setting / f"m{index}_seed{seed}.json"


def write_lr_point(run_dir: Path, record: dict, config_hash: str) -> None:
    """One grid point of the learning-rate search (lr_search.py)."""
    path = lr_point_path(run_dir, record["task"], record["setting"], record["index"], record["seed"])
    atomic.write_json(path, record | {"config_hash": config_hash})


def read_lr_point(run_dir: Path, task: str, setting: str, index: int, seed: int, config_hash: str) -> dict | None:
    """The point's record if this config wrote it, else None (to be run)."""
    return records.repairable(lr_point_path(run_dir, task, setting, index, seed), "lr point", config_hash)


def write_lr_search(run_dir: Path, task: str, summary: dict) -> None:
    atomic.write_json(run_dir / "lr_search" / f"{task}.json", summary)


def read_lr_search(run_dir: Path, task: str, config_hash: str, required: bool) -> dict | None:
    """For the report (every launch that searches rewrites it)."""
    return _side_record(run_dir / "lr_search" / f"{task}.json", "lr selection", config_hash, False, required)


def ft_weights_path(run_dir: Path, task: str, setting: str, seed: int) -> Path:
    return run_dir / "ft" / task / setting / f"seed{seed}.safetensors"


def write_ft_weights(run_dir: Path, task: str, setting: str, seed: int, trained, weights, config_hash: str) -> None:
    """The trained parameters after finetuning (δ for the linearized model), fp32, by name."""
    arrays = {t.name: w.detach().float().cpu().contiguous().numpy() for t, w in zip(trained, weights)}
    atomic.save_safetensors(ft_weights_path(run_dir, task, setting, seed), arrays,
                            {"config_hash": config_hash, "setting": setting, "holds": SETTINGS[setting].stores})


def remove_orphans(run_dir: Path, config_hash: str) -> list[Path]:
    """Shards renamed into place whose manifest update never happened (a kill in between), shards
    whose bytes no longer match their manifest's sha256 (damage), and temporary files: their
    records are redone, so the files go (and a damaged shard's manifest entry with them). A damaged
    manifest (or one of another config: `check_config` found the dir to be this config's) is rebuilt
    from its rank's shards first. Called by the launch holding the run-dir lock, before any rank
    writes, so every temporary file under the run dir is a killed writer's."""
    gone = atomic.remove_stale(run_dir, dead_only=False)
    root = run_dir / "shards"
    if not root.is_dir():
        return gone
    for jd in {p.parent for p in root.rglob("*") if p.is_file()}:
        ranks = {r for p in jd.glob("r*-*.safetensors") if (r := p.name.split("-")[0][1:]).isdigit()}
        for p in {jd / f"manifest-r{r}.json" for r in ranks} | set(jd.glob("manifest-r*.json")):
            try:
                if records.read(p, "manifest")["config_hash"] != config_hash:
                    raise records.Damaged(f"manifest {p}: another config's")
            except records.Damaged as e:   # missing too: the shards are kept, not redone
                log.warning("%s; rebuilding it from the shards", e)
                gone += rebuild_manifest(p, config_hash)
        seen: set[int] = set()
        for m in read_manifests(jd):
            good = []
            for s in m["shards"]:
                p = jd / s["file"]
                if not p.is_file():   # dropped by its writer on the rerun
                    good.append(s)
                elif atomic.sha256_file(p) == s["sha256"] and not seen & set(s["ids"]) \
                        and s["file"] not in {g["file"] for g in good}:   # not damaged, no record twice
                    seen.update(s["ids"])
                    good.append(s)
            if len(good) != len(m["shards"]):   # the rest are redone (the files go below, unlisted)
                atomic.write_json(Path(m["_path"]), {k: v for k, v in m.items() if k != "_path"} | {"shards": good})
        listed = {s["file"] for m in read_manifests(jd) for s in m["shards"]}
        for p in jd.iterdir():
            if p.suffix == ".safetensors" and p.name not in listed:
                p.unlink()
                gone.append(p)
    return gone


class RunLock:
    """One launch at a time per run dir: the main process holds an exclusive advisory lock
    (flock) on <run_dir>/.lock for the launch; the kernel drops it when the process ends, however
    it ends, so a dead launch leaves no stale lock. A second launch is refused with one line that
    names the holder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd = None

    def acquire(self) -> str | None:
        """None when taken; else why not (the holder)."""
        import fcntl
        import os
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return holder
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC".encode())
        self.fd = fd
        return None

    def release(self) -> None:
        import os

        if self.fd is not None:
            os.close(self.fd)   # closing drops the flock
            self.fd = None


PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "datasets", "safetensors", "numpy", "rich")


def write_invocation(run_dir: Path, clock, state, launch: dict, finished: bool,
                     peak_gpu_mib: float | None = None) -> None:
    """What ran this launch and how long each phase took (rewritten at the end of the launch);
    `launch`: its DeepSpeed config record and its precision (modeling/precision.py)."""
    import platform
    import time
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(clock.started))
    atomic.write_json(run_dir / "invocations" / f"{stamp}.json", {
        "started": stamp, "finished": finished, "world_size": state.num_processes, "device": str(state.device),
        "packages": versions, **launch, "phases_s": {k: round(v, 3) for k, v in clock.phases.items()},
        "wall_s": round(time.time() - clock.started, 3), "peak_gpu_mib": peak_gpu_mib})


def read_invocations(run_dir: Path) -> list[dict]:
    root = run_dir / "invocations"
    return [records.read(p, "launch record") for p in sorted(root.glob("*.json"))] if root.is_dir() else []


def failure_path(run_dir: Path, task: str, setting: str, seed: int, rank: int) -> Path:
    return run_dir / "failures" / task / setting / f"seed{seed}-r{rank}.json"


def write_failure(run_dir: Path, task: str, setting: str, seed: int, rank: int, error: BaseException,
                  config_hash: str) -> None:
    import traceback

    from icl_scale.errors import first_line

    atomic.write_json(failure_path(run_dir, task, setting, seed, rank), {
        "task": task, "setting": setting, "seed": seed, "rank": rank,
        "error": f"{type(error).__name__}: {first_line(error)}", "traceback": traceback.format_exception(error)[-6:],
        "config_hash": config_hash})


def clear_failure(run_dir: Path, task: str, setting: str, seed: int, rank: int) -> None:
    failure_path(run_dir, task, setting, seed, rank).unlink(missing_ok=True)


def unrepairable(run_dir: Path) -> str | None:
    """Why this run dir cannot be resumed as it is (a damaged launch record: provenance no rerun can
    recompute), or None. Damaged failure records go: a rerun redoes their jobs and records a
    failure again if one still fails."""
    for p in sorted((run_dir / "failures").rglob("*.json")):
        if records.repairable(p, "failure record") is None:
            p.unlink()
    try:
        read_invocations(run_dir)
    except records.Damaged as e:
        return str(e)
    return None


def read_failures(run_dir: Path) -> list[dict]:
    root = run_dir / "failures"
    return [records.read(p, "failure record") for p in sorted(root.rglob("*.json"))] if root.is_dir() else []
