"""Read a job's shards, verified, joined by example id.

`JobRecords` checks every shard first (manifest config hash, sha256, each expected id exactly
once, no unlisted shard, the shard's own header) — any problem is an error naming the file, never a
shorter table — then serves the small per-example fields whole and the large ones (attention
outputs, attention maps) for any list of ids, one shard in memory at a time, so a report streams
over runs of any size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors import safe_open

from icl_scale.capture.shards import split_scores, verified_shards
from icl_scale.errors import UserError

SMALL = ("ids", "gold", "pred", "option_scores")


class JobRecords:
    def __init__(self, job_dir: Path, config_hash: str, expected_ids: list[int]):
        if not job_dir.is_dir():
            raise UserError(f"job dir {job_dir}: missing (run not finished?)")
        self.dir, self.hash = job_dir, config_hash
        self.shards = verified_shards(job_dir, config_hash)
        if not self.shards:
            raise UserError(f"job dir {job_dir}: no shards")
        self.where: dict[int, tuple[Path, int]] = {}
        for path, entry in self.shards:
            for row, i in enumerate(entry["ids"]):
                self.where[i] = (path, row)
        want, got = sorted(expected_ids), sorted(self.where)
        if want != got:
            missing = sorted(set(want) - set(got))[:5]
            extra = sorted(set(got) - set(want))[:5]
            raise UserError(f"job dir {job_dir}: records do not match the eval set "
                            f"({len(got)} of {len(want)}; missing e.g. {missing}, unexpected e.g. {extra})")
        self.ids = want
        self._cached: tuple[Path, dict] | None = None

    def _load(self, path: Path, keys) -> dict:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            if meta.get("config_hash") != self.hash:
                raise UserError(f"shard {path}: written by config {meta.get('config_hash')}, not {self.hash}")
            out = {k: f.get_tensor(k) for k in keys if k in f.keys()}
        listed = next(e["ids"] for p, e in self.shards if p == path)
        if "ids" in out and out["ids"].tolist() != listed:
            raise UserError(f"shard {path}: its ids differ from its manifest entry")
        out["_meta"] = meta
        return out

    def small(self, keys=SMALL) -> dict:
        """Per-example fields as arrays sorted by id."""
        parts = [self._load(p, tuple(set(keys) | {"ids"})) for p, _ in self.shards]
        ids = np.concatenate([p["ids"] for p in parts])
        order = np.argsort(ids, kind="stable")
        return {k: np.concatenate([p[k] for p in parts])[order] for k in keys if k in parts[0]}

    def release(self) -> None:
        """Drop the decoded shard kept for the next `large` call."""
        self._cached = None

    def has_capture(self) -> bool:
        with safe_open(str(self.shards[0][0]), framework="np") as f:
            return "attn_out" in f.keys()

    def chunks(self):
        """The job's ids in shard order, one shard's worth at a time (the cheapest order to read)."""
        for _, entry in self.shards:
            yield list(entry["ids"])

    def large(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """attn_out [n, L, d] (as stored: fp16, or fp32) and the attention maps ([L, H, n_keys] each) of `ids`, in that
        order. Reads shard by shard; one decoded shard is kept for the next call."""
        attn, scores = [None] * len(ids), [None] * len(ids)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for k, i in enumerate(ids):
            path, row = self.where[i]
            by_shard.setdefault(path, []).append((k, row))
        for path, wanted in by_shard.items():
            if self._cached is None or self._cached[0] != path:
                self._cached = None   # drop the old shard before decoding the next
                part = self._load(path, ("ids", "attn_out", "scores", "n_keys"))
                if "attn_out" not in part:
                    raise UserError(f"shard {path}: no captured activations (run with eval.capture true)")
                meta = part["_meta"]
                part["maps"] = split_scores(part.pop("scores"), part["n_keys"], int(meta["n_layers"]),
                                            int(meta["n_heads"]))
                self._cached = (path, part)
            part = self._cached[1]
            for k, row in wanted:
                attn[k], scores[k] = part["attn_out"][row], part["maps"][row]
        return np.stack(attn), scores
