"""Speed-up of reusing the demonstration prefix's KV cache over recomputing every prompt.

    python bench/icl_prefix_cache.py [--queries 12] [--data-dir ../shared/data]

Real offline model, AG News ICL prompts fitted to --max-length (2048: ≈1,800-token prefix,
≈70-token queries). Two baselines recompute the whole prompt per query: one reads only the logits
it needs (as our path does), one computes logits at every position (as the reference code did).
Prints median seconds per query, the ratios, and whether every prediction agrees."""

import torch

import argparse

from common import agnews_setup, median, score_full, score_query, timed

from icl_scale.methods.evaluate import BatchSizer, PrefixCache, score_batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=0, help="queries per forward in the batched run (0: the automatic "
                    "size the runner would choose, eval.batch_size 0)")
    args = ap.parse_args()
    model, enc, prompt, rows = agnews_setup(args.data_dir, args.queries, args.model, args.max_length)
    build, cache = timed(lambda: PrefixCache(model, prompt.prefix_ids))
    cached, full, ref, same, preds = [], [], [], 0, []
    qlens = []
    for row in rows:
        q = enc.input_ids(row)
        qlens.append(len(q))
        t1, a = timed(lambda: score_query(model, cache, q, enc.options(), do_capture=False))
        t2, b = timed(lambda: score_full(model, prompt.prefix_ids, q, enc.options(), do_capture=False))
        t3, _ = timed(lambda: reference_style(model, prompt.prefix_ids, q))
        cached.append(t1)
        full.append(t2)
        ref.append(t3)
        same += a.pred == b.pred
        preds.append(b.pred)
    # as the runner does: queries sorted by length so a batch pads little
    order = sorted(range(len(rows)), key=lambda i: len(enc.input_ids(rows[i])))
    queries = [enc.input_ids(rows[i]) for i in order]
    preds = [preds[i] for i in order]
    size = args.batch or BatchSizer(0).size(model, cache, queries, enc.options(), "prediction", False)
    batched, batch_preds = [], []
    for i in range(0, len(queries), size):
        t, out = timed(lambda: score_batch(model, cache, queries[i:i + size], enc.options(), do_capture=False))
        batched.append(t / len(queries[i:i + size]))
        batch_preds += [s.pred for s in out]
    print(f"{args.model} on {torch.cuda.get_device_name() if model.device.type == 'cuda' else 'cpu'}")
    print(f"prefix {len(prompt.prefix_ids)} tokens (K={prompt.k_effective}), queries median {median(qlens)} tokens, "
          f"{len(rows)} queries; prefix built once in {build:.3f}s")
    print(f"median s/query: prefix reuse {median(cached):.4f}, full recompute {median(full):.4f}, "
          f"full recompute with all logits {median(ref):.4f}")
    print(f"prefix reuse speed-up = {median(full) / median(cached):.1f}x over full recompute, "
          f"{median(ref) / median(cached):.1f}x over reference-style recompute (same predictions: {same}/{len(rows)})")
    print(f"prefix reuse, batches of {size}{'' if args.batch else ' (automatic)'}: {median(batched):.4f} s/query "
          f"= {median(cached) / median(batched):.2f}x batch 1, speed-up = "
          f"{median(full) / median(batched):.1f}x over full recompute, {median(ref) / median(batched):.1f}x over "
          f"reference-style (same predictions: {sum(map(int.__eq__, preds, batch_preds))}/{len(rows)})")


def reference_style(model, prefix_ids, q):
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(prefix_ids) + q], device=model.device)).logits[0, -1]


if __name__ == "__main__":
    main()
