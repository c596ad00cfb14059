"""Peak memory of `icl-scale export` on a large run: it reads one shard at a time into Arrow files
written in batches, so its memory stays bounded by a shard, not by the run.

    python bench/export_memory.py [--examples 2000] [--layers 30] [--d 576] [--heads 9] [--tasks 1]

Writes a synthetic run dir (bench/report_memory.py's: ZSL, ICL and three FT settings per task ×
N examples, float32 activations shaped like SmolLM2-135M's), exports it in a subprocess and prints
the peak RSS and peak anonymous RSS, the records' bytes, their ratios, and the wall time."""

import tempfile
import time
from pathlib import Path

from report_memory import SETTINGS, TASKS, cli_peak_rss, imports_rss, synth_parser, synth_run


def main():
    ap = synth_parser(__doc__)
    ap.add_argument("--tasks", type=int, default=1, help="how many of the six tasks")
    args = ap.parse_args()
    tasks = TASKS[: args.tasks]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        nbytes = synth_run(root / "run", args.examples, args.layers, args.d, args.heads, tasks)
        print(f"synthetic run: {len(tasks)} task(s) × {len(SETTINGS)} settings × {args.examples} examples, "
              f"{args.layers} layers, {nbytes / 2**30:.2f} GiB of shards ({time.perf_counter() - t:.0f} s to write)")
        peak, anon, wall = cli_peak_rss(["export", str(root / "run"), "--to", str(root / "ds")])
        imports = imports_rss("icl_scale.export, datasets")
        size = sum(p.stat().st_size for p in (root / "ds").rglob("*") if p.is_file())
        print(f"export: {wall:.0f} s, peak RSS {peak / 2**20:.0f} MiB, anonymous {anon / 2**20:.0f} MiB (imports "
              f"alone {imports / 2**20:.0f} MiB), dataset {size / 2**30:.2f} GiB")
        print(f"peak RSS / shard bytes = {peak / nbytes:.3f}x, anonymous / shard bytes = {anon / nbytes:.3f}x "
              "(the rest of the RSS is the Arrow files' mapped pages, which the kernel drops under pressure)")


if __name__ == "__main__":
    main()
