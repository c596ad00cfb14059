"""Peak memory per rank to get a ZeRO-3 engine: the checkpoint loaded partitioned (zero.Init) vs
loaded whole on every rank and partitioned when the engine is built.

    python bench/zero3_load_memory.py [--model smollm2-135m] [--nproc 2] [--config ds_configs/zero3_offload.json]

Launches `accelerate launch` with nproc CPU processes once per way of loading; each rank loads the
model as `icl-scale run` does, builds the DeepSpeed engine and reports its peak anonymous
memory (sampled every 5 ms)."""

import argparse
import os
import threading
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(model: str, config: str, partitioned: bool) -> None:
    """In each launched process: load, build the engine, print this rank's peak RSS."""
    from functools import partial

    from icl_scale import config as C
    from icl_scale.methods.backend import DeepSpeedBackend
    from icl_scale.modeling.load import load_model
    from icl_scale.modeling.params import partitioned as is_partitioned, trained_params
    from icl_scale.runtime import dist
    from icl_scale.runtime.engine import loading, prepare_process

    peak, stop = [0], threading.Event()

    def sample():   # anonymous memory: the checkpoint's mmapped file pages are shared and reclaimable
        while not stop.wait(0.005):
            with open("/proc/self/status") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            peak[0] = max(peak[0], kib)

    threading.Thread(target=sample, daemon=True).start()
    proc = prepare_process(C.build({"finetune": {"deepspeed": config}}))
    state = proc.state
    accelerator = proc.accelerator(finetunes=True)
    model, _ = load_model(model, main_first=lambda: dist.main_first(state),
                          loading=lambda p: loading(accelerator, partitioned and p))
    at_load = is_partitioned(model)
    DeepSpeedBackend(accelerator, model, trained_params(model, "kv"), "sgd")
    stop.set()
    print(f"RANK {state.process_index} PEAK_KIB {peak[0]} PARTITIONED_AT_LOAD {at_load}", flush=True)
    dist.shutdown(state)


def peak_mib(model: str, config: str, nproc: int, partitioned: bool) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true",
               CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launcher/cpu_2proc.yaml"),
           "--num_processes", str(nproc), __file__, "--one", str(partitioned), "--model", model, "--config", config]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stdout[-2000:] + out.stderr[-3000:])
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("RANK ")]
    assert len(rows) == nproc and all(r[5] == str(partitioned) for r in rows), rows
    return max(int(r[3]) for r in rows) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--config", default="ds_configs/zero3_offload.json")
    ap.add_argument("--one", choices=("True", "False"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        return one(args.model, args.config, args.one == "True")
    whole = peak_mib(args.model, args.config, args.nproc, partitioned=False)
    part = peak_mib(args.model, args.config, args.nproc, partitioned=True)
    print(f"{args.model}, {args.nproc} CPU ranks, {args.config}: largest peak anonymous memory per rank, "
          f"loaded whole {whole:.0f} MiB, partitioned at load {part:.0f} MiB; partitioned/whole = {part / whole:.2f}x")


if __name__ == "__main__":
    main()
