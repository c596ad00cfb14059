"""Streamed, atomic, self-describing record shards.

A job dir (one task × setting × seed) holds, per rank:
    r{rank}-{seq:05d}.safetensors   records of one flush; written to a temporary name, then renamed
    manifest-r{rank}.json           config hash, rank, world size, shards with sha256/count/ids;
                                    rewritten (atomically) after every shard
    COMPLETE-r{rank}.json           written when the rank has done its whole share
Shard tensors (N records, L layers, H heads, d model width):
    ids int64 [N], gold int64 [N], pred int64 [N], option_scores float32 [N, n_options],
    attn_out float16 [N, L, d], scores float16 [sum of L·H·n_i], n_keys int64 [N]
    (float32 where a value is beyond float16's range, as a diverged finetuning gives: kept, not inf)
and header metadata: schema, config hash, task, setting, seed, rank, world size, L, H.
safetensors files cannot be appended to, so records are buffered up to a byte bound and each
flush is a new file: a killed run loses at most the shard in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from icl_scale.errors import UserError

SCHEMA = 1
FP16_MAX = torch.finfo(torch.float16).max


def stored(t: torch.Tensor) -> torch.Tensor:
    """float16 halves the shards; a tensor with a value beyond its range stays float32."""
    return t.to(torch.float32 if bool((t.abs() > FP16_MAX).any()) else torch.float16)


def stacked(parts: list[torch.Tensor], cat: bool = False) -> torch.Tensor:
    """One shard tensor from records stored by `stored`: float32 if any of them is."""
    dtype = torch.float32 if any(p.dtype == torch.float32 for p in parts) else torch.float16
    return (torch.cat if cat else torch.stack)([p.to(dtype) for p in parts]).contiguous()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_file(tensors: dict, path: Path, metadata: dict) -> str:
    """Write a safetensors file under a temporary name, rename it into place; its sha256."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifests(job_dir: Path, config_hash: str | None = None) -> list[dict]:
    """Every rank's manifest of a job; with `config_hash`, one written by another config is an error."""
    out = []
    for p in sorted(job_dir.glob("manifest-r*.json")):
        try:
            m = json.loads(p.read_text()) | {"_path": str(p)}
        except json.JSONDecodeError:
            raise UserError(f"manifest {p}: not valid JSON") from None
        if config_hash is not None and m["config_hash"] != config_hash:
            raise UserError(f"manifest {p}: written by config {m['config_hash']}, not {config_hash}")
        out.append(m)
    return out


def done_ids(job_dir: Path, config_hash: str) -> set[int]:
    """Ids held by complete shards of this config (resume skips them)."""
    ids: set[int] = set()
    for m in read_manifests(job_dir, config_hash):
        for s in m["shards"]:
            if (job_dir / s["file"]).is_file():
                ids.update(s["ids"])
    return ids


class ShardWriter:
    def __init__(self, job_dir: Path, meta: dict, rank: int, world_size: int, max_bytes: int):
        self.dir, self.rank, self.world_size, self.max_bytes = job_dir, rank, world_size, max_bytes
        self.meta = {k: str(v) for k, v in meta.items()} | {"schema": str(SCHEMA), "rank": str(rank),
                                                            "world_size": str(world_size)}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / f"manifest-r{rank}.json"
        if self.manifest_path.is_file():
            self.manifest = json.loads(self.manifest_path.read_text())
            # keep only shards that really landed
            self.manifest["shards"] = [s for s in self.manifest["shards"] if (self.dir / s["file"]).is_file()]
        else:
            self.manifest = {"schema": SCHEMA, "config_hash": meta["config_hash"], "task": meta["task"],
                             "setting": meta["setting"], "seed": int(meta["seed"]), "rank": rank, "shards": []}
        self.manifest["world_size"] = world_size
        self.seq = 1 + max([int(s["file"].split("-")[1].split(".")[0]) for s in self.manifest["shards"]] or [-1])
        self.buf: list[dict] = []
        self.nbytes = 0

    def add(self, rec: dict) -> None:
        """rec: id, gold, pred, option_scores (list), and attn_out [L, d] / scores [L, H, n] or None."""
        rec = dict(rec)
        for key in ("attn_out", "scores"):  # buffered as stored
            if rec.get(key) is not None:
                rec[key] = stored(rec[key])
        self.buf.append(rec)
        self.nbytes += 64 + sum(t.nbytes for t in (rec.get("attn_out"), rec.get("scores")) if t is not None)
        if self.nbytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        recs, self.buf, self.nbytes = self.buf, [], 0
        tensors = {
            "ids": torch.tensor([r["id"] for r in recs], dtype=torch.int64),
            "gold": torch.tensor([r["gold"] for r in recs], dtype=torch.int64),
            "pred": torch.tensor([r["pred"] for r in recs], dtype=torch.int64),
            "option_scores": torch.tensor([r["option_scores"] for r in recs], dtype=torch.float32),
        }
        meta = dict(self.meta)
        if recs[0].get("attn_out") is not None:
            tensors["attn_out"] = stacked([r["attn_out"] for r in recs])
            tensors["scores"] = stacked([r["scores"].reshape(-1) for r in recs], cat=True)
            tensors["n_keys"] = torch.tensor([r["scores"].shape[-1] for r in recs], dtype=torch.int64)
            meta["n_layers"], meta["n_heads"] = str(recs[0]["scores"].shape[0]), str(recs[0]["scores"].shape[1])
        name = f"r{self.rank}-{self.seq:05d}.safetensors"
        digest = atomic_save_file(tensors, self.dir / name, meta)
        self.seq += 1
        self.manifest["shards"].append({"file": name, "sha256": digest, "count": len(recs),
                                        "ids": [r["id"] for r in recs]})
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1))

    def close(self, expected: int) -> None:
        """Flush and mark this rank's share complete; `expected` is the size of its share."""
        self.flush()
        atomic_write_text(self.manifest_path, json.dumps(self.manifest, indent=1))
        done = sum(s["count"] for s in self.manifest["shards"])
        atomic_write_text(self.dir / f"COMPLETE-r{self.rank}.json",
                          json.dumps({"rank": self.rank, "world_size": self.world_size, "share": expected,
                                      "records_in_manifest": done}))


def read_shard(path: Path, keys=("ids", "gold", "pred", "option_scores")) -> dict:
    """Selected tensors of one shard as numpy arrays, plus its metadata under "_meta"."""
    with safe_open(str(path), framework="pt") as f:
        out = {k: f.get_tensor(k).numpy() for k in keys if k in f.keys()}
        out["_meta"] = f.metadata()
    return out


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
            if sha256_file(p) != s["sha256"]:
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
