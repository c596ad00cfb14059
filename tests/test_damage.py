"""Damage and concurrency: two launches on one run dir (the second refused, the first unharmed),
and a damaged shard repaired by the rerun to the same records."""

import time

from conftest import launch, run_cli
from helpers import assert_same_records, run_records


def args(tmp, data_dir, *extra):
    return ["run", "--model.name", "tiny-llama", "--data.tasks", "sst2,cb", "--data.k", "6", "--data.eval_max", "8",
            "--eval.methods", "zsl,icl,ft", "--model.max_length", "1500", "--output.shard_mb", "0.005",
            "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp / "run"),
            "--output.report_dir", str(tmp / "reports"), *extra]


def test_second_launch_on_a_run_dir_is_refused(tmp_path, data_dir):
    first = launch(args(tmp_path, data_dir), nproc=2, popen=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((tmp_path / "run").glob("shards/*/*/seed1/r*.safetensors")):
        time.sleep(0.1)
    second = run_cli(args(tmp_path, data_dir))
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-3000:]
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use by another launch (pid" in lines[0] and "one launch at a time" in lines[0]
    # the first launch is whole, and the lock went with it: a rerun resumes (nothing left to do)
    assert run_cli(args(tmp_path, data_dir)).returncode == 0
    clean = tmp_path / "clean"
    assert run_cli(args(clean, data_dir)).returncode == 0
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
