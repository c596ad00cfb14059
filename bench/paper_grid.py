"""Wall time of the `paper` grid on this device, measured on a fraction of it and scaled up.

    python bench/paper_grid.py --shape smollm2-135m --tasks sst2 --eval-max 8     # CPU, minutes
    python bench/paper_grid.py --shape fairseq-dense-1.3b --dtype bfloat16 --eval-max 200   # one GPU

A random-weights model of the named shape (the timings do not depend on the weights; the
tokenizer is SmolLM2's, so a vocabulary smaller than its 49,152 is raised to it) is saved to a dir
and run through `icl-scale suite --preset paper` — every setting, learning-rate search, the
automatic batch size — on the chosen tasks, seeds, variants and eval cap. From the launch's
per-phase wall times and the plan's exact counts it prints queries/s, FT steps/s and grid points/s,
the full grid's projected wall time (the same tasks at the preset's eval sizes, seeds and
variants), and the evaluation's model FLOP utilisation: model FLOPs of every scored query and
prefix (2·params·tokens plus attention; the linearized model's extra passes not counted) over the
evaluate phase's time, against the device's peak (a table for known GPUs; on a CPU the rate of a
large float32 matmul measured here; `--peak-tflops` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from icl_scale import config as C  # noqa: E402
from icl_scale.lr_search import searched_settings  # noqa: E402
from icl_scale.plan import plan  # noqa: E402
from icl_scale.settings import SETTINGS, VARIANTS  # noqa: E402

SHAPES = {   # model_type, config fields
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                                   tie_word_embeddings=True)),
    "fairseq-dense-1.3b": ("xglm", dict(d_model=2048, ffn_dim=8192, num_layers=24, attention_heads=16,
                                        vocab_size=51200, max_position_embeddings=2048)),
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                               vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)),
}
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def build_model(shape: str, dtype: str, root: Path) -> Path:
    """A random-weights checkpoint of the shape with SmolLM2's tokenizer, made once."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from icl_scale.modeling.load import resolve_offline

    target = root / f"{shape}-{dtype}"
    if (target / "config.json").is_file():
        return target
    tok = AutoTokenizer.from_pretrained(resolve_offline("smollm2-135m", "~/.cache/icl_scale"))
    model_type, fields = SHAPES[shape]
    fields = dict(fields, vocab_size=max(fields["vocab_size"], len(tok)))
    if model_type == "xglm":
        fields |= {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields), dtype=getattr(torch, dtype))
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def counts(cfg: C.RunConfig, tok, model_max: int, variants: list[str]) -> dict:
    """Scored queries, FT steps, learning-rate grid points (and their steps and dev queries) of a
    config's grid, from its plan; the eval FLOP inputs (prefix and query lengths per query)."""
    jobs = plan(cfg, tok, model_max)
    ft = [s for s in cfg.eval.methods if SETTINGS[s].finetunes]
    searched = searched_settings(cfg) if cfg.finetune.lr_search and ft else []
    out = {"queries": 0, "ft_steps": 0, "points": 0, "point_steps": 0, "dev_queries": 0, "prefixes": [], "lengths": []}
    extra = 1 if cfg.eval.record_position == "answer" else 0
    for job in jobs:
        for setting in cfg.eval.methods:
            prefix = len(job.prompts[setting].prefix_ids)
            out["prefixes"].append(prefix)
            out["lengths"] += [(prefix, len(job.enc.input_ids(r)) + extra) for r in job.eval_rows]
        out["queries"] += len(job.eval_rows) * len(cfg.eval.methods)
        out["ft_steps"] += len(job.ft_rows) * len(ft)
        n_points = len(cfg.finetune.lr_grid) * len(searched)
        out["points"] += n_points
        out["point_steps"] += n_points * len(job.ft_rows)
        out["dev_queries"] += n_points * len(job.dev_rows)
    n = len(variants)
    return {k: (v * n if isinstance(v, int) else v * n) for k, v in out.items()}


def eval_flops(model_cfg, n_body: int, prefixes: list[int], lengths: list[tuple[int, int]]) -> float:
    """Model FLOPs of building each prefix once and scoring each query after it (one logits row)."""
    d = getattr(model_cfg, "hidden_size", None) or model_cfg.d_model
    layers = getattr(model_cfg, "num_hidden_layers", None) or model_cfg.num_layers
    vocab = model_cfg.vocab_size

    def forward(past: int, new: int) -> float:
        return 2 * n_body * new + 4 * layers * d * new * (past + (new + 1) / 2)

    return (sum(forward(0, p) for p in prefixes)
            + sum(forward(p, t) + 2 * d * vocab for p, t in lengths))


def peak_flops(dtype: str, override: float | None) -> tuple[float, str]:
    if override:
        return override * 1e12, f"{override:g} TFLOP/s (given)"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tf in PEAK_TFLOPS_16BIT.items():
            if key in name:
                tf = tf if dtype != "float32" else tf / 2   # TF32 tensor cores
                return tf * 1e12, f"{tf:g} TFLOP/s ({name}, {'dense 16-bit' if dtype != 'float32' else 'TF32'})"
        return float("nan"), f"unknown for {name}: pass --peak-tflops"
    a = torch.randn(2048, 2048)
    a @ a
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    rate = 5 * 2 * 2048**3 / (time.perf_counter() - t)
    return rate, f"{rate / 1e9:.1f} GFLOP/s (a 2048² float32 matmul measured here, {torch.get_num_threads()} thread(s))"


