"""The sweep report: every headline figure against model size and against k, a pure function of
the sweep dir (sweep.json, each member's run dir, failure records).

    reports/<sweep>/report.md     one table per figure (models × k, each cell mean [95% interval])
    reports/<sweep>/metrics.csv   member, model, parameters, k, figure, mean, interval
    reports/<sweep>/<fig>_vs_params.png, <fig>_vs_k.png

A member's figure is the mean over tasks of its per-task means (tasks and seeds as its run has
them); its interval combines the per-task bootstrap intervals (normal approximation, tasks
independent: se = √Σ se_t² / n_tasks, se_t = interval width / 3.92).
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path

from icl_scale import atomic, records
from icl_scale.errors import UserError, first_line
from icl_scale.report.analysis import analyze
from icl_scale.report.keys import Key
from icl_scale.report.plots import _pyplot
from icl_scale.report.render import md_table, rich_tables
from icl_scale.report.tables import VARIANT_KEYS, Table, fmt
from icl_scale.runtime.rundir import read_invocations

Z95 = 1.959964


def member_figure(results: dict, key: Key) -> tuple[float, float, float]:
    """(mean over tasks, interval low, high) of a figure; NaN where no task has it."""
    parts = [r["summary"][key] for r in results["tasks"].values()
             if key in r["summary"] and r["summary"][key]["mean"] is not None
             and not math.isnan(r["summary"][key]["mean"])]
    if not parts:
        return math.nan, math.nan, math.nan
    mean = sum(p["mean"] for p in parts) / len(parts)
    se = [(p["ci"][1] - p["ci"][0]) / (2 * Z95) for p in parts if p.get("ci") and None not in p["ci"]]
    if len(se) != len(parts) or any(math.isnan(s) for s in se):
        return mean, math.nan, math.nan
    half = Z95 * math.sqrt(sum(s * s for s in se)) / len(parts)
    return mean, mean - half, mean + half


def read_sweep(run_dir: Path) -> list[dict]:
    """Each member: model, k, run dir, parameters, results (or the reason it has none)."""
    path = run_dir / "sweep.json"
    if not path.is_file():
        raise UserError(f"sweep {run_dir}: no sweep.json (not a sweep run dir)")
    members = records.read(path, "sweep record")["members"]
    out = []
    for m in members:
        row = dict(m, params=None, results=None, problem=None)
        failure = run_dir / "failures" / f"{m['run_dir']}.json"
        if failure.is_file():
            row["problem"] = "failed: " + records.read(failure, "sweep failure")["error"]
        else:
            try:
                row["results"] = analyze(run_dir / m["run_dir"])
                row["params"] = next((i["n_params"] for i in reversed(read_invocations(run_dir / m["run_dir"]))
                                      if i.get("n_params")), None)
            except (UserError, FileNotFoundError) as e:
                row["problem"] = f"incomplete: {first_line(e)}"
        out.append(row)
    return out


def _params(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def sweep_keys(rows: list[dict]) -> list[Key]:
    return [k for k in VARIANT_KEYS if any(r["results"] and any(k in t["summary"] for t in r["results"]["tasks"].values())
                                           for r in rows)]


def figure_table(rows: list[dict], key: Key) -> Table:
    models = list(dict.fromkeys(r["model"] for r in rows))
    ks = sorted({r["k"] for r in rows})
    by = {(r["model"], r["k"]): r for r in rows}
    body = []
    for model in models:
        params = next((r["params"] for r in rows if r["model"] == model and r["params"]), None)
        cells = []
        for k in ks:
            r = by.get((model, k))
            if r is None or r["results"] is None:
                cells.append("–" if r is None else r["problem"].split(":")[0])
                continue
            mean, lo, hi = member_figure(r["results"], key)
            cells.append(fmt(mean) + ("" if math.isnan(lo) else f" [{fmt(lo, 3)}, {fmt(hi, 3)}]"))
        body.append([f"`{model}` ({_params(params)})"] + cells)
    return Table(key.label, ["model (parameters)"] + [f"k = {k}" for k in ks], body,
                 "Mean over tasks of each task's mean over seeds, with its 95% interval.")


def plot(rows: list[dict], key: Key, out: Path) -> list[str]:
    """<key>_vs_params.png (one line per k, log axis) and <key>_vs_k.png (one line per model)."""
    plt = _pyplot()
    done = [r for r in rows if r["results"] is not None]
    vals = {(r["model"], r["k"]): (member_figure(r["results"], key), r["params"]) for r in done}
    if not any(not math.isnan(v[0][0]) for v in vals.values()):
        return []
    stem = str(key).replace("/", "_")
    names = []
    for axis in ("params", "k"):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        groups = sorted({r["k"] for r in done}) if axis == "params" else list(dict.fromkeys(r["model"] for r in done))
        for g in groups:
            pts = sorted(((p if axis == "params" else k), v) for (model, k), (v, p) in vals.items()
                         if (k == g if axis == "params" else model == g) and (p if axis == "params" else k)
                         and not math.isnan(v[0]))
            if not pts:
                continue
            x = [p[0] for p in pts]
            y = [p[1][0] for p in pts]
            err = [[max(0.0, p[1][0] - p[1][1]) if not math.isnan(p[1][1]) else 0.0 for p in pts],
                   [max(0.0, p[1][2] - p[1][0]) if not math.isnan(p[1][2]) else 0.0 for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"k = {g}" if axis == "params" else str(g))
        ax.set_xscale("log", base=10 if axis == "params" else 2)
        if axis == "k":   # the k values themselves, not powers of two
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xticks(sorted({r["k"] for r in done}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("parameters" if axis == "params" else "k (demonstrations drawn)")
        ax.set_ylabel(key.label)
        ax.legend(fontsize=7)
        ax.set_title(f"{key.label} vs {'model size' if axis == 'params' else 'k'} (95% intervals)", fontsize=9)
        fig.tight_layout()
        name = f"{stem}_vs_{axis}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def metrics_csv(rows: list[dict], keys: list[Key]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["member", "model", "parameters", "k", "figure", "mean", "ci_low", "ci_high"])
    for r in rows:
        if r["results"] is None:
            continue
        for key in keys:
            mean, lo, hi = member_figure(r["results"], key)
            if not math.isnan(mean):
                w.writerow([r["run_dir"], r["model"], r["params"] or "", r["k"], str(key), f"{mean:.6g}",
                            "" if math.isnan(lo) else f"{lo:.6g}", "" if math.isnan(hi) else f"{hi:.6g}"])
    return buf.getvalue()


def write_sweep_report(run_dir: Path, report_dir: Path, console=None) -> Path:
    """reports/<sweep>/report.md, metrics.csv and the figures (swapped in whole, beside the
    members' own report dirs)."""
    run_dir = Path(run_dir)
    rows = read_sweep(run_dir)
    keys = sweep_keys(rows)
    final = Path(report_dir) / run_dir.name
    tables = [figure_table(rows, k) for k in keys]
    models = ", ".join(dict.fromkeys("`" + r["model"] + "`" for r in rows))
    out = [f"# icl_scale sweep `{run_dir.name}`", "",
           f"{len(rows)} members: models {models} × k "
           f"{', '.join(str(k) for k in sorted({r['k'] for r in rows}))}. Each member is a run of its own; its full "
           "report (per-task figures, intervals, baselines, provenance) is linked below.", ""]
    problems = [r for r in rows if r["problem"]]
    if problems:
        out += ["## Members without results", ""] + [f"- `{r['run_dir']}`: {r['problem']}" for r in problems] + [""]
    final.mkdir(parents=True, exist_ok=True)   # the members' report dirs live in it too: written file by file
    with tempfile.TemporaryDirectory(dir=final, prefix=".figs") as tmp:
        figs = {str(k): plot(rows, k, Path(tmp)) for k in keys}
        for name in [n for names in figs.values() for n in names]:
            (Path(tmp) / name).replace(final / name)
    for t, key in zip(tables, keys):
        out += md_table(t)
        out += [f"![{name}]({name})" for name in figs[str(key)]] + [""]
    out += ["## Members", ""] + [f"- `{r['run_dir']}`: `{r['model']}`, k {r['k']}, {_params(r['params'])} parameters"
                                 + (f" — [report]({r['run_dir']}/report.md)" if r["results"] else f" — {r['problem']}")
                                 for r in rows] + [""]
    atomic.write_text(final / "metrics.csv", metrics_csv(rows, keys))
    atomic.write_text(final / "report.md", "\n".join(out))
    if console is not None:
        for rt in rich_tables([t for t, k in zip(tables, keys) if k.metric == "acc" or k.variant == "excess"]):
            console.print(rt)
        console.print(f"sweep report: {final / 'report.md'}")
    return final / "report.md"
