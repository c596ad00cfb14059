"""Every JSON file a run writes and reads back, read through one validating reader per kind.

A missing, empty, truncated, garbage or schema-violating file is a `Damaged` error naming the file
and what is wrong. The run reads with `repairable`, which gives None for a damaged file (and logs
it), so the record is recomputed and rewritten; the report reads with `read`, which stops with the
one line, since a report cannot recompute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from icl_scale.errors import UserError

log = logging.getLogger("icl_scale")

NUM = (int, float)
OPT_NUM = (int, float, type(None))

# kind -> required field -> accepted types (bool is never taken for a number)
KINDS: dict[str, dict[str, tuple]] = {
    "run config": {"config_hash": (str,), "config": (dict,), "result_fields": (dict,)},
    "job meta": {"config_hash": (str,), "task": (str,), "seed": (int,), "eval_ids": (list,), "demo_ids": (list,),
                 "ft_demo_ids": (list,), "k_effective": (int,), "options": (list,), "label_words": (list,)},
    "manifest": {"schema": (int,), "config_hash": (str,), "task": (str,), "setting": (str,), "rank": (int,),
                 "shards": (list,)},
    "FT log": {"config_hash": (str,), "method": (str,), "lr": NUM, "clip": (str,), "steps": (int,),
               "skipped": (int,), "losses": (list,), "grad_norms": (list,), "clipped": (list,)},
    "failure record": {"config_hash": (str,), "task": (str,), "setting": (str,), "seed": (int, str), "rank": (int,),
                       "error": (str,)},
    "launch record": {"started": (str,), "finished": (bool,), "world_size": (int,), "device": (str,),
                      "packages": (dict,), "phases_s": (dict,), "wall_s": NUM},
    "progress file": {"done": (int,), "jobs_done": (int,)},
    "calibration record": {"config_hash": (str,), "mode": (str,), "mean": (list,), "option_probs": (list,)},
    "learner record": {"config_hash": (str,), "ids": (list,), "knn": (list,), "logreg": (list,)},
    "lr point": {"config_hash": (str,), "task": (str,), "setting": (str,), "seed": (int,), "index": (int,),
                 "lr": NUM, "dev_n": (int,), "dev_correct": (int,), "final_loss": OPT_NUM, "finite": (bool,)},
    "lr selection": {"config_hash": (str,), "task": (str,), "rates": (dict,), "searches": (dict,)},
    "sweep record": {"members": (list,)},
    "sweep failure": {"member": (str,), "error": (str,)},
}
# what the user can do about a damaged file of each kind (the run recomputes the others itself)
RERUN = "rerun the same command to rebuild it"
HINTS = {"run config": "rerun the same command to rewrite it", "job meta": RERUN,
         "manifest": "rerun the same command to rebuild it from the shards",
         "FT log": RERUN, "calibration record": RERUN, "learner record": RERUN, "lr point": RERUN,
         "lr selection": RERUN, "progress file": RERUN,
         "failure record": "delete it: a rerun records the failure again if the job still fails",
         "launch record": "its launch's provenance cannot be recomputed: delete it to go on without it",
         "sweep record": "rerun the same sweep command to rewrite it",
         "sweep failure": "delete it: rerunning the sweep records the failure again if the member still fails"}
SHARD_ENTRY = {"file": (str,), "sha256": (str,), "count": (int,), "ids": (list,)}


class Damaged(UserError):
    """A file the run wrote is missing, unreadable or not what it should be."""


def _typed(value, types: tuple) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _problem(record, schema: dict) -> str | None:
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    for field, types in schema.items():
        if field not in record:
            return f"field {field!r} missing"
        if not _typed(record[field], types):
            return f"field {field!r} is {type(record[field]).__name__}, not {'/'.join(t.__name__ for t in types)}"
    return None


def check(record, kind: str) -> str | None:
    """What is wrong with a parsed record of `kind`, or None."""
    problem = _problem(record, KINDS[kind])
    if problem is None and kind == "manifest":
        for n, s in enumerate(record["shards"]):
            problem = _problem(s, SHARD_ENTRY)
            if problem is None and (s["count"] != len(s["ids"]) or not all(_typed(i, (int,)) for i in s["ids"])):
                problem = f"count {s['count']} but {len(s['ids'])} ids"
            if problem is not None:
                return f"shards[{n}]: {problem}"
    if problem is None and kind == "FT log" and len(record["grad_norms"]) != len(record["losses"]):
        problem = f"{len(record['losses'])} losses but {len(record['grad_norms'])} rows of gradient norms"
    return problem


def read(path: Path, kind: str) -> dict:
    """The record at `path`; anything wrong is a `Damaged` error naming the file and what to do."""
    try:
        return _read(Path(path), kind)
    except Damaged as e:
        raise Damaged(f"{e} ({HINTS[kind]})") from None


def _read(path: Path, kind: str) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise Damaged(f"{kind} {path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Damaged(f"{kind} {path}: unreadable ({type(e).__name__})") from None
    if not text.strip():
        raise Damaged(f"{kind} {path}: empty")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise Damaged(f"{kind} {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    problem = check(record, kind)
    if problem is not None:
        raise Damaged(f"{kind} {path}: {problem}")
    return record


def read_if_any(path: Path, kind: str) -> dict | None:
    """`read`, or None where there is no file."""
    return read(path, kind) if Path(path).is_file() else None


def repairable(path: Path, kind: str, config_hash: str | None = None) -> dict | None:
    """The record if it is there, sound and (with `config_hash`) this config's; else None, so the
    caller recomputes and rewrites it (a damaged one is logged)."""
    if not Path(path).is_file():
        return None
    try:
        record = _read(Path(path), kind)
    except Damaged as e:
        log.warning("%s; recomputing it", e)
        return None
    if config_hash is not None and record.get("config_hash") != config_hash:
        return None
    return record


def of_config(record: dict | None, config_hash: str, path: Path, kind: str) -> dict | None:
    """For the report: a record another config wrote is an error naming the file."""
    if record is not None and record["config_hash"] != config_hash:
        raise Damaged(f"{kind} {path}: written by config {record['config_hash']}, not this run's {config_hash} "
                      f"(rerun the run to recompute it)")
    return record
