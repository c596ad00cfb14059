"""Experiment trackers (output.trackers) through accelerate's tracking API.

    tensorboard   event files under <run_dir>/trackers/rank<r>/ (every rank that finetunes writes
                  its own: with plain PyTorch FT jobs go whole to different ranks)
    wandb         one W&B run, from the main process (FT jobs it ran, the config, the figures)

What is logged: the config (as hyperparameters, main process); per FT job, the loss and the
per-layer gradient norms of every step (`ft/<task>/<setting>/seed<s>/...`, x axis the step),
logged from the job's FT log once it is written — the FT loop keeps them on the device and never
stops for the host; per job, every setting's accuracy and every similarity figure
(`eval/<task>/seed<s>/...`, main process, once the report is built). Off by default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from icl_scale.errors import UserError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names) -> None:
    """Before any work: a tracker whose package is missing is one line."""
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"config field output.trackers: {name} needs the {PACKAGES[name]} package "
                            f"(pip install {PACKAGES[name]})")


def _flat(config: dict) -> dict:
    """hparams take scalars: section.field, lists as text."""
    return {f"{s}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
            for s, fields in config.items() for k, v in fields.items()}


class Trackers:
    def __init__(self, names, run_dir: Path, rank: int, main: bool, run_name: str, config: dict):
        from accelerate.tracking import TensorBoardTracker

        self.trackers = []
        for name in names:
            if name == "tensorboard":
                t = TensorBoardTracker(f"rank{rank}", Path(run_dir) / "trackers")
            elif main:
                from accelerate.tracking import WandBTracker

                t = WandBTracker(run_name)
            else:
                continue
            t.main_process_only = False   # each rank writes its own, as the module docstring says
            t.start()
            if main:
                t.store_init_configuration(_flat(config))
            self.trackers.append(t)

    def log(self, values: dict, step: int) -> None:
        for t in self.trackers:
            t.log(values, step=step)

    def ft_job(self, task: str, setting: str, key: str, ft_log) -> None:
        """The loss and per-layer gradient norms of every step of one FT job (NaN: a skipped step)."""
        tag = f"ft/{task}/{setting}/seed{key}"
        for step, (loss, norms) in enumerate(zip(ft_log.losses, ft_log.grad_norms)):
            values = {f"{tag}/loss": loss}
            values |= {f"{tag}/grad_norm/layer{i}": n for i, n in enumerate(norms)}
            self.log(values, step)

    def results(self, results: dict) -> None:
        """Every job's accuracy per setting and similarity figures (the report's results)."""
        for task, r in results["tasks"].items():
            for seed, res in r["seeds"].items():
                values = {f"eval/{task}/seed{seed}/acc/{s}": a for s, a in res.get("acc", {}).items()}
                values |= {f"eval/{task}/seed{seed}/{k}": v for k, v in res.get("similarity", {}).items()
                           if v == v}   # NaN (undefined) left out
                self.log(values, 0)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []
