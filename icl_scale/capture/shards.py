"""Streamed, atomic, self-describing record shards.

A job dir (one task × setting × seed) holds, per rank:
    r{rank}-{seq:05d}.safetensors   records of one flush; written to a temporary name, then renamed
    manifest-r{rank}.json           config hash, rank, world size, shards with sha256/count/ids;
                                    rewritten (atomically) after every shard
Shard tensors (N records, L layers, H heads, d model width):
    ids int64 [N], gold int64 [N], pred int64 [N], option_scores float32 [N, n_options],
    attn_out [N, L, d], scores [sum of L·H·n_i], n_keys int64 [N]; attn_out and scores in the
    run's record dtype, float32 by default (float16: float32 where a value is beyond its range, as
    a diverged finetuning gives: kept, not inf)
and header metadata: schema, config hash, task, setting, seed, rank, world size, L, H.
safetensors files cannot be appended to, so records are buffered up to a byte bound and each
flush is a new file: a killed run loses at most the shard in progress.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_scale import atomic, records
from icl_scale.errors import UserError

SCHEMA = 1
FP16_MAX = float(np.finfo(np.float16).max)


def stored(x, dtype: str = "float16") -> np.ndarray:
    """A record's array as stored: float32, or float16 (half the size) unless a value is beyond its
    range. Takes numpy arrays or CPU tensors."""
    x = np.asarray(x, dtype=np.float32)
    return x if dtype == "float32" or bool((np.abs(x) > FP16_MAX).any()) else x.astype(np.float16)


def stacked(parts: list[np.ndarray], cat: bool = False) -> np.ndarray:
    """One shard array from records stored by `stored`: float32 if any of them is."""
    dtype = np.float32 if any(p.dtype == np.float32 for p in parts) else np.float16
    return np.ascontiguousarray((np.concatenate if cat else np.stack)([p.astype(dtype) for p in parts]))


def read_manifests(job_dir: Path, config_hash: str | None = None) -> list[dict]:
    """Every rank's manifest of a job; with `config_hash`, one written by another config is an error."""
    out = []
    for p in sorted(job_dir.glob("manifest-r*.json")):
        m = records.read(p, "manifest") | {"_path": str(p)}
        if config_hash is not None and m["config_hash"] != config_hash:
            raise UserError(f"manifest {p}: written by config {m['config_hash']}, not {config_hash}")
        out.append(m)
    return out


def rebuild_manifest(path: Path, config_hash: str) -> list[Path]:
    """A damaged manifest rewritten from its rank's shards (each shard's header says its config,
    task, setting, seed and rank; its ids tensor which records it holds); a shard that cannot be
    read or is another config's is deleted (its records are redone). Returns the deleted shards."""
    from safetensors import safe_open

    rank = int(path.name[len("manifest-r"):-len(".json")])
    shards, gone, head = [], [], None
    for p in sorted(path.parent.glob(f"r{rank}-*.safetensors")):
        try:
            with safe_open(str(p), framework="np") as f:
                meta, ids = f.metadata(), f.get_tensor("ids").tolist()
            if int(meta["rank"]) != rank or int(meta["schema"]) != SCHEMA or meta["config_hash"] != config_hash:
                raise ValueError("another rank's, schema's or config's shard")
        except Exception:   # truncated, garbage, foreign: its records are redone
            p.unlink()
            gone.append(p)
            continue
        head = head or meta
        shards.append({"file": p.name, "sha256": atomic.sha256_file(p), "count": len(ids), "ids": ids})
    if head is None:
        path.unlink()
        return gone
    atomic.write_json(path, {"schema": SCHEMA, "config_hash": config_hash, "task": head["task"],
                             "setting": head["setting"], "seed": int(head["seed"]), "rank": rank,
                             "world_size": int(head["world_size"]), "shards": shards, "rebuilt": True})
    return gone


def done_ids(job_dir: Path, config_hash: str) -> set[int]:
    """Ids held by complete shards of this config (resume skips them)."""
    ids: set[int] = set()
    for m in read_manifests(job_dir, config_hash):
        for s in m["shards"]:
            if (job_dir / s["file"]).is_file():
                ids.update(s["ids"])
    return ids


