"""Helpers of the tests: whole-job reads of a run's records (reports stream instead)."""

import json
from pathlib import Path

from safetensors import safe_open

from icl_scale.report.merge import SMALL, JobRecords
from icl_scale.runtime.rundir import job_dir, job_meta_path, load_run

ALL_KEYS = ("ids", "gold", "pred", "option_scores", "attn_out", "scores")


def read_shard(path: Path, keys=("ids", "gold", "pred", "option_scores")) -> dict:
    """Selected tensors of one shard as numpy arrays, plus its metadata under "_meta"."""
    with safe_open(str(path), framework="np") as f:
        out = {k: f.get_tensor(k) for k in keys if k in f.keys()}
        out["_meta"] = f.metadata()
    return out


def merge_job(job_dir: Path, config_hash: str, expected_ids: list[int], keys=SMALL) -> dict:
    """Every record of a job, sorted by id (for tests and small runs; reports stream instead).
    "scores" (ragged) comes back as a list of [L, H, n] arrays in the same order."""
    rec = JobRecords(job_dir, config_hash, expected_ids)
    out = rec.small(tuple(k for k in keys if k in SMALL))
    if {"attn_out", "scores"} & set(keys) and rec.has_capture():
        attn, maps = rec.large(rec.ids)
        if "attn_out" in keys:
            out["attn_out"] = attn
        if "scores" in keys:
            out["scores"] = maps
    return out


def run_records(run_dir: Path) -> dict:
    """{(task, setting, seed): merged records} of a finished run."""
    from icl_scale import config as C

    run = load_run(run_dir)
    cfg = run["config"]
    typed = C.build(cfg)
    out = {}
    for task in cfg["data"]["tasks"]:
        for seed in C.seeds_for(typed, task):
            meta = json.loads(job_meta_path(run_dir, task, seed).read_text())
            for setting in cfg["eval"]["methods"]:
                out[task, setting, seed] = merge_job(job_dir(run_dir, task, setting, seed), run["config_hash"],
                                                     meta["eval_ids"], ALL_KEYS)
    return out


def assert_same_records(a: dict, b: dict, atol=1e-5, rtol=1e-7):
    import numpy as np

    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        for k in ("ids", "gold", "pred"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{key} {k}")
        np.testing.assert_allclose(x["option_scores"], y["option_scores"], atol=atol, rtol=rtol, err_msg=str(key))
        np.testing.assert_allclose(x["attn_out"].astype("f4"), y["attn_out"].astype("f4"), atol=atol, rtol=rtol, err_msg=str(key))
        for s, t in zip(x["scores"], y["scores"]):
            np.testing.assert_allclose(s.astype("f4"), t.astype("f4"), atol=atol, rtol=rtol, err_msg=str(key))
