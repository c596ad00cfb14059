"""Every kind of file a run reads back, damaged every way we know: the report stops with one line
naming the file (and writes nothing), and a rerun of the run repairs the damage to results
identical to the undamaged run's, or names the file it cannot repair before doing any work."""

import json
import shutil

import numpy as np
import pytest
from conftest import run_cli
from helpers import assert_same_records, run_records

from icl_scale.cli import main

# one file of each kind in the baseline run (each in its own job where two could interact)
FILES = {
    "run config": "config.json",
    "job meta": "jobs/sst2/seed1.json",
    "manifest": "shards/sst2/icl/seed1/manifest-r0.json",
    "shard": "shards/sst2/zsl/seed1/r0-00001.safetensors",
    "FT log": "ft/sst2/ft/seed1.json",
    "calibration record": "calibration/sst2/icl/seed1.json",
    "learner record": "learners/sst2/seed1-r0.json",
    "lr selection": "lr_search/sst2.json",
    "failure record": "failures/sst2/ft/seed2-r0.json",   # a job not in the plan: no setting left out
    "launch record": "invocations/*.json",
    # read back by the run only
    "lr point": "lr_search/sst2/ft/m0_seed1.json",
    "progress file": "progress/r0.json",
    "trained weights": "ft/sst2/ft/seed1.safetensors",
}
RUN_ONLY = {"lr point", "progress file", "trained weights"}
JSON_DAMAGES = ("flip", "truncate", "empty", "garbage", "wrong_type")


def applies(kind: str, how: str) -> bool:
    if kind == "trained weights":   # existence is what the run checks (its bytes are an output)
        return how == "delete"
    if kind == "shard":
        return how in ("flip", "truncate", "empty", "garbage", "delete", "foreign", "duplicate")
    if how == "duplicate":
        return kind == "manifest"
    if how == "delete":   # a launch or failure record that is not there is no damage
        return kind not in ("launch record", "failure record")
    if how == "foreign":   # records of another config (failure records of one are filtered out)
        return kind not in ("launch record", "failure record", "progress file")
    return True


