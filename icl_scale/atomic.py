"""Every file the project writes lands whole or not at all: written under a temporary name in the
same directory (parent directories created), then renamed into place with `os.replace`.

    write_text(path, text)               report.md, CSV, manifests, progress counts
    write_json(path, obj)                run-dir records (config, job meta, FT logs, failures, launches)
    save_safetensors(path, arrays, meta) shards and trained weights (numpy arrays); returns the sha256
    save_png(path, fig)                  report figures (matplotlib)
    directory(path)                      a whole directory (a report, a converted model) swapped in at once

No torch here: the report is built without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def _tmp(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = _tmp(path)
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
    save_file(arrays, str(tmp), metadata=metadata)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def save_png(path: Path, fig, dpi: int = 110) -> None:
    path = Path(path)
    tmp = _tmp(path, ".png")   # matplotlib picks the format from the suffix
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    os.replace(tmp, path)


@contextmanager
def directory(path: Path, replace: bool = True):
    """Yield a fresh temporary directory; when the block succeeds it becomes `path` (replacing an
    existing one, or with replace=False leaving an existing one as it is: another process finished
    first). A failing block leaves `path` as it was."""
    path = Path(path)
    tmp = _tmp(path)
    shutil.rmtree(tmp, ignore_errors=True)
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
