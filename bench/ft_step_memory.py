"""Peak memory and time per finetuning step, on the same model and sequences:
- standard:           FT (one head, autograd)
- lean:               the lean linearized FT of methods/finetune.py
- reference:          reference-style linearized FT (reverse mode through a JVP over all parameters)
- layer_causal:       layer-causal FT of methods/finetune.py (each layer's head gradient taken at once)
- layer_causal_kept:  layer-causal FT as one plain autograd graph, every layer's logits kept

    python bench/ft_step_memory.py [--lengths 512,1024,2048] [--model smollm2-135m] [--methods standard,lean]

Each (method, length) runs in its own process: peak memory is that process's peak RSS minus its
RSS once the model is loaded (on a GPU: torch.cuda.max_memory_allocated). Prints a table and each
method's ratios to standard FT."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METHODS = ("standard", "lean", "reference", "layer_causal", "layer_causal_kept")


def one(method: str, length: int, model_name: str, steps: int) -> dict:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import psutil
    import torch
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from icl_scale.methods.losses import (layer_causal, layer_causal_loss, linearized_loss, sequence_nll,
                                          standard_loss)
    from icl_scale.modeling.load import load_model
    from icl_scale.modeling.params import final_norm, trained_params

    torch.set_num_threads(1)
    model, tok = load_model(model_name, "sdpa")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    trained = trained_params(model, "kv")
    params = [t.param for t in trained]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(dev)
    deltas = [torch.randn(p.shape, generator=g).to(dev) * 1e-3 for p in params]
    names = {id(p): n for n, p in model.named_parameters()}

    def step():
        if method == "standard":
            loss = standard_loss(model, ids)
            return torch.autograd.grad(loss, params)
        if method == "lean":
            loss = linearized_loss(model, trained, deltas, ids)
            return torch.autograd.grad(loss, params)
        if method == "layer_causal":
            return torch.autograd.grad(layer_causal_loss(model, ids)[0], params)
        if method == "layer_causal_kept":
            norm, head = final_norm(model), model.get_output_embeddings()
            with layer_causal(model) as outs:
                model.base_model(input_ids=ids)
            loss = torch.stack([sequence_nll(head(norm(h)), ids) for h in outs]).sum()
            return torch.autograd.grad(loss, params)
        # reference style: a tangent on every parameter (zero off k/v), reverse mode through the JVP
        ds = {id(t.param): d.clone().requires_grad_(True) for t, d in zip(trained, deltas)}
        with fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]):
            full = {n: fwAD.make_dual(p.detach().clone(), ds.get(id(p), torch.zeros_like(p)))
                    for n, p in model.named_parameters()}
            primal, tangent = fwAD.unpack_dual(functional_call(model, full, (ids,)).logits)
            loss = sequence_nll(primal + tangent, ids)
        return torch.autograd.grad(loss, list(ds.values()))

    base = psutil.Process().memory_info().rss
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    secs = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "length": length, "peak_mib": (peak - base) / 2**20, "step_s": secs,
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="512,1024,2048")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=0, help="timed steps, median reported (default: 1 on CPU, 5 on GPU)")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        import torch

        steps = args.steps or (5 if torch.cuda.is_available() else 1)
        print("RESULT", json.dumps(one(args.one[0], int(args.one[1]), args.model, steps)))
        return
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    methods = ["standard"] + [m for m in methods if m != "standard"]   # the ratios' denominator
    rows = {}
    for length in map(int, args.lengths.split(",")):
        for method in methods:
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                  "--one", method, str(length)],
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            rows[method, length] = json.loads(lines[0][7:]) if lines else {"error": (out.stderr.strip().splitlines()
                                                                                     or [f"exit {out.returncode}"])[-1]}
    print(f"{args.model} on {next((r['device'] for r in rows.values() if 'device' in r), '?')}; "
          "peak memory above the loaded model, median seconds per step; ratios to standard FT")
    print(f"{'length':>6} {'method':>17} {'peak MiB':>9} {'s/step':>8}  {'mem':>6} {'time':>6}")
    for length in map(int, args.lengths.split(",")):
        std = rows["standard", length]
        for method in methods:
            r = rows[method, length]
            if "error" in r:
                print(f"{length:>6} {method:>17}  failed: {r['error'][:80]}")
                continue
            ratio = ""
            if method != "standard" and "error" not in std:
                ratio = f"  {r['peak_mib'] / std['peak_mib']:>5.2f}x {r['step_s'] / std['step_s']:>5.2f}x"
            print(f"{length:>6} {method:>17} {r['peak_mib']:>9.0f} {r['step_s']:>8.2f}{ratio}")

if __name__ == "__main__":
    main()
