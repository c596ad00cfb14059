"""Shared set-up for the benchmarks: one thread per process, the real offline model (on the GPU where
there is one), AG News prompts."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from icl_scale.modeling.load import load_model  # noqa: E402
from icl_scale.prompts import Encoder, fit_prompt  # noqa: E402
from icl_scale.tasks import get_task  # noqa: E402
from icl_scale.tasks.sources import load_source  # noqa: E402
from icl_scale.tasks.split import split_task  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def agnews_setup(data_dir: str, n_queries: int, model_name: str = "smollm2-135m", max_length: int = 2048):
    """(model, encoder, prompt, eval rows): the ICL prompt fitted to max_length (≈1,500-token prefix)."""
    model, tok = load_model(model_name, "sdpa")
    model.to(DEVICE)
    spec = get_task("agnews")
    split = split_task(spec, load_source(spec, "offline", data_dir, ""), seed=1, k=32, eval_max=n_queries)
    enc = Encoder(spec, tok)
    return model, enc, fit_prompt(enc, split.demos, split.eval_full, max_length), split.eval


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def median(xs) -> float:
    return statistics.median(xs)
