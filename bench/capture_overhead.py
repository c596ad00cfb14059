"""Overhead of the capture points on ICL evaluation (prefix cache on, real offline model).

    python bench/capture_overhead.py [--queries 30]

Times each query with and without capture, alternating, and prints the ratio of medians."""

import argparse

from common import agnews_setup, median, timed

from icl_scale.methods.evaluate import PrefixCache, score_query


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    model, enc, prompt, rows = agnews_setup(args.data_dir, args.queries, args.model)
    cache = PrefixCache(model, prompt.prefix_ids)
    on, off = [], []
    for row in rows:
        q = enc.input_ids(row)
        off.append(timed(lambda: score_query(model, cache, q, enc.options(), do_capture=False))[0])
        on.append(timed(lambda: score_query(model, cache, q, enc.options(), do_capture=True))[0])
    print(f"median s/query: capture off {median(off):.4f}, on {median(on):.4f} ({len(rows)} queries)")
    print(f"capture overhead = {100 * (median(on) / median(off) - 1):+.1f}% (on/off = {median(on) / median(off):.3f}x)")


if __name__ == "__main__":
    main()
