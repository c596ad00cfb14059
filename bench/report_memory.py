"""Peak memory of report generation on a large run: it streams the shards, so it stays far below
the size of the records.

    python bench/report_memory.py [--examples 2000] [--layers 30] [--d 576] [--heads 9] [--keep DIR]

Writes a synthetic run dir through the runner's own ShardWriter (6 tasks × ZSL, ICL, FT,
layer-causal FT, linearized FT × N examples, random fp16 activations shaped like SmolLM2-135M's:
30 layers, d 576, 9 heads, 20–60 query tokens), then runs `icl-scale report` on it in a subprocess
and prints its peak RSS, the records' size on disk and their ratio."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from icl_scale import config as C
from icl_scale.capture.shards import ShardWriter
from icl_scale.runtime import rundir

TASKS = ("sst2", "sst5", "mr", "subj", "agnews", "cb")
SETTINGS = ("zsl", "icl", "ft", "ft_lc", "ft_lin")


def synth_run(run_dir: Path, n: int, layers: int, d: int, heads: int, tasks=TASKS) -> int:
    """A run dir as the runner writes it (config, job metas, shards, FT logs); returns the shards' bytes."""
    cfg = C.build({"data": {"tasks": list(tasks), "seeds": [1]}, "eval": {"methods": list(SETTINGS)},
                   "output": {"run_dir": str(run_dir)}})
    rundir.check_or_save_config(cfg, run_dir)
    h = C.config_hash(cfg)
    rng = np.random.default_rng(0)
    nbytes = 0
    for t, task in enumerate(tasks):
        rundir.write_job_meta(run_dir, task, 1, {
            "task": task, "seed": 1, "source": "synthetic", "eval_ids": list(range(n)), "eval_size_full": n,
            "eval_from_train": False, "k_requested": 32, "k_effective": 32, "prefix_tokens": 1500,
            "demo_ids": list(range(n, n + 32)), "ft_demo_ids": list(range(n, n + 32)), "options": [[1], [2]],
            "label_words": ["negative", "positive"], "eval_texts": [f"example {i}" for i in range(n)],
            "corrupted_demo_ids": [], "config_hash": h})
        n_keys = rng.integers(20, 61, n)
        for s in SETTINGS:
            w = ShardWriter(rundir.job_dir(run_dir, task, s, 1), {"config_hash": h, "task": task, "setting": s,
                                                                   "seed": 1}, 0, 1, 16 * 2**20)
            for i in range(n):
                w.add({"id": i, "gold": i % 2, "pred": int(rng.integers(0, 2)), "option_scores": [-1.0, -2.0],
                       "attn_out": torch.from_numpy(rng.standard_normal((layers, d), dtype=np.float32)),
                       "scores": torch.from_numpy(rng.standard_normal((layers, heads, int(n_keys[i])), dtype=np.float32))})
            w.close()
            nbytes += sum(p.stat().st_size for p in rundir.job_dir(run_dir, task, s, 1).glob("r*.safetensors"))
            if s.startswith("ft"):
                log = rundir.ft_log_path(run_dir, task, s, 1)
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(json.dumps({"method": s, "lr": 1e-3, "clip": "none", "clip_value": 1.0, "steps": 32,
                                           "skipped": 0, "losses": rng.random(32).tolist(),
                                           "grad_norms": rng.random((32, layers)).tolist(),
                                           "clipped": [[] for _ in range(32)], "config_hash": h}))
    return nbytes


def cli_peak_rss(argv: list[str]) -> tuple[int, int, float]:
    """(peak RSS, peak anonymous RSS — RSS less the file pages mapped, which the kernel can drop —
    in bytes, wall seconds) of `icl-scale <argv>` in a subprocess of one thread; the anonymous
    peak is polled every 20 ms from /proc."""
    code = ("import resource, sys; from icl_scale.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code, *argv], env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    anon = 0
    while p.poll() is None:
        try:
            anon = max([anon] + [int(x.split()[1]) * 1024 for x in open(f"/proc/{p.pid}/status")
                                 if x.startswith("RssAnon:")])
        except OSError:
            pass
        time.sleep(0.02)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(err)
    peak = [int(line.split()[1]) for line in out.splitlines() if line.startswith("PEAK_KIB")][0] * 1024
    return peak, anon, wall


def imports_rss(modules: str) -> int:
    """Peak RSS in bytes of a process that only imports `modules` (comma-separated)."""
    base = subprocess.run([sys.executable, "-c", f"import resource, {modules}; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    return int(base.stdout.strip()) * 1024


def synth_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the synthetic run's shape."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    return ap


def main():
    ap = synth_parser(__doc__)
    ap.add_argument("--keep", default="", help="write the synthetic run here and keep it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        run_dir = root / "run"
        t = time.perf_counter()
        nbytes = synth_run(run_dir, args.examples, args.layers, args.d, args.heads)
        print(f"synthetic run: {len(TASKS)} tasks × {len(SETTINGS)} settings × {args.examples} examples, "
              f"{args.layers} layers, {nbytes / 2**30:.2f} GiB of shards ({time.perf_counter() - t:.0f} s to write)")
        peak, anon, wall = cli_peak_rss(["report", str(run_dir), "--report-dir", str(root / "reports")])
        imports = imports_rss("icl_scale.report.render, matplotlib.pyplot")
        print(f"report: {wall:.0f} s, peak RSS {peak / 2**20:.0f} MiB, anonymous {anon / 2**20:.0f} MiB (imports "
              f"alone {imports / 2**20:.0f} MiB; target < 2048 MiB)")
        print(f"peak RSS / shard bytes = {peak / nbytes:.3f}x")


if __name__ == "__main__":
    main()
