"""The report of a run, a pure function of its run dir:

    <report_dir>/<run>/report.md        the papers' tables, per-task detail, figures, provenance
    <report_dir>/<run>/metrics.csv      every figure: task, seed (or "all"), metric, layer, value, spread
    <report_dir>/<run>/results.json     the whole analysis (per seed, per layer, FT logs, summaries)
    <report_dir>/<run>/*.png            gradient-norm heatmaps and per-layer curves, linked from report.md
    <report_dir>/<run>/examples.csv     the per-example view (report/examples.py), examples/<task>.md

The directory is built under a temporary name and swapped in whole: a failed report leaves the
previous one as it was. The console gets the same tables (rich).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from icl_scale import atomic
from icl_scale import config as C
from icl_scale.report import examples
from icl_scale.report.analysis import analyze
from icl_scale.report.plots import figures
from icl_scale.report.provenance import provenance
from icl_scale.report.tables import (Table, changes_table, excess_sentences, failure_table, finetune_table,
                                     interval_table, layer_table, lr_search_table, paper_tables)


def md_table(t: Table, level: str = "##") -> list[str]:
    out = [f"{level} {t.title}", ""]
    if t.caption:
        out += [t.caption, ""]
    out += ["| " + " | ".join(t.header) + " |", "|" + "|".join("---" for _ in t.header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in t.rows]
    return out + [""]


def markdown(results: dict, tables: list[Table], figs: list[tuple[str, str]], prov) -> str:
    lines, data, launches = prov
    cfg = results["config"]
    out = [f"# icl_scale run `{Path(results['run_dir']).name}`", "",
           f"Model `{cfg.model.name}` · tasks {', '.join(results['tasks'])} · settings "
           f"{', '.join(results['methods'])} · config hash `{results['config_hash']}`", ""]
    for t in tables:
        out += md_table(t)
    excess = excess_sentences(results)
    if excess:
        out += ["## Does ICL's update align with FT's beyond geometry?", "",
                "SimAOU minus SimAOU of shuffled pairs (the FT update of another example of the same task and "
                "seed), per task with a bootstrap 95% interval over examples:", "", *excess, ""]
    for t in (changes_table(results), lr_search_table(results), finetune_table(results)):
        if t:
            out += md_table(t)
    failed = failure_table(results)
    if failed:
        out += md_table(failed)
    if figs:
        out += ["## Figures", ""]
        for name, caption in figs:
            out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    out += ["## Per task", ""]
    for task in results["tasks"]:
        out += md_table(interval_table(results, task), "###")
        lt = layer_table(results, task)
        if lt:
            out += md_table(lt, "###")
    out += ["## Provenance", "", *lines, ""]
    out += md_table(data, "###") + md_table(launches, "###")
    out += ["Also here: `metrics.csv` (every figure, per seed and layer), `results.json` (the whole analysis) and "
            "the per-example view: `examples.csv` (every example's predictions, option probabilities, change "
            "from ZSL and SimAOU per setting) with a page per task in `examples/`.", ""]
    return "\n".join(out)


def metrics_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "seed", "metric", "layer", "value", "std", "ci_low", "ci_high"])
    num = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"   # noqa: E731
    for task, t in results["tasks"].items():
        for key, s in t["summary"].items():
            for seed, v in zip(s["seeds"], s["per_seed"]):
                w.writerow([task, seed, str(key), "mean", num(v), "", "", ""])
            w.writerow([task, "all", str(key), "mean", num(s["mean"]), num(s["std"]), num(s["ci"][0]), num(s["ci"][1])])
        for seed, r in t["seeds"].items():
            for key, values in r.get("layers", {}).items():
                for layer, v in enumerate(values):
                    w.writerow([task, seed, str(key), layer, num(v), "", "", ""])
    return buf.getvalue()


def rich_tables(tables: list[Table]):
    from rich.table import Table as RichTable

    for t in tables:
        rt = RichTable(title=t.title, caption=t.caption or None)
        for i, h in enumerate(t.header):
            rt.add_column(h, justify="left" if i == 0 else "right")
        for row in t.rows:
            rt.add_row(*row)
        yield rt


def _json_ready(x):
    """NaN (an undefined figure) as null: strict JSON; figure keys written out; the config as a tree."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, C.RunConfig):
        return C.to_dict(x)
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    return x


def write_report(run_dir: Path, report_dir: Path, console=None, compare: bool = False,
                 exclude_diverged: bool | None = None) -> dict:
    """Build the report of run_dir under report_dir/<run name>/ (swapped in whole: a failed report
    leaves the previous one as it was), print its summary; return the analysis results."""
    run_dir = Path(run_dir)
    per_example: dict = {}
    results = analyze(run_dir, exclude_diverged, per_example)
    tables = paper_tables(results, compare)
    final = Path(report_dir) / run_dir.name
    with atomic.directory(final) as tmp:
        examples.write(results, per_example, tmp, results["config"].report.example_rows)
        figs = figures(results, tmp)
        atomic.write_text(tmp / "report.md", markdown(results, tables, figs, provenance(run_dir, results)))
        atomic.write_text(tmp / "metrics.csv", metrics_csv(results))
        atomic.write_text(tmp / "results.json", json.dumps(_json_ready(results), indent=1, allow_nan=False))
    if console is not None:
        for rt in rich_tables(tables):
            console.print(rt)
        console.print(f"report: {final / 'report.md'}")
    return results
