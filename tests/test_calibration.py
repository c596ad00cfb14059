"""Calibrated scoring and the calibration figures: calibrated accuracy by hand, ECE and Brier
against a plain-loop implementation written here, and a run whose content-free distributions
equal an independent full recompute and whose calibrated figures equal a recomputation from its
shards."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from helpers import run_records
from icl_scale.methods.calibration import CONTEXTUAL, content_free_rows
from icl_scale.report import metrics as M
from icl_scale.tasks import get_task


def test_calibrated_accuracy_by_hand():
    # three examples, two options; the content-free distribution leans 0.8 to option 0
    scores = np.log(np.array([[0.7, 0.3], [0.9, 0.1], [0.6, 0.4]]))
    gold = np.array([1, 0, 1])
    probs = M.option_probs(scores)
    assert np.allclose(probs, [[0.7, 0.3], [0.9, 0.1], [0.6, 0.4]])
    # divided out: [0.875, 1.5], [1.125, 0.5], [0.75, 2.0] → predictions 1, 0, 1
    assert M.calibrated(probs, [0.8, 0.2]).tolist() == [1, 0, 1]
    assert M.accuracy(M.calibrated(probs, [0.8, 0.2]), gold) == 1.0 and M.accuracy(probs.argmax(1), gold) == 1 / 3


def _ece_loop(probs, gold, bins=15):
    """ECE written out example by example: bin b holds confidences in [b/bins, (b+1)/bins)."""
    n = len(gold)
    acc_sum, conf_sum, count = [0.0] * bins, [0.0] * bins, [0] * bins
    for p, g in zip(probs, gold):
        c = max(p)
        b = min(int(c * bins), bins - 1)
        count[b] += 1
        conf_sum[b] += c
        acc_sum[b] += 1.0 if list(p).index(c) == g else 0.0
    return sum(count[b] / n * abs(acc_sum[b] / count[b] - conf_sum[b] / count[b]) for b in range(bins) if count[b])


@pytest.mark.parametrize("n_options", [2, 3, 5])
def test_ece_and_brier_against_plain_loops(n_options):
    rng = np.random.default_rng(n_options)
    scores = rng.normal(size=(200, n_options)) * 2
    gold = rng.integers(0, n_options, 200)
    probs = M.option_probs(scores)
    want_brier = np.mean([sum((p[c] - (c == g)) ** 2 for c in range(n_options)) for p, g in zip(probs, gold)])
    assert M.ece(probs, gold) == pytest.approx(_ece_loop(probs, gold), abs=1e-12)
    assert M.brier(probs, gold) == pytest.approx(want_brier, abs=1e-12)
    scores[3, 1] = np.nan   # a diverged row is left out of both
    probs = M.option_probs(scores)
    keep = np.arange(200) != 3
    assert M.ece(probs, gold) == pytest.approx(_ece_loop(probs[keep], gold[keep]), abs=1e-12)


def test_domain_inputs_are_seeded_words_of_the_demonstrations():
    spec = get_task("cb")
    demos = [{"premise": "the cat sat", "hypothesis": "a mat", "label": 0},
             {"premise": "dogs bark loudly", "hypothesis": "noise", "label": 1}]
    a, b = (content_free_rows(spec, "domain", demos, seed=3) for _ in range(2))
    assert a == b and len(a) == 20 and a != content_free_rows(spec, "domain", demos, seed=4)
    words = {"the", "cat", "sat", "a", "mat", "dogs", "bark", "loudly", "noise"}
    assert all(set(r["premise"].split()) <= words and set(r["hypothesis"].split()) <= words for r in a)
    assert [r["premise"] for r in content_free_rows(spec, "contextual", demos, 3)] == list(CONTEXTUAL)


def test_calibrated_run_against_recompute(tmp_path, data_dir):
    from bench.common import score_full
    from icl_scale.modeling.load import load_model
    from icl_scale.prompts import Encoder

    r = run_cli(["run", "--model.name", "tiny-llama", "--data.tasks", "sst2,cb", "--data.k", "6", "--data.eval_max",
                 "6", "--eval.methods", "zsl,icl,ft", "--eval.calibration", "contextual", "--model.max_length", "1500",
                 "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp_path / "run"),
                 "--output.report_dir", str(tmp_path / "reports")])
    assert r.returncode == 0, r.stderr[-3000:]
    model, tok = load_model("tiny-llama")
    results = json.loads((tmp_path / "reports/run/results.json").read_text())
    records = run_records(tmp_path / "run")
    for task in ("sst2", "cb"):
        enc = Encoder(get_task(task), tok)
        meta = json.loads((tmp_path / f"run/jobs/{task}/seed1.json").read_text())
        got = results["tasks"][task]["seeds"]["1"]
        for setting in ("zsl", "icl", "ft"):
            record = json.loads((tmp_path / f"run/calibration/{task}/{setting}/seed1.json").read_text())
            if setting != "ft":   # θ0: recompute each content-free prompt whole
                prefix = [enc.bos] if setting == "zsl" else _icl_prefix(tmp_path, task, enc, meta)
                want = []
                for text in CONTEXTUAL:
                    s = score_full(model, prefix, enc.input_ids({f: text for f in enc.spec.fields}), enc.options(),
                                   do_capture=False)
                    want.append(torch.softmax(torch.tensor(s.option_scores, dtype=torch.float64), 0).numpy())
                np.testing.assert_allclose(record["mean"], np.mean(want, 0), atol=1e-5)
            probs = M.option_probs(records[task, setting, 1]["option_scores"])
            pred = np.argmax(probs / np.array(record["mean"]), 1)
            gold = records[task, setting, 1]["gold"]
            assert got["acc_cal"][setting] == pytest.approx(float((pred == gold).mean()))
            assert got["ece"][setting] == pytest.approx(_ece_loop(probs, gold), abs=1e-9)


def _icl_prefix(tmp_path, task, enc, meta):
    """The ICL prefix rebuilt from the job's demonstration ids (the plan's own prompt)."""
    from icl_scale import config as C
    from icl_scale.plan import plan

    cfg = C.build(json.loads((tmp_path / "run/config.json").read_text()).get("config"))
    job = next(j for j in plan(cfg, enc.tok, 2048) if j.task == task)
    assert list(job.prompts["icl"].demo_ids) == meta["demo_ids"]
    return job.prompts["icl"].prefix_ids
