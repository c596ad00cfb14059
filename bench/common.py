"""Shared set-up for the benchmarks: one thread per process, the real offline model (on the GPU where
there is one), AG News prompts; and scoring by full recompute, the baseline of the prefix cache
(tests use it as the independent reference)."""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from icl_scale.methods.evaluate import Scored, score_batch  # noqa: E402
from icl_scale.modeling.capture import capture  # noqa: E402
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


def score_query(model, cache, query_ids, options, record="prediction", do_capture=True) -> Scored:
    return score_batch(model, cache, [list(query_ids)], options, record, do_capture)[0]


class FullRecompute:
    """The same interface as PrefixCache with no reuse: every forward runs prefix + chunk whole.
    The reference for tests and the prefix-cache benchmark."""

    max_batch = 1

    def __init__(self, model, prefix_ids):
        self.model, self.prefix = model, list(prefix_ids)

    def forward(self, chunks, keep):
        assert len(chunks) == 1
        with torch.no_grad():
            ids = torch.tensor([self.prefix + list(chunks[0])], device=self.model.device)
            return self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits.float()


def score_full(model, prefix_ids, query_ids, options, record="prediction", do_capture=True) -> Scored:
    """score_query with the whole sequence recomputed; captured scores keep the query columns."""
    full = FullRecompute(model, prefix_ids)
    res = score_query(model, full, query_ids, options, record, do_capture=False)
    if do_capture:
        chunk = list(query_ids) + [options[0][0]] * (record == "answer")
        with capture(model, len(chunk)) as cap, torch.no_grad():
            model(input_ids=torch.tensor([list(prefix_ids) + chunk], device=model.device), use_cache=False,
                  logits_to_keep=1)
        attn_out, scores = cap.stacked()
        res.attn_out, res.scores = attn_out[0], scores[0]
    return res
