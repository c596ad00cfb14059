"""The study over models × k in one launch (`icl-scale sweep`): every (model, k) of sweep.models ×
sweep.k is a run of its own under <run_dir>/<model>-k<k>, run one after the other in the same
process group (each model loaded when its runs start); then one sweep report (report/sweep.py).

    icl-scale sweep --config launcher/default.yaml --sweep.models smollm2-135m,gemma3-270m \\
        --sweep.k 4,8,16,32 --output.run_dir runs/sweep

    runs/<sweep>/sweep.json            the members: model, k, run dir (the report reads only this dir)
    runs/<sweep>/<model>-k<k>/         a run dir (see runtime/rundir.py)
    runs/<sweep>/failures/<member>.json  a member that failed: its error line (cleared when it succeeds)
    reports/<sweep>/<model>-k<k>/      each member's report; reports/<sweep>/report.md the sweep's

A member that fails (a model that cannot load, a run that raises) is recorded and the sweep goes
on. Rerunning the same command resumes every member where it stopped.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from icl_scale import atomic
from icl_scale import config as C
from icl_scale.errors import UserError, first_line
from icl_scale.runtime import dist
from icl_scale.runtime.engine import prepare_process


@dataclasses.dataclass(frozen=True)
class Member:
    model: str
    k: int
    deepspeed: str

    @property
    def name(self) -> str:
        base = Path(self.model.rstrip("/")).name if "/" in self.model else self.model
        return f"{re.sub(r'[^A-Za-z0-9._-]', '_', base)}-k{self.k}"


def members(cfg: C.RunConfig) -> list[Member]:
    entries = cfg.sweep.models or (cfg.model.name,)
    out = []
    for entry in entries:
        model, _, ds = entry.partition("=")
        for k in cfg.sweep.k or (cfg.data.k,):
            out.append(Member(model, k, ds or cfg.finetune.deepspeed))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise UserError(f"config field sweep.models: two models give the same run dir name ({', '.join(names)})")
    return out


def member_config(cfg: C.RunConfig, m: Member) -> C.RunConfig:
    values = C.to_dict(cfg)
    values["model"]["name"], values["data"]["k"], values["finetune"]["deepspeed"] = m.model, m.k, m.deepspeed
    values["output"]["run_dir"] = str(Path(cfg.output.run_dir) / m.name)
    values["output"]["report_dir"] = str(Path(cfg.output.report_dir) / Path(cfg.output.run_dir).name)
    values["sweep"] = {}
    return C.build(values, source=f"sweep member {m.name}")


def failure_path(run_dir: Path, m: Member) -> Path:
    return run_dir / "failures" / f"{m.name}.json"


def sweep(cfg: C.RunConfig) -> list[str]:
    """Run every member; returns the names of those that failed (recorded, and in the report)."""
    from icl_scale.report.sweep import write_sweep_report
    from icl_scale.run import run

    todo = members(cfg)
    configs = [member_config(cfg, m) for m in todo]   # every member's config checked before any work
    engines = {m.deepspeed for m in todo} - {""}
    proc = prepare_process(cfg, next(iter(engines), ""))
    run_dir = Path(cfg.output.run_dir)
    if proc.state.is_main_process:
        atomic.write_json(run_dir / "sweep.json", {"members": [dataclasses.asdict(m) | {"run_dir": m.name}
                                                               for m in todo]})
    dist.barrier(proc.state)
    failed = []
    for i, (m, member_cfg) in enumerate(zip(todo, configs)):
        if proc.state.is_main_process:
            from icl_scale.runtime.progress import console

            console().rule(f"sweep member {i + 1}/{len(todo)}: {m.model}, k {m.k}")
        try:
            run(member_cfg, proc)
            failure_path(run_dir, m).unlink(missing_ok=True)
        except (UserError, RuntimeError, OSError, MemoryError, ValueError) as e:
            # a model that cannot load or run is reported; the other members go on
            failed.append(m.name)
            if proc.state.is_main_process:
                atomic.write_json(failure_path(run_dir, m), {"member": m.name, "model": m.model, "k": m.k,
                                                            "error": f"{type(e).__name__}: {first_line(e)}"})
                from icl_scale.runtime.progress import console

                console().print(f"[red]sweep member {m.name} failed:[/red] {first_line(e)}")
        dist.barrier(proc.state)
    if proc.state.is_main_process:
        from icl_scale.runtime.progress import console

        write_sweep_report(run_dir, Path(cfg.output.report_dir), console=console())
    dist.shutdown(proc.state)
    return failed
