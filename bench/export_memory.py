"""Peak memory of `icl-scale export` on a large run: it reads one shard at a time into Arrow files
written in batches, so its memory stays bounded by a shard, not by the run.

    python bench/export_memory.py [--examples 2000] [--layers 30] [--d 576] [--heads 9] [--tasks 1]

Writes a synthetic run dir (bench/report_memory.py's: ZSL, ICL and three FT settings per task ×
N examples, float32 activations shaped like SmolLM2-135M's), exports it in a subprocess and prints
the peak RSS, the records' bytes, their ratio, and the wall time."""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_memory import SETTINGS, TASKS, synth_run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--tasks", type=int, default=1, help="how many of the six tasks")
    args = ap.parse_args()
    tasks = TASKS[: args.tasks]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        nbytes = synth_run(root / "run", args.examples, args.layers, args.d, args.heads, tasks)
        print(f"synthetic run: {len(tasks)} task(s) × {len(SETTINGS)} settings × {args.examples} examples, "
              f"{args.layers} layers, {nbytes / 2**30:.2f} GiB of shards ({time.perf_counter() - t:.0f} s to write)")
        code = ("import resource, sys; from icl_scale.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, "export", str(root / "run"), "--to", str(root / "ds")],
                             env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if out.returncode != 0:
            sys.exit(out.stderr)
        peak = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("PEAK_KIB")][0] * 1024
        base = subprocess.run([sys.executable, "-c", "import resource, icl_scale.export, datasets; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              env=env, capture_output=True, text=True)
        imports = int(base.stdout.strip()) * 1024
        size = sum(p.stat().st_size for p in (root / "ds").rglob("*") if p.is_file())
        print(f"export: {wall:.0f} s, peak RSS {peak / 2**20:.0f} MiB (imports alone {imports / 2**20:.0f} MiB), "
              f"dataset {size / 2**30:.2f} GiB")
        print(f"peak RSS / shard bytes = {peak / nbytes:.3f}x")


if __name__ == "__main__":
    main()
