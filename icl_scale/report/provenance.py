"""Where a run's numbers come from: model, data, sizes, seeds, world size, ZeRO stage, package
versions, wall time per phase, skipped FT steps. Read from the run dir only."""

from __future__ import annotations

from pathlib import Path

from icl_scale import config as C
from icl_scale.report.tables import Table
from icl_scale.runtime.rundir import read_invocations


def undefined_summary(results: dict, most: int = 8, field: str = "undefined") -> str:
    """Which similarity figures have (example, layer) values (or heads) left out, how many of how many."""
    items = [f"{task} seed {seed} `{name}` {k} of {n}" for task, t in results["tasks"].items()
             for seed, r in t["seeds"].items()
             for name, (k, n) in sorted(r.get(field, {}).items(), key=lambda kv: str(kv[0]))]
    if not items:
        return "none"
    return "; ".join(items[:most]) + (f"; and {len(items) - most} more (results.json)" if len(items) > most else "")


def provenance(run_dir: Path, results: dict) -> tuple[list[str], Table, Table]:
    """(bullet lines, per-task data table, per-launch table)."""
    cfg = results["config"]
    invocations = read_invocations(Path(run_dir))
    sizes = sorted({i["world_size"] for i in invocations})
    world = ", ".join(map(str, sizes)) if sizes else "unknown"
    ds = next((i["deepspeed"] for i in reversed(invocations) if i.get("deepspeed")), None)
    zero = "none (plain PyTorch on every rank)" if ds is None else \
        f"ZeRO-{ds['config'].get('zero_optimization', {}).get('stage', 0)} ({ds['file']})"
    skipped = sum(log["skipped"] for t in results["tasks"].values() for r in t["seeds"].values()
                  for log in r["ft_logs"].values())
    steps = sum(log["steps"] for t in results["tasks"].values() for r in t["seeds"].values()
                for log in r["ft_logs"].values())
    m, d, f = cfg.model, cfg.data, cfg.finetune
    precision = next((i["precision"] for i in reversed(invocations) if i.get("precision")), {})
    packages = invocations[-1]["packages"] if invocations else {}
    lines = [
        f"- Model: `{m.name}` ({m.dtype}, {m.attn} attention{', untrained control' if m.untrained else ''})",
        "- Precision: " + (f"model in {precision['model']}"
                           + (f"; trained k/v parameters and their updates in {precision['trained']}, applied in "
                              f"{precision['trained_forward']}" if "trained" in precision else "")
                           + f"; option scores in {precision['option_scores']}; records stored in {cfg.output.record_dtype}"
                           if precision else f"model in {m.dtype}; records stored in {cfg.output.record_dtype}"),
        f"- Seeds: {C.describe_seeds(cfg)}; k requested: {d.k}; eval cap: {d.eval_max or 'none'}",
        f"- Label switching: " + (f"{d.label_noise:.0%} of demonstrations ({d.label_noise_mode})"
                                  if d.label_noise else "none"),
        f"- World size: {world}; DeepSpeed: {zero}",
        f"- Finetuning: {f.optimizer}, trained: {f.train}, demonstrations: {f.demos}, clipping: "
        + ("none" if f.clip == "none" else f"{f.clip} at {f.clip_value}")
        + f"; {steps} steps, {skipped} skipped; layer-causal clipping (ft_lc_clip): {f.lc_clip} at {f.lc_clip_value}",
        "- Learning rates: " + (f"selected per {f.lr_select} on {f.lr_dev_size} dev examples held out of train, grid "
                                f"× {', '.join(f'{x:g}' for x in f.lr_grid)} of the task's rate"
                                if f.lr_search else "the task's rate (finetune.lrs, else the reference's)"),
        f"- Recording position: {cfg.eval.record_position}; "
        f"config hash `{results['config_hash']}`",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()),
        "- Similarity values left out as undefined (a zero update, or activations beyond float32): "
        + undefined_summary(results),
        "- Attention heads left out of a SimAM head mean (scores, or their difference, exactly zero): "
        + undefined_summary(results, field="heads_left_out"),
        "- Settings with non-finite option scores (a diverged model: none of its figures is given), examples "
        "affected: " + undefined_summary(results, field="nonfinite"),
        "- Examples whose options all scored exactly the same (the first option is taken; a setting tied on every "
        "example, a collapsed model, gets no figure): " + undefined_summary(results, field="tied"),
    ]
    rows = []
    for task, t in results["tasks"].items():
        for seed, r in t["seeds"].items():
            meta = r["meta"]
            rows.append([task, seed, meta["source"], f"{len(meta['eval_ids'])} of {meta['eval_size_full']}",
                         "held out of train" if meta["eval_from_train"] else "official",
                         f"{meta['k_effective']}/{meta['k_requested']}", str(meta["prefix_tokens"]),
                         str(len(meta.get("corrupted_demo_ids", [])))])
    data = Table("Data", ["task", "seed", "source", "eval examples", "eval split", "K effective", "prefix tokens",
                          "corrupted demos"], rows)
    phases = sorted({p for i in invocations for p in i["phases_s"]})
    launches = Table("Launches", ["started (UTC)", "finished", "world size", "device"] + [f"{p} (s)" for p in phases]
                     + ["wall (s)", "peak GPU MiB (main rank)"],
                     [[i["started"], "yes" if i["finished"] else "no (resumed later)", str(i["world_size"]), i["device"]]
                      + [f"{i['phases_s'].get(p, 0):.1f}" for p in phases] + [f"{i['wall_s']:.1f}"]
                      + [f"{i['peak_gpu_mib']:.0f}" if i.get("peak_gpu_mib") is not None else "–"]
                      for i in invocations])
    return lines, data, launches
