"""How much float16 records move the similarity figures: one real job (task × seed, ZSL, ICL and
FT) run twice, records in float32 and in float16, the same figures computed from each.

    python bench/record_precision.py --model gemma3-270m --task sst5 --eval-max 24

Prints, per figure, the float32 value, the float16 value and their difference (mean over examples
and layers), and the largest per-layer difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("simaou/ft", "simaou/ft/shuffled", "simaou/ft/excess", "simaou/ft/orth", "simam/zsl", "simam/ft",
           "simam_delta/ft", "simam_delta/ft/centred", "simam_delta/ft/softmax")


def run(out: Path, dtype: str, args) -> dict:
    cmd = [sys.executable, "-m", "icl_scale", "run", "--model.name", args.model, "--data.tasks", args.task,
           "--data.eval_max", str(args.eval_max), "--data.data_dir", args.data_dir, "--eval.methods", "zsl,icl,ft",
           "--model.max_length", str(args.max_length), "--output.record_dtype", dtype,
           "--output.run_dir", str(out / dtype), "--output.report_dir", str(out / "reports")]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr[-3000:])
    results = json.loads((out / "reports" / dtype / "results.json").read_text())
    return results["tasks"][args.task]["seeds"]["1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--task", default="sst5")
    ap.add_argument("--eval-max", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        full, half = (run(Path(tmp), dtype, args) for dtype in ("float32", "float16"))
    print(f"{args.model}, {args.task}, {args.eval_max} examples: float16 records minus float32 records")
    print(f"{'figure':28s} {'float32':>10s} {'float16':>10s} {'difference':>11s} {'max layer diff':>15s}")
    for key in FIGURES:
        a, b = full["similarity"].get(key), half["similarity"].get(key)
        if a is None or b is None:
            print(f"{key:28s} {'undefined':>10s}")
            continue
        layer = max(abs(x - y) for x, y in zip(full["layers"][key], half["layers"][key])
                    if x is not None and y is not None)
        print(f"{key:28s} {a:10.5f} {b:10.5f} {b - a:+11.5f} {layer:15.5f}")


if __name__ == "__main__":
    main()
