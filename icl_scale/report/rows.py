"""The one row builder: every renderer (markdown, rich) draws from these rows.
A pure function of the run dir."""

from __future__ import annotations

import json
from pathlib import Path

from icl_scale.report.merge import merge_job
from icl_scale.runtime.rundir import ft_log_path, job_dir, job_meta_path, load_run


def accuracy_rows(run_dir: Path) -> tuple[dict, list[dict]]:
    """(run info, one row per task × seed with accuracy per setting)."""
    run = load_run(run_dir)
    cfg, h = run["config"], run["config_hash"]
    rows = []
    for task in cfg["data"]["tasks"]:
        for seed in cfg["data"]["seeds"]:
            meta = json.loads(job_meta_path(run_dir, task, seed).read_text())
            row = {"task": task, "seed": seed, "n_eval": len(meta["eval_ids"]), "k_effective": meta["k_effective"],
                   "k_requested": meta["k_requested"], "source": meta["source"]}
            for setting in cfg["eval"]["methods"]:
                rec = merge_job(job_dir(run_dir, task, setting, seed), h, meta["eval_ids"], keys=("ids", "gold", "pred"))
                row[f"acc_{setting}"] = float((rec["pred"] == rec["gold"]).mean())
                log = ft_log_path(run_dir, task, setting, seed)
                if log.is_file():
                    ft = json.loads(log.read_text())
                    row["ft_steps"] = row.get("ft_steps", 0) + ft["steps"]
                    row["ft_skipped"] = row.get("ft_skipped", 0) + ft["skipped"]
            rows.append(row)
    info = {"run_dir": str(run_dir), "config_hash": h, "model": cfg["model"]["name"], "methods": cfg["eval"]["methods"],
            "record_position": cfg["eval"]["record_position"], "finetune": cfg["finetune"]}
    return info, rows
