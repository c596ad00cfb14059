"""output.trackers: TensorBoard event files, written through accelerate's tracking API, read back
and checked against the run's own FT logs and report results."""

import json

import numpy as np
import pytest
from conftest import launch, run_cli


def args(root, data_dir, *extra):
    return ["run", "--model.name", "tiny-llama", "--data.tasks", "sst2,cb", "--data.k", "4", "--data.eval_max", "6",
            "--eval.methods", "zsl,icl,ft,ft_lc", "--model.max_length", "1500", "--output.trackers", "tensorboard",
            "--data.data_dir", str(data_dir), "--output.run_dir", str(root / "run"),
            "--output.report_dir", str(root / "reports"), *extra]


def scalars(run_dir) -> dict:
    """{tag: {step: value}} over every rank's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(run_dir.glob("trackers/rank*/**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                out.setdefault(tag, {})[e.step] = e.value
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_tensorboard_holds_every_ft_step_and_every_job_figure(tmp_path, data_dir, nproc):
    r = run_cli(args(tmp_path, data_dir)) if nproc == 1 else launch(args(tmp_path, data_dir), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    got = scalars(run)
    logs = sorted(run.glob("ft/*/*/seed*.json"))
    assert len(logs) == 4   # sst2, cb × ft, ft_lc
    for p in logs:
        log = json.loads(p.read_text())
        task, setting, seed = p.parts[-3], p.parts[-2], p.stem
        tag = f"ft/{task}/{setting}/{seed}"
        assert log["steps"] >= 1 and sorted(got[f"{tag}/loss"]) == list(range(log["steps"]))
        np.testing.assert_allclose([got[f"{tag}/loss"][s] for s in range(log["steps"])], log["losses"], rtol=1e-6)
        for layer in range(len(log["grad_norms"][0])):
            np.testing.assert_allclose([got[f"{tag}/grad_norm/layer{layer}"][s] for s in range(log["steps"])],
                                       [row[layer] for row in log["grad_norms"]], rtol=1e-6)
    results = json.loads((tmp_path / "reports/run/results.json").read_text())
    for task in ("sst2", "cb"):
        res = results["tasks"][task]["seeds"]["1"]
        for setting, a in res["acc"].items():
            assert got[f"eval/{task}/seed1/acc/{setting}"][0] == pytest.approx(a, rel=1e-6)
        sims = {k: v for k, v in res["similarity"].items() if v is not None and v == v}
        assert sims
        for name, v in sims.items():
            assert got[f"eval/{task}/seed1/{name}"][0] == pytest.approx(v, rel=1e-5, abs=1e-7)


def test_a_tracker_whose_package_is_missing_is_one_line(tmp_path, data_dir):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    r = run_cli(args(tmp_path, data_dir, "--output.trackers", "wandb"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "output.trackers: wandb needs the wandb package" in lines[0]
    assert not (tmp_path / "run").exists()
