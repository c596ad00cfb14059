"""Damage and concurrency: two launches on one run dir (the second refused, the first unharmed),
and a damaged shard repaired by the rerun to the same records."""

import time

import pytest

from conftest import launch, run_cli
from helpers import assert_same_records, run_records


def args(tmp, data_dir, *extra):
    return ["run", "--model.name", "tiny-llama", "--data.tasks", "sst2,cb", "--data.k", "6", "--data.eval_max", "8",
            "--eval.methods", "zsl,icl,ft", "--model.max_length", "1500", "--output.shard_mb", "0.005",
            "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp / "run"),
            "--output.report_dir", str(tmp / "reports"), *extra]


def test_second_launch_on_a_run_dir_is_refused(tmp_path, data_dir):
    longer = ["--data.eval_max", "40", "--eval.methods", "zsl,icl,ft,ft_lc,ft_lin"]   # still running when the second comes
    first = launch(args(tmp_path, data_dir, *longer), nproc=2, popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "run").glob("shards/*/*/seed1/r*.safetensors")):
        time.sleep(0.1)
    second = run_cli(args(tmp_path, data_dir, *longer))
    assert first.poll() is None, "the first launch ended before the second was refused: nothing was tested"
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another launch (pid" in lines[0] and "one launch at a time" in lines[0]
    # the first launch is whole, and the lock went with it: a rerun resumes (nothing left to do)
    assert run_cli(args(tmp_path, data_dir, *longer)).returncode == 0
    clean = tmp_path / "clean"
    assert run_cli(args(clean, data_dir, *longer)).returncode == 0
    assert_same_records(run_records(clean / "run"), run_records(tmp_path / "run"))


def test_damaged_shard_is_redone_on_rerun(tmp_path, data_dir):
    assert run_cli(args(tmp_path, data_dir)).returncode == 0
    before = run_records(tmp_path / "run")
    shard = sorted((tmp_path / "run/shards/cb/icl/seed1").glob("r*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF   # one flipped byte in the tensor data
    shard.write_bytes(bytes(data))
    r = run_cli(args(tmp_path, data_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_records(before, run_records(tmp_path / "run"))


NAN_FT = """
import torch
import icl_scale.run as R
_scorer = R.finetuned_scorer
def nan_scorer(model, trained, deltas, setting, prefix_ids):
    inner = _scorer(model, trained, deltas, setting, prefix_ids)
    if setting == "ft":   # a diverged model: every logit NaN
        forward = inner.forward
        inner.forward = lambda chunks, keep: forward(chunks, keep) * float("nan")
    return inner
R.finetuned_scorer = nan_scorer
"""


def test_nonfinite_option_scores_are_never_an_accuracy(tmp_path, data_dir):
    import json

    r = run_cli(args(tmp_path, data_dir), prelude=NAN_FT)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "reports/run/results.json").read_text())
    for task in ("sst2", "cb"):
        seed = results["tasks"][task]["seeds"]["1"]
        assert "ft" not in seed["acc"] and seed["nonfinite"]["ft"] == [8, 8]
        assert seed["acc"]["icl"] is not None and "acc/ft" not in results["tasks"][task]["summary"]
    report = (tmp_path / "reports/run/report.md").read_text()
    assert "| FT accuracy |" not in report and "| ICL accuracy |" in report
    assert "non-finite option scores" in report and "sst2 seed 1 `ft` 8 of 8" in report


def _mount_tmpfs(where, size: str) -> str | None:
    """A tmpfs of `size` at `where`, or why not (not root, no mount permission)."""
    import subprocess

    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       text=True)
    return None if r.returncode == 0 else (r.stderr.strip() or "mount failed")


def test_disk_full_is_one_line_and_the_resume_finishes_identically(tmp_path, data_dir):
    import subprocess

    disk = tmp_path / "disk"
    why = _mount_tmpfs(disk, "200k")
    if why:
        pytest.skip(f"cannot mount a small tmpfs here: {why}")
    try:
        r = run_cli(args(disk, data_dir))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1, r.stderr[-3000:]
        assert lines[-1].startswith("icl-scale: error: No space left on device writing ") and str(disk) in lines[-1]
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert not [p for p in disk.rglob("*") if ".tmp" in p.name], "a half-written file"
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = run_cli(args(disk, data_dir))
        assert r.returncode == 0, r.stderr[-3000:]
        clean = tmp_path / "clean"
        assert run_cli(args(clean, data_dir)).returncode == 0
        assert_same_records(run_records(clean / "run"), run_records(disk / "run"))
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def icl_scale_launch(argv, nproc):
    """`icl-scale launch` with nproc CPU processes, in its own session, output read by the caller."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "icl_scale", "launch", "--config_file", str(ROOT / "launcher" / "cpu_2proc.yaml"),
           "--num_processes", str(nproc), "--main_process_port", str(free_port()), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_a_bad_option_under_the_launcher_exits_2_in_one_line(tmp_path, data_dir):
    p = icl_scale_launch(args(tmp_path, data_dir, "--data.tasks", "imdb"), nproc=2)
    out, _ = p.communicate(timeout=300)
    lines = [x for x in out.strip().splitlines() if x]
    assert p.returncode == 2, out[-3000:]
    assert set(lines) == {"icl-scale: error: config field data.tasks: 'imdb' is not one of sst2, sst5, mr, subj, "
                          "agnews, cb"}, out[-3000:]



def test_an_error_line_is_one_write_to_an_unbuffered_stderr(monkeypatch):
    """Ranks run with PYTHONUNBUFFERED: each write is a syscall, so a line written in two parts
    can be split by another rank's line on the shared pipe."""
    import io
    import sys

    from icl_scale.cli import main

    writes = []

    class Raw(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            writes.append(bytes(b))
            return len(b)

    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(Raw(), write_through=True))
    assert main(["run", "--data.tasks", "imdb"]) == 2
    assert writes == [b"icl-scale: error: config field data.tasks: 'imdb' is not one of sst2, sst5, mr, subj, "
                      b"agnews, cb\n"]

@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_every_rank_and_the_rerun_resumes(tmp_path, data_dir, sig):
    import os
    import signal

    import psutil

    longer = ["--data.eval_max", "24"]
    p = icl_scale_launch(args(tmp_path, data_dir, *longer), nproc=2)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "run").glob("shards/*/*/seed1/r*.safetensors")):
        time.sleep(0.1)
    ranks = [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    assert p.poll() is None and ranks, "the launch ended before the signal: nothing was tested"
    os.kill(p.pid, getattr(signal, sig))
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 128 + getattr(signal, sig), out[-3000:]
    assert out.strip().splitlines()[-1] == f"icl-scale: stopped by {sig}; rerun the same command to resume", out[-3000:]
    time.sleep(1)
    assert not [r for r in ranks if psutil.pid_exists(r) and psutil.Process(r).status() != psutil.STATUS_ZOMBIE]
    r = run_cli(args(tmp_path, data_dir, *longer))
    assert r.returncode == 0, r.stderr[-3000:]
    clean = tmp_path / "clean"
    assert run_cli(args(clean, data_dir, *longer)).returncode == 0
    assert_same_records(run_records(clean / "run"), run_records(tmp_path / "run"))


TIED_FT = NAN_FT.replace('* float("nan")', "* 0.0")   # constant logits: every option of equal length ties


def test_a_collapsed_model_whose_options_all_tie_gets_no_accuracy(tmp_path, data_dir):
    import json

    r = run_cli(args(tmp_path, data_dir, "--data.tasks", "sst2"), prelude=TIED_FT)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((tmp_path / "run/jobs/sst2/seed1.json").read_text())
    assert len({len(o) for o in meta["options"]}) == 1, "options of different lengths cannot tie"
    results = json.loads((tmp_path / "reports/run/results.json").read_text())
    seed = results["tasks"]["sst2"]["seeds"]["1"]
    assert "ft" not in seed["acc"] and seed["tied"]["ft"] == [8, 8] and "icl" in seed["acc"]
    assert "sst2 seed 1 `ft` 8 of 8" in (tmp_path / "reports/run/report.md").read_text()
