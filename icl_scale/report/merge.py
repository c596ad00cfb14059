"""Merge a job's shards into per-example arrays keyed and sorted by example id."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_scale.capture.shards import read_shard, split_scores, verified_shards
from icl_scale.errors import UserError


def merge_job(job_dir: Path, config_hash: str, expected_ids: list[int],
              keys=("ids", "gold", "pred", "option_scores")) -> dict:
    """Records of every shard of a job, sorted by id; each expected id exactly once.
    Arrays per key; "scores" (ragged) comes back as a list of [L, H, n] arrays in the same order."""
    if not job_dir.is_dir():
        raise UserError(f"job dir {job_dir}: missing (run not finished?)")
    want_keys = set(keys) | {"ids"} | ({"n_keys"} if "scores" in keys else set())
    parts = [read_shard(p, tuple(want_keys)) for p, _ in verified_shards(job_dir, config_hash)]
    if not parts:
        raise UserError(f"job dir {job_dir}: no shards")
    ids = np.concatenate([p["ids"] for p in parts])
    want = np.array(sorted(expected_ids))
    got = np.sort(ids)
    if len(got) != len(want) or not np.array_equal(got, want):
        missing = sorted(set(want.tolist()) - set(got.tolist()))[:5]
        extra = sorted(set(got.tolist()) - set(want.tolist()))[:5]
        raise UserError(f"job dir {job_dir}: records do not match the eval set "
                        f"({len(got)} of {len(want)}; missing e.g. {missing}, unexpected e.g. {extra})")
    order = np.argsort(ids, kind="stable")
    out = {k: np.concatenate([p[k] for p in parts])[order] for k in keys if k != "scores" and k in parts[0]}
    if "scores" in keys and "scores" in parts[0]:
        ragged = [s for p in parts for s in split_scores(p["scores"], p["n_keys"], int(p["_meta"]["n_layers"]),
                                                          int(p["_meta"]["n_heads"]))]
        out["scores"] = [ragged[i] for i in order]
    return out
