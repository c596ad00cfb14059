"""The whole study in one launch: every variant of `suite.variants` is a run of its own (its own
config, hash, shards and report) under <run_dir>/<variant>, one after the other in the same
process group; then one suite report gathers the variants' tables.

    accelerate launch ... -m icl_scale suite --preset paper --model.name gemma3-270m \\
        --output.run_dir runs/example --output.report_dir reports

    runs/<suite>/<variant>/            a run dir (see runtime/rundir.py)
    reports/<suite>/<variant>/         its report (report.md, metrics.csv, results.json, figures)
    reports/<suite>/report.md          every variant's tables, with links to the full reports

Rerunning the same command resumes every variant where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from icl_scale import config as C
from icl_scale.capture.shards import atomic_write_text
from icl_scale.report.render import md_table
from icl_scale.report.tables import failure_table, paper_tables, variant_table
from icl_scale.runtime import dist

VARIANT_TITLES = {"base": "Base", "label_switch": "Label switching", "untrained": "Untrained-model control"}


def variant_config(cfg: C.RunConfig, variant: str) -> C.RunConfig:
    run_dir = Path(cfg.output.run_dir)
    data, model = cfg.data, cfg.model
    if variant == "label_switch":
        data = dataclasses.replace(data, label_noise=cfg.suite.label_switch)
    elif variant == "untrained":
        model = dataclasses.replace(model, untrained=True)
    output = dataclasses.replace(cfg.output, run_dir=str(run_dir / variant),
                                 report_dir=str(Path(cfg.output.report_dir) / run_dir.name))
    return dataclasses.replace(cfg, data=data, model=model, output=output)


def variant_note(cfg: C.RunConfig, variant: str) -> str:
    if variant == "label_switch":
        return (f"{cfg.suite.label_switch:.0%} of the demonstrations' labels corrupted "
                f"({cfg.data.label_noise_mode}); the same corrupted set for ICL and FT.")
    if variant == "untrained":
        return "Attention and MLP weights re-initialised (seed 0); embeddings and norms kept."
    return "The model and demonstrations as they are."


def suite_markdown(cfg: C.RunConfig, report_root: Path) -> str:
    """The suite report from the variants' results.json (each a pure function of its run dir)."""
    name = Path(cfg.output.run_dir).name
    out = [f"# icl_scale suite `{name}`", "",
           f"Model `{cfg.model.name}` · tasks {', '.join(cfg.data.tasks)} · seeds "
           f"{', '.join(map(str, cfg.data.seeds))} · settings {', '.join(cfg.eval.methods)}", "",
           "Each variant is a run of its own; its full report (per-task intervals, per-layer tables, figures, "
           "CSV, JSON, provenance) is linked below.", ""]
    results_of = {v: json.loads((report_root / v / "results.json").read_text()) for v in cfg.suite.variants}
    if len(results_of) > 1:
        out += md_table(variant_table(results_of, VARIANT_TITLES), "#")
    for variant, results in results_of.items():
        out += [f"# {VARIANT_TITLES[variant]} (`{variant}`)", "", variant_note(cfg, variant), "",
                f"Full report: [{variant}/report.md]({variant}/report.md)", ""]
        tables = paper_tables(results)
        failed = failure_table(results)
        for t in tables + ([failed] if failed else []):
            out += md_table(t, "##")
    return "\n".join(out)


def suite(cfg: C.RunConfig) -> Path | None:
    from icl_scale.run import run

    if cfg.finetune.deepspeed:   # the process state must be DeepSpeed's from the start
        import os

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = dist.init_state()
    for i, variant in enumerate(cfg.suite.variants):
        if state.is_main_process:
            from icl_scale.runtime.progress import console

            console().rule(f"suite variant {i + 1}/{len(cfg.suite.variants)}: {variant}")
        run(variant_config(cfg, variant), state=state)
    out = None
    if state.is_main_process:
        from icl_scale.runtime.progress import console

        root = Path(cfg.output.report_dir) / Path(cfg.output.run_dir).name
        out = root / "report.md"
        atomic_write_text(out, suite_markdown(cfg, root))
        console().print(f"suite report: {out}")
    dist.shutdown(state)
    return out