def args(root, data_dir):
    return ["run", "--model.name", "tiny-llama", "--data.tasks", "sst2", "--data.k", "4", "--data.eval_max", "8",
            "--eval.methods", "zsl,icl,ft", "--eval.calibration", "contextual", "--eval.learners", "true",
            "--finetune.lr_search", "true", "--finetune.lr_grid", "0.1,1", "--finetune.lr_dev_size", "8",
            "--output.save_ft_weights", "true", "--output.shard_mb", "0.005", "--data.data_dir", str(data_dir),
            "--output.run_dir", str(root / "run"), "--output.report_dir", str(root / "reports")]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("baseline")
    r = run_cli(args(root, data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def copy_run(baseline, dest, failure: bool = True):
    """A copy of the baseline run, with a failure record to damage."""
    shutil.copytree(baseline / "run", dest / "run")
    run = dest / "run"
    if failure:
        h = json.loads((run / "config.json").read_text())["config_hash"]
        record = {"task": "sst2", "setting": "ft", "seed": 2, "rank": 0, "error": "RuntimeError: x", "traceback": [],
                  "config_hash": h}
        (run / FILES["failure record"]).parent.mkdir(parents=True)
        (run / FILES["failure record"]).write_text(json.dumps(record))
    return run


def target(run, kind):
    found = sorted(run.glob(FILES[kind]))
    assert len(found) == 1, (kind, found)
    return found[0]


def damage(run, kind: str, how: str):
    p = target(run, kind)
    data = p.read_bytes()
    if how == "flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif how == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "garbage":
        p.write_bytes(b"\x00{garbage" if p.suffix == ".json" else b"garbage" * 40)
    elif how == "delete":
        p.unlink()
    elif how == "wrong_type":   # valid JSON, a field of the wrong type
        obj = json.loads(data)
        field = next(iter(obj))
        obj[field] = "x" if isinstance(obj[field], (list, dict, int, float)) and not isinstance(obj[field], str) else [1]
        p.write_text(json.dumps(obj))
    elif how == "foreign":
        if kind == "shard":   # another run's shard dropped in, listed nowhere
            return shutil.copy(p, p.with_name("r0-00099.safetensors"))
        else:
            obj = json.loads(data)
            obj["config_hash"] = "f" * 16
            p.write_text(json.dumps(obj))
    elif how == "duplicate":   # the same records twice
        if kind == "shard":
            shutil.copy(p, p.with_name("r0-00099.safetensors"))
            m = json.loads((p.parent / "manifest-r0.json").read_text())
            entry = next(s for s in m["shards"] if s["file"] == p.name)
            m["shards"].append(entry | {"file": "r0-00099.safetensors"})
            (p.parent / "manifest-r0.json").write_text(json.dumps(m))
            return p.with_name("r0-00099.safetensors")
        else:
            m = json.loads(data)
            m["shards"].append(m["shards"][0])
            p.write_text(json.dumps(m))
    return p


REPORT_CASES = [(k, h) for k in FILES if k not in RUN_ONLY
                for h in ("flip", "truncate", "empty", "garbage", "wrong_type", "delete", "foreign", "duplicate")
                if applies(k, h)]


@pytest.mark.parametrize("kind,how", REPORT_CASES, ids=[f"{k.replace(' ', '_')}-{h}" for k, h in REPORT_CASES])
def test_report_names_the_damaged_file(baseline, tmp_path, capsys, kind, how):
    run = copy_run(baseline, tmp_path)
    p = damage(run, kind, how)
    rc = main(["report", str(run), "--report-dir", str(tmp_path / "reports")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, (rc, err)
    line = err[0]
    assert line.startswith("icl-scale: error: ")
    # the file itself, or (a manifest gone or listing a record twice) the shard it leaves unaccounted
    named = p.name if not (kind == "run config" and how == "delete") else "no config.json"
    if (kind, how) in {("manifest", "delete"), ("manifest", "duplicate")}:
        named = str(p.parent)
    if (kind, how) == ("learner record", "delete"):   # the rank files together
        named = "learners/sst2/seed1-r*.json"
    assert named in line, line
    assert not [p for p in (tmp_path / "reports").rglob("*") if p.is_file()], "a half-written report"


def side_records(run):
    h = json.loads((run / "config.json").read_text())["config_hash"]
    out = {}
    for p in sorted(run.glob("ft/*/*/seed*.json")):
        log = json.loads(p.read_text())
        out[str(p.relative_to(run))] = (log["losses"], log["grad_norms"], log["config_hash"] == h)
    for p in sorted(run.glob("ft/*/*/seed*.safetensors")):
        from safetensors.numpy import load_file

        out[str(p.relative_to(run))] = {k: v.tolist() for k, v in load_file(p).items()}
    for pattern, fields in (("calibration/*/*/seed*.json", ("mean", "option_probs")),
                            ("learners/*/seed*.json", ("ids", "knn", "logreg")),
                            ("lr_search/*.json", ("rates", "dev_ids")),
                            ("lr_search/*/*/m*.json", ("dev_correct", "final_loss")),
                            ("jobs/*/seed*.json", ("eval_ids", "demo_ids", "ft_demo_ids"))):
        for p in sorted(run.glob(pattern)):
            rec = json.loads(p.read_text())
            out[str(p.relative_to(run))] = [rec[f] for f in fields] + [rec["config_hash"] == h]
    return out


def assert_close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)) and a and isinstance(a[0], (list, tuple, dict, float)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=path)
    else:
        assert a == b, path


REPAIRS = ["flip", "truncate", "empty", "garbage", "wrong_type", "delete", "foreign", "duplicate"]


@pytest.mark.parametrize("how", REPAIRS)
def test_rerun_repairs_every_kind_at_once(baseline, tmp_path, data_dir, how):
    run = copy_run(baseline, tmp_path, failure=applies("failure record", how))
    # a damaged config.json beside foreign manifests is ambiguous: that case is refused (below)
    kinds = [k for k in FILES if applies(k, how) and k != "launch record"
             and not (how == "foreign" and k == "run config")]
    assert len(kinds) >= 2
    for kind in kinds:
        damage(run, kind, how)
    r = run_cli(args(tmp_path, data_dir))
    assert r.returncode == 0, (kinds, r.stderr[-3000:])
    assert_same_records(run_records(baseline / "run"), run_records(run))
    assert_close(side_records(baseline / "run"), side_records(run))
    assert not list(run.glob("failures/**/*.json"))
    assert ((baseline / "reports/run/metrics.csv").read_text() == (tmp_path / "reports/run/metrics.csv").read_text())
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("how", ["flip", "garbage", "wrong_type"])
def test_a_damaged_launch_record_is_named_before_any_work(baseline, tmp_path, data_dir, how):
    run = copy_run(baseline, tmp_path)
    p = damage(run, "launch record", how)
    (run / FILES["job meta"]).unlink()   # would be rewritten by a launch that started work
    r = run_cli(args(tmp_path, data_dir))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and p.name in lines[0] and "delete it" in lines[0], r.stderr[-2000:]
    assert not (run / FILES["job meta"]).exists()


def test_foreign_manifests_without_a_sound_config_are_refused(baseline, tmp_path, data_dir):
    run = copy_run(baseline, tmp_path)
    damage(run, "run config", "garbage")
    damage(run, "manifest", "foreign")
    r = run_cli(args(tmp_path, data_dir))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "holds shards of another config" in lines[0], r.stderr[-2000:]
    assert "manifest-r0.json" in lines[0]


def test_a_killed_writers_temporary_files_are_removed(baseline, tmp_path, data_dir):
    import subprocess
    import sys

    run = copy_run(baseline, tmp_path, failure=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()   # a pid no process holds now
    stale = [run / f"progress/.r0.json.tmp{dead}", run / f"jobs/sst2/.seed1.json.tmp{dead}",
             run / f"shards/sst2/icl/seed1/.r0-00007.safetensors.tmp{dead}"]
    for p in stale:
        p.write_bytes(b"half")
    report_tmp = tmp_path / "reports" / f".run.tmp{dead}"
    report_tmp.mkdir(parents=True)
    (report_tmp / "report.md").write_text("half")
    r = run_cli(args(tmp_path, data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [p for p in stale if p.exists()] and not report_tmp.exists()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["run"]
