"""The report's figures (PNG): per task, the per-layer gradient-norm heatmaps of the FT settings
(layers × steps) and the per-layer SimAOU / SimAM curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from icl_scale import atomic
from icl_scale.settings import SETTINGS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grad_heatmap(results: dict, task: str, path: Path) -> str | None:
    """Per-layer L2 gradient norm at every FT step, one panel per FT setting (log colour scale);
    the first seed. Returns the caption, or None when the task has no FT logs."""
    from matplotlib.colors import LogNorm

    seed, r = next(iter(results["tasks"][task]["seeds"].items()))
    logs = {f: log for f, log in r["ft_logs"].items() if log["grad_norms"]}
    if not logs:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(logs), figsize=(4.6 * len(logs), 3.8), squeeze=False, layout="constrained")
    for ax, (f, log) in zip(axes[0], logs.items()):
        g = np.array(log["grad_norms"], dtype=float).T      # layers × steps
        g = np.where(np.isfinite(g) & (g > 0), g, np.nan)
        finite = g[np.isfinite(g)]
        norm = LogNorm(vmin=finite.min(), vmax=finite.max()) if len(finite) and finite.min() > 0 else None
        im = ax.imshow(g, aspect="auto", origin="lower", cmap="viridis", norm=norm, interpolation="nearest")
        ax.set_title(SETTINGS[f].label)
        ax.set_xlabel("FT step (demonstration)")
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax, label="gradient L2 norm")
    fig.suptitle(f"{task}, seed {seed}: per-layer gradient norm of the trained parameters")
    atomic.save_png(path, fig)
    plt.close(fig)
    return (f"{task}, seed {seed}: L2 norm of each layer's trained-parameter gradient (rows, layer 0 at the bottom) "
            f"at each FT step (columns), log colour scale; one panel per FT setting.")


def layer_curves(results: dict, task: str, path: Path) -> str | None:
    """SimAOU (left) and SimAM (right) per layer, mean over examples and seeds."""
    layers = results["tasks"][task]["layers"]
    if not layers:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for key, values in layers.items():
        ax = {"simaou": a, "simam": b}.get(key.metric)
        if ax is None or key.variant not in ("", "shuffled"):
            continue
        style = ":" if key.baseline or key.variant else "--" if (key.metric, key.of) == ("simam", "zsl") else "-"
        ax.plot(range(len(values)), values, style, marker=".", label=key.label)
    for ax, title in ((a, "SimAOU"), (b, "SimAM")):
        ax.set_title(f"{task}: {title} per layer")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    atomic.save_png(path, fig)
    plt.close(fig)
    return (f"{task}: per-layer SimAOU (left; dotted: random baselines) and SimAM (right; dashed: before FT), "
            f"mean over examples and seeds.")


def change_bars(results: dict, path: Path) -> str | None:
    """Per FT setting (panels) and task (groups): predictions changed by ICL only, both, FT only,
    each split into new prediction correct (solid) and wrong (hatched); summed over seeds."""
    from icl_scale.report.tables import change_totals

    totals = change_totals(results)
    if not totals:
        return None
    plt = _pyplot()
    tasks = list(results["tasks"])
    fts = list(dict.fromkeys(f for _, f in totals))
    fig, axes = plt.subplots(1, len(fts), figsize=(4.2 * len(fts), 3.6), squeeze=False, layout="constrained")
    groups = (("ICL only", "icl_only", "tab:blue"), ("both", "both", "tab:purple"), ("FT only", "ft_only", "tab:orange"))
    x = np.arange(len(tasks))
    for ax, f in zip(axes[0], fts):
        for k, (name, prefix, colour) in enumerate(groups):
            right = np.array([totals.get((t, f), {}).get(f"{prefix}_correct", 0) for t in tasks])
            wrong = np.array([totals.get((t, f), {}).get(f"{prefix}_incorrect", 0) for t in tasks])
            mixed = np.array([totals.get((t, f), {}).get("both_mixed", 0) if prefix == "both" else 0 for t in tasks])
            at = x + (k - 1) * 0.27
            ax.bar(at, right, 0.27, color=colour, label=f"{name} → correct")
            ax.bar(at, wrong, 0.27, bottom=right, color=colour, alpha=.45, hatch="//", label=f"{name} → wrong")
            if prefix == "both":
                ax.bar(at, mixed, 0.27, bottom=right + wrong, color="grey", alpha=.5, label="both, one correct")
        ax.set_xticks(x, tasks, fontsize=8)
        ax.set_title(f"ICL vs {SETTINGS[f].label}")
        ax.set_ylabel("changed predictions")
    axes[0][-1].legend(fontsize=6)
    atomic.save_png(path, fig)
    plt.close(fig)
    return ("Predictions changed from ZSL by ICL only, by both, or by FT only, per task (summed over seeds); solid: "
            "the new prediction is correct, hatched: wrong, grey: both changed, one correct.")


def figures(results: dict, out_dir: Path) -> list[tuple[str, str]]:
    """Write every figure into out_dir; (file name, caption) of each."""
    made = []
    caption = change_bars(results, out_dir / "changed_predictions.png")
    if caption:
        made.append(("changed_predictions.png", caption))
    for task in results["tasks"]:
        for name, draw in ((f"{task}_grad_norms.png", grad_heatmap), (f"{task}_layers.png", layer_curves)):
            caption = draw(results, task, out_dir / name)
            if caption:
                made.append((name, caption))
    return made