def fmt_s(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                    choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--tasks", default="sst2,sst5,mr,subj,agnews,cb")
    ap.add_argument("--seeds", default="1", help="seeds run (the projection scales to the preset's)")
    ap.add_argument("--variants", default="base", help="variants run (the projection scales to the preset's)")
    ap.add_argument("--eval-max", type=int, default=16, help="eval examples per task in the measured fraction")
    ap.add_argument("--deepspeed", default="", help="a ds_configs/*.json for finetuning")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_paper_grid"))
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()

    work = Path(args.work)
    model_dir = build_model(args.shape, args.dtype, work / "models")
    run_dir = work / f"{args.shape}-{args.dtype}-{int(time.time())}"
    fraction = ["--preset", "paper", "--model.name", str(model_dir), "--model.dtype", args.dtype,
                "--data.tasks", args.tasks, "--data.seeds", args.seeds, "--suite.variants", args.variants,
                "--data.eval_max", str(args.eval_max), "--data.data_dir", args.data_dir, "--eval.batch_size", "0"]
    fraction += ["--finetune.deepspeed", args.deepspeed] if args.deepspeed else []
    cmd = [sys.executable, "-m", "icl_scale", "suite", *fraction, "--output.run_dir", str(run_dir),
           "--output.report_dir", str(work / "reports")]
    print("measuring:", " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"},
                       capture_output=True, text=True)
    wall = time.perf_counter() - started
    if r.returncode != 0:
        sys.exit(f"the suite failed:\n{r.stderr[-3000:]}")

    variants = args.variants.split(",")
    phases: dict[str, float] = {}
    for v in variants:
        for inv in sorted((run_dir / v / "invocations").glob("*.json")):
            for k, s in json.loads(inv.read_text())["phases_s"].items():
                phases[k] = phases.get(k, 0.0) + s

    from transformers import AutoConfig, AutoTokenizer

    from icl_scale.cli import parse_config   # the same config the suite ran, and the full grid's
    tok = AutoTokenizer.from_pretrained(model_dir)
    model_cfg = AutoConfig.from_pretrained(model_dir)
    model_max = getattr(model_cfg, "max_position_embeddings", 2048)
    measured_cfg = parse_config(fraction)
    full_cfg = parse_config(["--preset", "paper", "--model.name", str(model_dir), "--data.tasks", args.tasks,
                             "--data.data_dir", args.data_dir])
    measured = counts(measured_cfg, tok, model_max, variants)
    full = counts(full_cfg, tok, model_max, list(full_cfg.suite.variants))

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        meta = AutoModelForCausalLM.from_config(model_cfg)
    n_body = sum(p.numel() for n, p in meta.named_parameters() if "embed" not in n and "lm_head" not in n)
    flops = eval_flops(model_cfg, n_body, measured["prefixes"], measured["lengths"])
    peak, peak_note = peak_flops(args.dtype, args.peak_tflops)

    ev, ft, lr = phases.get("evaluate", 0.0), phases.get("finetune", 0.0), phases.get("lr search", 0.0)
    other = sum(phases.values()) - ev - ft - lr
    rate_q = measured["queries"] / ev if ev else float("nan")
    rate_s = measured["ft_steps"] / ft if ft else float("nan")
    rate_p = measured["points"] / lr if lr else float("nan")
    projected = {"evaluate": full["queries"] / rate_q, "finetune": full["ft_steps"] / rate_s,
                 "lr search": full["points"] / rate_p if measured["points"] else 0.0,
                 "load, plan, report": other / len(variants) * len(full_cfg.suite.variants)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, " \
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']})"
    print(f"\nshape {args.shape} ({n_body / 1e6:.0f}M parameters outside the embeddings), {args.dtype}, {device}")
    print(f"measured: tasks {args.tasks}, seeds {args.seeds}, variants {args.variants}, eval cap {args.eval_max}: "
          f"{measured['queries']} queries, {measured['ft_steps']} FT steps, {measured['points']} grid points "
          f"({measured['point_steps']} steps, {measured['dev_queries']} dev queries); wall {fmt_s(wall)}")
    print("phases: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in phases.items()))
    print(f"evaluation: {rate_q:.2f} queries/s; FT: {rate_s:.2f} steps/s; lr search: {rate_p:.3f} grid points/s")
    print(f"evaluation MFU: {flops / ev / peak:.1%} ({flops / ev / 1e12:.3f} TFLOP/s of model FLOPs; peak {peak_note})")
    print(f"full grid (tasks {args.tasks}; eval cap {full_cfg.data.eval_max}, seeds "
          f"{','.join(map(str, full_cfg.data.seeds))}, variants {','.join(full_cfg.suite.variants)}): "
          f"{full['queries']} queries, {full['ft_steps']} FT steps, {full['points']} grid points")
    print("projected: " + ", ".join(f"{k} {fmt_s(v)}" for k, v in projected.items())
          + f"; total {fmt_s(sum(projected.values()))}")
    assert set(full_cfg.suite.variants) <= set(VARIANTS)


if __name__ == "__main__":
    main()
