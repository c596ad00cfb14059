import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # bench.common: the full-recompute reference scoring
DATA_DIR = Path(os.environ.get("ICL_SCALE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "cb" / "train.jsonl").is_file():
        pytest.skip(f"the study's shared data is not at {DATA_DIR} (set ICL_SCALE_DATA_DIR)")
    return DATA_DIR


def run_cli(args, cwd=ROOT, env=None, timeout=900, prelude=""):
    """`python -m icl_scale ...` in a subprocess with one thread per process; `prelude`: Python run
    first in that process (e.g. a fault injected by monkeypatching)."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    cmd = ([sys.executable, "-c", f"{prelude}\nimport sys\nfrom icl_scale.cli import main\nsys.exit(main(sys.argv[1:]))"]
           if prelude else [sys.executable, "-m", "icl_scale"])
    return subprocess.run([*cmd, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def globbed(root: Path, pattern: str) -> list[Path]:
    """sorted(root.glob(pattern)), which must match something: a loop over nothing asserts nothing."""
    found = sorted(root.glob(pattern))
    assert found, f"nothing matches {pattern} under {root}"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc: int, env=None, timeout=900, popen=False, gpu=False):
    """A real `accelerate launch` with nproc CPU processes (see DESIGN.md §4 for the flags), or with
    one process per GPU."""
    e = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    if gpu:
        where = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        e["ACCELERATE_USE_CPU"] = "true"
        where = ["--config_file", str(ROOT / "launcher" / "cpu_2proc.yaml")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *where,
           "--num_processes", str(nproc), "--main_process_port", str(free_port()),
           "-m", "icl_scale", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """tiny-llama saved as a checkpoint: loaded through from_pretrained, as a real model is (and
    partitioned at load under ZeRO-3)."""
    from icl_scale.modeling.load import load_model

    path = tmp_path_factory.mktemp("checkpoint")
    model, tok = load_model("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
