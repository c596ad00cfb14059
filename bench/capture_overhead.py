"""Overhead of the capture points on ICL evaluation (prefix cache on, real offline model).

    python bench/capture_overhead.py [--queries 30]

Times each query with and without capture, alternating, and prints the ratio of medians."""

import argparse

from common import agnews_setup, median, timed

from icl_scale.methods.evaluate import PrefixCache, score_batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=1, help="queries per forward (--eval.batch)")
    args = ap.parse_args()
    model, enc, prompt, rows = agnews_setup(args.data_dir, args.queries, args.model)
    cache = PrefixCache(model, prompt.prefix_ids)
    queries = [enc.input_ids(row) for row in rows]
    on, off = [], []
    for i in range(0, len(queries), args.batch):
        qs = queries[i:i + args.batch]
        off.append(timed(lambda: score_batch(model, cache, qs, enc.options(), do_capture=False))[0] / len(qs))
        on.append(timed(lambda: score_batch(model, cache, qs, enc.options(), do_capture=True))[0] / len(qs))
    print(f"{args.model} on {model.device}, batches of {args.batch}")
    print(f"median s/query: capture off {median(off):.4f}, on {median(on):.4f} ({len(rows)} queries)")
    print(f"capture overhead = {100 * (median(on) / median(off) - 1):+.1f}% (on/off = {median(on) / median(off):.3f}x)")


if __name__ == "__main__":
    main()
