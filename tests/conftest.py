import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("ICL_SCALE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "cb" / "train.jsonl").is_file():
        pytest.fail(f"test data not found at {DATA_DIR} (set ICL_SCALE_DATA_DIR)")
    return DATA_DIR


def run_cli(args, cwd=ROOT, env=None, timeout=900):
    """`python -m icl_scale ...` in a subprocess with one thread per process."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([sys.executable, "-m", "icl_scale", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def launch(args, nproc: int, env=None, timeout=900, popen=False):
    """A real `accelerate launch` with nproc CPU processes (see DESIGN.md §4 for the flags)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", ACCELERATE_USE_CPU="true", **(env or {}))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launcher" / "cpu_2proc.yaml"),
           "--num_processes", str(nproc), "--main_process_port", str(29500 + os.getpid() % 500 + nproc),
           "-m", "icl_scale", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
