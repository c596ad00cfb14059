"""Every file the project writes lands whole or not at all: written under a temporary name in the
same directory (parent directories created), then renamed into place with `os.replace`.

    write_text(path, text)               report.md, CSV, manifests, progress counts
    write_json(path, obj)                run-dir records (config, job meta, FT logs, failures, launches)
    save_safetensors(path, arrays, meta) shards and trained weights (numpy arrays); returns the sha256
    save_png(path, fig)                  report figures (matplotlib)
    directory(path)                      a whole directory (a report, a converted model) swapped in at once
    remove_stale(root)                   temporary files a killed process left under a directory

No torch here: the report is built without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path


def _tmp(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


@contextmanager
def _landing(path: Path, tmp: Path):
    """A failed write (a full disk) leaves no temporary file and names the file it was writing."""
    try:
        yield
    except Exception as e:
        tmp.unlink(missing_ok=True)
        # safetensors' Rust writer reports an OS error as text: "... (os error 28)"
        code = e.errno if isinstance(e, OSError) else next(map(int, re.findall(r"os error (\d+)", str(e))), None)
        if code is not None and getattr(e, "filename", None) is None:
            raise OSError(code, os.strerror(code), str(path)) from e
        raise


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with _landing(path, tmp):
        tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_safetensors(path: Path, arrays: dict, metadata: dict) -> str:
    """A safetensors file of numpy arrays; returns its sha256 (taken before the rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tmp = _tmp(path)
    with _landing(path, tmp):
        save_file(arrays, str(tmp), metadata=metadata)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def save_png(path: Path, fig, dpi: int = 110) -> None:
    path = Path(path)
    tmp = _tmp(path, ".png")   # matplotlib picks the format from the suffix
    with _landing(path, tmp):
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)


def _pid_of(name: str) -> int | None:
    tail = name.rsplit(".tmp", 1)[-1] if ".tmp" in name else name.rsplit(".old", 1)[-1]
    digits = "".join(c for c in tail.split(".")[0] if c.isdigit())
    return int(digits) if digits else None


def _alive(pid: int | None) -> bool:
    if pid is None or pid == os.getpid():
        return pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_stale(root: Path, dead_only: bool = True) -> list[Path]:
    """Temporary files and directories (`.<name>.tmp<pid>`, `.<name>.old<pid>`) under `root` left
    by a killed writer; `dead_only`: only those whose process is not running on this host (without
    it: all, for a caller that knows no one else writes there, as a launch holding the run-dir lock)."""
    root, gone = Path(root), []
    if not root.is_dir():
        return gone
    for p in list(root.rglob(".*.tmp*")) + list(root.rglob(".*.old*")):
        if (dead_only and _alive(_pid_of(p.name))) or not p.exists():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        gone.append(p)
    return gone


@contextmanager
def directory(path: Path, replace: bool = True):
    """Yield a fresh temporary directory; when the block succeeds it becomes `path` (replacing an
    existing one, or with replace=False leaving an existing one as it is: another process finished
    first). A failing block leaves `path` as it was."""
    path = Path(path)
    tmp = _tmp(path)
    for stale in path.parent.glob(f".{path.name}.*"):   # a killed writer's, not a running one's
        if not _alive(_pid_of(stale.name)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists() and not replace:
            return
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
