"""Peak memory of the main job does not grow with the eval-set size.

    python bench/eval_memory.py [--small 200] [--large 2000] [--model smollm2-135m]

Runs `icl-scale run` (Subj, ZSL, capture on) as a subprocess for each eval size and prints each
peak RSS and their ratio."""

import argparse
import os
import resource
import subprocess
import sys
import tempfile


def peak_rss_mib(eval_max: int, model: str, data_dir: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        code = ("import resource, sys; from icl_scale.cli import main; rc = main(sys.argv[1:]); "
                "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
        cmd = [sys.executable, "-c", code, "run", "--model.name", model, "--data.tasks", "subj", "--eval.methods", "zsl",
               "--data.eval_max", str(eval_max), "--data.data_dir", data_dir,
               "--output.run_dir", f"{tmp}/run", "--output.report_dir", f"{tmp}/reports"]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        kib = [int(l.split()[1]) for l in out.stdout.splitlines() if l.startswith("PEAK_KIB")][0]
        return kib / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--large", type=int, default=2000)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args()
    small = peak_rss_mib(args.small, args.model, args.data_dir)
    large = peak_rss_mib(args.large, args.model, args.data_dir)
    print(f"peak RSS: {args.small} examples {small:.0f} MiB, {args.large} examples {large:.0f} MiB")
    print(f"peak RSS {args.large}/{args.small} = {large / small:.3f}x")


if __name__ == "__main__":
    main()