class ShardWriter:
    def __init__(self, job_dir: Path, meta: dict, rank: int, world_size: int, max_bytes: int,
                 record_dtype: str = "float32"):
        self.dir, self.rank, self.world_size, self.max_bytes = job_dir, rank, world_size, max_bytes
        self.record_dtype = record_dtype
        self.meta = {k: str(v) for k, v in meta.items()} | {"schema": str(SCHEMA), "rank": str(rank),
                                                            "world_size": str(world_size)}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / f"manifest-r{rank}.json"
        if self.manifest_path.is_file():
            self.manifest = records.read(self.manifest_path, "manifest")
            # keep only shards that really landed
            self.manifest["shards"] = [s for s in self.manifest["shards"] if (self.dir / s["file"]).is_file()]
        else:
            self.manifest = {"schema": SCHEMA, "config_hash": meta["config_hash"], "task": meta["task"],
                             "setting": meta["setting"], "seed": int(meta["seed"]), "rank": rank, "shards": []}
        self.manifest["world_size"] = world_size
        self.seq = 1 + max([int(s["file"].split("-")[1].split(".")[0]) for s in self.manifest["shards"]] or [-1])
        self.buf: list[dict] = []
        self.nbytes = 0

    def note(self, **fields) -> None:
        """Facts of this rank's pass kept in its manifest (e.g. the batch size it scored with)."""
        self.manifest.update(fields)

    def add(self, rec: dict) -> None:
        """rec: id, gold, pred, option_scores (list), and attn_out [L, d] / scores [L, H, n] (arrays or
        CPU tensors) or None."""
        rec = dict(rec)
        for key in ("attn_out", "scores"):  # buffered as stored, numpy
            if rec.get(key) is not None:
                rec[key] = stored(rec[key], self.record_dtype)
        self.buf.append(rec)
        self.nbytes += 64 + sum(t.nbytes for t in (rec.get("attn_out"), rec.get("scores")) if t is not None)
        if self.nbytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        recs, self.buf, self.nbytes = self.buf, [], 0
        tensors = {
            "ids": np.array([r["id"] for r in recs], dtype=np.int64),
            "gold": np.array([r["gold"] for r in recs], dtype=np.int64),
            "pred": np.array([r["pred"] for r in recs], dtype=np.int64),
            "option_scores": np.array([r["option_scores"] for r in recs], dtype=np.float32),
        }
        meta = dict(self.meta)
        if recs[0].get("attn_out") is not None:
            tensors["attn_out"] = stacked([r["attn_out"] for r in recs])
            tensors["scores"] = stacked([r["scores"].reshape(-1) for r in recs], cat=True)
            tensors["n_keys"] = np.array([r["scores"].shape[-1] for r in recs], dtype=np.int64)
            meta["n_layers"], meta["n_heads"] = str(recs[0]["scores"].shape[0]), str(recs[0]["scores"].shape[1])
        name = f"r{self.rank}-{self.seq:05d}.safetensors"
        digest = atomic.save_safetensors(self.dir / name, tensors, meta)
        self.seq += 1
        self.manifest["shards"].append({"file": name, "sha256": digest, "count": len(recs),
                                        "ids": [r["id"] for r in recs]})
        atomic.write_json(self.manifest_path, self.manifest)

    def close(self) -> None:
        """Flush what is buffered and rewrite the manifest (the world size of this launch)."""
        self.flush()
        atomic.write_json(self.manifest_path, self.manifest)


def split_scores(flat: np.ndarray, n_keys: np.ndarray, n_layers: int, n_heads: int) -> list[np.ndarray]:
    """Per-record [L, H, n] arrays from a shard's flat score buffer."""
    out, at = [], 0
    for n in n_keys:
        size = n_layers * n_heads * int(n)
        out.append(flat[at: at + size].reshape(n_layers, n_heads, int(n)))
        at += size
    return out


def verified_shards(job_dir: Path, config_hash: str) -> list[tuple[Path, dict]]:
    """Every shard listed by the job's manifests, checked: config hash, sha256, count, no id twice.
    Any problem is a UserError naming the file."""
    listed, seen = [], {}
    for m in read_manifests(job_dir, config_hash):
        for s in m["shards"]:
            p = job_dir / s["file"]
            if not p.is_file():
                raise UserError(f"shard {p}: listed in {m['_path']} but missing")
            if atomic.sha256_file(p) != s["sha256"]:
                raise UserError(f"shard {p}: sha256 does not match its manifest (corrupt)")
            for i in s["ids"]:
                if i in seen:
                    raise UserError(f"shard {p}: example id {i} also in {seen[i]}")
                seen[i] = p
            listed.append((p, s))
    for p in job_dir.glob("r*.safetensors"):
        if p not in {q for q, _ in listed}:
            raise UserError(f"shard {p}: not listed in any manifest")
    return listed
