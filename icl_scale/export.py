"""`icl-scale export RUN_DIR --to DIR`: a run's merged records as a Hugging Face `datasets` dataset.

    DIR/dataset_dict.json          the configs: one split per task × setting × seed, named
                                   <task>.<setting>.seed<s> (`datasets.load_from_disk(DIR)` gives a
                                   DatasetDict; DIR/<split> alone loads as one Dataset)
    DIR/<split>/                   Arrow files, sorted by example id; columns: id, text, gold, pred,
                                   option_scores [n_options], and with capture attn_out [L, d] and
                                   scores [L][H][n_keys] (the attention map of the recorded position)
    DIR/README.md                  what each split is, the run's config hash and model

The shards are verified as the report verifies them (any damage is one line naming the file) and
read one at a time into Arrow files written in batches, so memory stays bounded by a shard, not
the run. The export is built beside DIR and swapped in whole.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from icl_scale import atomic
from icl_scale import config as C
from icl_scale.report.merge import JobRecords
from icl_scale.runtime import rundir

WRITER_BATCH = 64   # rows per Arrow record batch: with 30 layers × 4096 wide, 30 MiB of attn_out


def split_name(task: str, setting: str, key: str) -> str:
    return f"{task}.{setting}.seed{key}"


def _rows(rec: JobRecords, small: dict, texts: dict, capture: bool):
    """One record per example, shard by shard (its cheapest order)."""
    at = {int(i): k for k, i in enumerate(small["ids"])}
    for chunk in rec.chunks():
        attn, maps = rec.large(chunk) if capture else (None, None)
        for n, i in enumerate(chunk):
            k = at[int(i)]
            row = {"id": int(i), "text": texts.get(int(i), ""), "gold": int(small["gold"][k]),
                   "pred": int(small["pred"][k]), "option_scores": small["option_scores"][k].tolist()}
            if capture:
                row["attn_out"] = attn[n].astype("float32")
                row["scores"] = maps[n].astype("float32").tolist()
            yield row
    rec.release()


def _features(capture: bool, n_layers: int = 0, width: int = 0):
    import datasets as D

    f = {"id": D.Value("int64"), "text": D.Value("string"), "gold": D.Value("int64"), "pred": D.Value("int64"),
         "option_scores": D.Sequence(D.Value("float32"))}
    if capture:
        f["attn_out"] = D.Array2D(shape=(n_layers, width), dtype="float32")
        f["scores"] = D.Sequence(D.Sequence(D.Sequence(D.Value("float32"))))
    return D.Features(f)


def export(run_dir: Path, to: Path) -> list[str]:
    """Write the dataset; returns its split names."""
    import datasets as D

    run_dir, to = Path(run_dir), Path(to)
    cfg, h = rundir.read_config(run_dir)
    D.disable_progress_bars()
    splits, card = [], []
    with atomic.directory(to) as tmp:
        cache = tmp / ".cache"
        for task in cfg.data.tasks:
            for seed in C.seeds_for(cfg, task):
                for order in range(cfg.data.orders):
                    key = str(seed) if order == 0 else f"{seed}o{order}"
                    meta = rundir.read_job_meta(run_dir, task, key, h)
                    texts = dict(zip(meta["eval_ids"], meta.get("eval_texts", ())))
                    for setting in cfg.eval.methods:
                        if order and setting == "zsl":   # order jobs share the seed's ZSL records
                            continue
                        rec = JobRecords(rundir.job_dir(run_dir, task, setting, key), h, meta["eval_ids"])
                        small = rec.small()
                        capture = rec.has_capture()
                        shape = rec.large(rec.ids[:1])[0].shape[1:] if capture else (0, 0)
                        ds = D.Dataset.from_generator(
                            _rows, gen_kwargs={"rec": rec, "small": small, "texts": texts, "capture": capture},
                            features=_features(capture, *shape), cache_dir=str(cache), writer_batch_size=WRITER_BATCH)
                        name = split_name(task, setting, key)
                        with warnings.catch_warnings():   # pyarrow's deprecation notice inside datasets' sort
                            warnings.simplefilter("ignore", FutureWarning)
                            ds.sort("id").save_to_disk(str(tmp / name))
                        splits.append(name)
                        card.append(f"| `{name}` | {len(ds)} | {', '.join(meta['label_words'])} | "
                                    f"{'yes' if capture else 'no'} |")
        shutil.rmtree(cache, ignore_errors=True)
        atomic.write_json(tmp / "dataset_dict.json", {"splits": splits})
        atomic.write_text(tmp / "README.md", "\n".join([
            f"# icl_scale records of run `{run_dir.name}`", "",
            f"Model `{cfg.model.name}`, config hash `{h}`. One split per task × setting × seed "
            "(`datasets.load_from_disk` on this directory gives them all as a DatasetDict). `gold`/`pred` index "
            "the label words; `option_scores` are the options' summed log-probabilities; `attn_out` [layers, "
            "width] and `scores` [layers][heads][keys] are the attention outputs and maps at the recorded "
            "position (DESIGN.md §2.5).", "",
            "| split | examples | label words | captured |", "|---|---|---|---|", *card, ""]))
    return splits
