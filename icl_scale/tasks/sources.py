"""Data sources: every source yields rows {"id", <text fields>, "label"} for a task's train split
and, where it has one, its eval split. Ids are row numbers in the source split's original order.

- hub:     `datasets.load_dataset(hub_path, hub_name)` (the cluster path)
- files:   `<files_dir>/<task>/{train,eval}.{jsonl,csv,parquet}` through `datasets`
- offline: the StaICC package (SST-2 train, SST-5, MR, Subj, AG News) and `data_dir`
           (CB train/val jsonl, SST-2 dev); SST-5, MR and Subj have no eval split offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from icl_scale.errors import UserError, first_line
from icl_scale.tasks import staicc
from icl_scale.tasks.spec import TaskSpec


@dataclass
class SourceRows:
    train: list[dict]
    eval: list[dict] | None   # None: hold out an eval subset of train
    description: str


def to_label(spec: TaskSpec, value, where: str) -> int:
    """Accept a label id, a label word, or a source's label name (CB's entailment/...)."""
    if isinstance(value, bool):
        raise UserError(f"{where}: label {value!r} is a boolean, not one of 0..{len(spec.label_words) - 1} "
                        f"or {', '.join(spec.label_words)}")
    if isinstance(value, float) and value.is_integer():   # a float column (CSV "1.0", or cast by datasets)
        value = int(value)
    if isinstance(value, str):
        low = value.strip().lower()
        words = {w.lower(): i for i, w in enumerate(spec.label_words)}
        if low in spec.label_aliases:
            return spec.label_aliases[low]
        if low in words:
            return words[low]
        if low.lstrip("-").isdigit():
            value = int(low)
    if isinstance(value, int) and 0 <= value < len(spec.label_words):
        return value
    raise UserError(f"{where}: label {value!r} is not one of 0..{len(spec.label_words) - 1} "
                    f"or {', '.join(spec.label_words)}")


def make_row(spec: TaskSpec, idx: int, record: dict, where: str) -> dict:
    row = {"id": idx}
    for f in spec.fields:
        v = record.get(f)
        if not isinstance(v, str) or not v.strip():
            raise UserError(f"{where}: field {f!r} missing or empty")
        row[f] = v
    row["label"] = to_label(spec, record.get("label"), where)
    return row


def _rows_from_records(spec: TaskSpec, records, where: str) -> list[dict]:
    rows = [make_row(spec, i, r, f"{where} row {i + 1}") for i, r in enumerate(records)]
    if not rows:
        raise UserError(f"{where}: split is empty")
    return rows


def _text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"data file {path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x})") from None


def _check_rows(spec: TaskSpec, path: Path, kind: str) -> None:
    """Rows checked as written, before `datasets` casts a column (a float or boolean label cast to
    the column's type would be blamed on another row): JSON lines each an object with a valid
    label; CSV rows each with the header's number of fields."""
    import csv
    import io

    if kind == "parquet":   # typed columns: `datasets` reads them as written
        return
    text = _text(path)
    if kind == "csv":
        rows = list(csv.reader(io.StringIO(text)))
        for n, row in enumerate(rows[1:], 1):
            if row and len(row) != len(rows[0]):
                raise UserError(f"data file {path}: row {n} has {len(row)} fields, the header {len(rows[0])}")
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"data file {path}: row {n} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"data file {path}: row {n} is not a JSON object")
        to_label(spec, record.get("label"), f"data file {path} row {n}")


def read_table(spec: TaskSpec, path: Path) -> list[dict]:
    """A local jsonl/csv/parquet file through `datasets`, as rows."""
    import datasets

    if not path.is_file():
        raise UserError(f"data file {path} not found")
    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(path.suffix)
    if kind is None:
        raise UserError(f"data file {path}: unsupported format (use .jsonl, .csv or .parquet)")
    if path.stat().st_size == 0:
        raise UserError(f"data file {path}: split is empty")
    _check_rows(spec, path, kind)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as e:
        raise UserError(f"data file {path}: cannot be parsed ({first_line(e)})") from None
    return _rows_from_records(spec, ds, f"data file {path}")


def _files(spec: TaskSpec, files_dir: str) -> SourceRows:
    base = Path(files_dir) / spec.name

    def find(split):
        hits = [base / f"{split}{ext}" for ext in (".jsonl", ".csv", ".parquet") if (base / f"{split}{ext}").is_file()]
        return hits[0] if hits else None

    train = find("train")
    if train is None:
        raise UserError(f"data file {base}/train.jsonl (or .csv/.parquet) not found")
    ev = find("eval")
    return SourceRows(read_table(spec, train), read_table(spec, ev) if ev else None, f"files:{base}")


def _hub(spec: TaskSpec) -> SourceRows:
    import datasets

    def load(split):
        try:
            ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=split)
        except Exception as e:
            raise UserError(f"task {spec.name}: hub dataset {spec.hub_path} split {split} cannot be loaded "
                            f"({first_line(e)})") from None
        cols = {f: spec.hub_columns.get(f, f) for f in (*spec.fields, "label")}
        return _rows_from_records(spec, ({f: r[c] for f, c in cols.items()} for r in ds),
                                  f"hub {spec.hub_path}/{split}")

    name = spec.hub_path + (f"/{spec.hub_name}" if spec.hub_name else "")
    return SourceRows(load(spec.hub_train), load(spec.hub_eval), f"hub:{name}")


def _sst2_dev(spec: TaskSpec, path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"data file {path} not found (set data.data_dir)")
    records = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        label, _, text = line.partition(" ")
        if label not in ("0", "1") or not text.strip():
            raise UserError(f"data file {path}: row {n} is not '<0|1> <text>'")
        records.append({"text": text, "label": int(label)})
    return _rows_from_records(spec, records, f"data file {path}")


def _offline(spec: TaskSpec, data_dir: str) -> SourceRows:
    kind, _, name = spec.offline.partition(":")
    if kind == "cb":
        d = Path(data_dir) / "cb"
        return SourceRows(read_table(spec, d / "train.jsonl"), read_table(spec, d / "val.jsonl"), "offline:cb-jsonl")
    pkg = name or spec.name
    rows = _rows_from_records(spec, ({"text": t, "label": y} for t, y in staicc.load_rows(pkg)), f"StaICC {pkg}")
    if spec.name == "agnews":
        train, test = rows[: staicc.AGNEWS_TRAIN_ROWS], rows[staicc.AGNEWS_TRAIN_ROWS:]
        for i, r in enumerate(test):
            r["id"] = i
        return SourceRows(train, test, "offline:staicc")
    if spec.name == "sst2":
        dev = Path(data_dir) / "sst2" / "stsa.binary.dev"
        return SourceRows(rows, _sst2_dev(spec, dev), "offline:staicc+sst2-dev")
    return SourceRows(rows, None, "offline:staicc-heldout")


def load_source(spec: TaskSpec, source: str, data_dir: str, files_dir: str) -> SourceRows:
    if source == "hub":
        return _hub(spec)
    if source == "files":
        return _files(spec, files_dir)
    return _offline(spec, data_dir)
