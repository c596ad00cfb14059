"""The whole study in one launch: every variant of `suite.variants` (settings.VARIANTS) is a run of
its own (its own config, hash, shards and report) under <run_dir>/<variant>, one after the other
in the same process group; then one suite report gathers the variants' tables.

    accelerate launch ... -m icl_scale suite --preset paper --model.name gemma3-270m \\
        --output.run_dir runs/example --output.report_dir reports

    runs/<suite>/<variant>/            a run dir (see runtime/rundir.py)
    reports/<suite>/<variant>/         its report (report.md, metrics.csv, results.json, figures)
    reports/<suite>/report.md          every variant's tables, with links to the full reports

Rerunning the same command resumes every variant where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from icl_scale import atomic
from icl_scale import config as C
from icl_scale.report.render import md_table
from icl_scale.report.tables import failure_table, paper_tables, variant_table
from icl_scale.runtime import dist
from icl_scale.runtime.engine import prepare_process
from icl_scale.settings import VARIANTS


def variant_config(cfg: C.RunConfig, variant: str) -> C.RunConfig:
    run_dir = Path(cfg.output.run_dir)
    out = C.with_variant(cfg, variant)
    output = dataclasses.replace(out.output, run_dir=str(run_dir / variant),
                                 report_dir=str(Path(cfg.output.report_dir) / run_dir.name))
    return dataclasses.replace(out, output=output)


def suite_markdown(cfg: C.RunConfig, results_of: dict[str, dict]) -> str:
    """The suite report from the variants' analysis results (each a pure function of its run dir)."""
    name = Path(cfg.output.run_dir).name
    out = [f"# icl_scale suite `{name}`", "",
           f"Model `{cfg.model.name}` · tasks {', '.join(cfg.data.tasks)} · seeds "
           f"{C.describe_seeds(cfg)} · settings {', '.join(cfg.eval.methods)}", "",
           "Each variant is a run of its own; its full report (per-task intervals, per-layer tables, figures, "
           "CSV, JSON, provenance) is linked below.", ""]
    if len(results_of) > 1:
        out += md_table(variant_table(results_of, {v: VARIANTS[v].title for v in results_of}), "#")
    for variant, results in results_of.items():
        spec = VARIANTS[variant]
        out += [f"# {spec.title} (`{variant}`)", "", spec.note.format(cfg=cfg), "",
                f"Full report: [{variant}/report.md]({variant}/report.md)", ""]
        failed = failure_table(results)
        for t in paper_tables(results) + ([failed] if failed else []):
            out += md_table(t, "##")
    return "\n".join(out)


def suite(cfg: C.RunConfig) -> Path | None:
    from icl_scale.run import run

    proc = prepare_process(cfg)
    results_of = {}
    for i, variant in enumerate(cfg.suite.variants):
        if proc.state.is_main_process:
            from icl_scale.runtime.progress import console

            console().rule(f"suite variant {i + 1}/{len(cfg.suite.variants)}: {variant}")
        results_of[variant] = run(variant_config(cfg, variant), proc)
    out = None
    if proc.state.is_main_process:
        from icl_scale.runtime.progress import console

        out = Path(cfg.output.report_dir) / Path(cfg.output.run_dir).name / "report.md"
        atomic.write_text(out, suite_markdown(cfg, results_of))
        console().print(f"suite report: {out}")
    dist.shutdown(proc.state)
    return out
