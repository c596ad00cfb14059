"""Render report rows: markdown (reports/<run>.md) and a rich table, from the same rows."""

from __future__ import annotations

from pathlib import Path

from icl_scale.capture.shards import atomic_write_text

LABELS = {"zsl": "ZSL", "icl": "ICL", "ft": "FT", "ft_lc": "layer-causal FT", "ft_lin": "linearized FT"}


def columns(info: dict) -> list[tuple[str, str]]:
    cols = [("task", "task"), ("seed", "seed")]
    cols += [(f"acc_{m}", f"{LABELS.get(m, m)} acc") for m in info["methods"]]
    cols += [("k_effective", "K (effective)"), ("n_eval", "eval size"), ("source", "data source")]
    return cols


def cell(row: dict, key: str) -> str:
    v = row[key]
    if key == "k_effective":
        return f"{v}/{row['k_requested']}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def finetune_lines(info: dict, rows: list[dict]) -> list[str]:
    """How the FT settings were trained (optimizer, trained set, clipping) and their skipped steps."""
    if not any(m.startswith("ft") for m in info["methods"]):
        return []
    ft = info["finetune"]
    clip = "no clipping" if ft["clip"] == "none" else f"clipping {ft['clip']} at {ft['clip_value']}"
    steps = sum(r.get("ft_steps", 0) for r in rows)
    skipped = sum(r.get("ft_skipped", 0) for r in rows)
    return [f"Finetuning: {ft['optimizer'].upper()} on {ft['train']} parameters, demonstrations: {ft['demos']}, "
            f"{clip}; {steps} steps, {skipped} skipped (non-finite loss or gradient).", ""]


def markdown(info: dict, rows: list[dict]) -> str:
    cols = columns(info)
    lines = [f"# icl_scale run `{Path(info['run_dir']).name}`", "",
             f"Model: `{info['model']}` · config hash `{info['config_hash']}` · "
             f"recording position: {info['record_position']}", "", *finetune_lines(info, rows),
             "## Accuracy", "",
             "| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def rich_table(info: dict, rows: list[dict]):
    from rich.table import Table

    t = Table(title=f"icl_scale · {info['model']} · {Path(info['run_dir']).name}")
    for key, head in columns(info):
        t.add_column(head, justify="right" if key.startswith(("acc", "k_", "n_", "seed")) else "left")
    for r in rows:
        t.add_row(*(cell(r, k) for k, _ in columns(info)))
    return t


def write_report(run_dir: Path, report_dir: Path, console=None) -> Path:
    from icl_scale.report.rows import accuracy_rows

    info, rows = accuracy_rows(run_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    out = report_dir / f"{Path(run_dir).name}.md"
    atomic_write_text(out, markdown(info, rows))
    if console is not None:
        console.print(rich_table(info, rows))
        console.print(f"report: {out}")
    return out
