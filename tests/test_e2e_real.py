"""End to end on the real offline model (SmolLM2-135M) and real data."""

import json

import pytest
import torch

from conftest import ROOT, launch
from helpers import run_records
from bench.common import score_full, score_query
from icl_scale.methods.evaluate import PrefixCache
from icl_scale.modeling.load import load_model
from icl_scale.prompts import Encoder, fit_prompt
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import split_task

pytestmark = pytest.mark.slow


def test_real_model_prefix_cache_matches_recompute_on_agnews(data_dir):
    model, tok = load_model("smollm2-135m", "sdpa")
    spec = get_task("agnews")
    split = split_task(spec, load_source(spec, "offline", str(data_dir), ""), seed=1, k=32, eval_max=2)
    enc = Encoder(spec, tok)
    prompt = fit_prompt(enc, split.demos, split.eval_full, 2048)
    assert 15 <= prompt.k_effective < 32 and len(prompt.prefix_ids) > 1200
    cache = PrefixCache(model, prompt.prefix_ids)
    for row in split.eval:
        a = score_query(model, cache, enc.input_ids(row), enc.options())
        b = score_full(model, prompt.prefix_ids, enc.input_ids(row), enc.options())
        assert a.pred == b.pred
        torch.testing.assert_close(torch.tensor(a.option_scores), torch.tensor(b.option_scores), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.attn_out, b.attn_out, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(a.scores, b.scores, atol=1e-3, rtol=1e-3)


def test_default_job_on_two_processes(tmp_path, data_dir):
    run_dir = tmp_path / "default"
    r = launch(["run", "--config", str(ROOT / "launcher" / "default.yaml"), "--data.tasks", "sst2,cb",
                "--data.eval_max", "4", "--data.data_dir", str(data_dir), "--output.run_dir", str(run_dir),
                "--finetune.lr_grid", "0.1,1", "--finetune.lr_dev_size", "8",   # the default's search, smaller
                "--output.report_dir", str(tmp_path / "reports")], nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((run_dir / "shards/sst2/icl/seed1/manifest-r1.json").read_text())["world_size"] == 2
    records = run_records(run_dir)
    assert len(records["cb", "icl", 1]["ids"]) == 4
    meta = json.loads((run_dir / "jobs/cb/seed1.json").read_text())
    assert 10 <= meta["k_effective"] < 32  # CB's long premises: the greedy fit stops early
    attn = records["sst2", "zsl", 1]["attn_out"]
    assert attn.shape == (4, 30, 576) and (abs(attn).sum(-1) > 0).all()
    assert records["sst2", "icl", 1]["scores"][0].shape[:2] == (30, 9)
    report = (tmp_path / "reports" / "default" / "report.md").read_text()
    assert "| ZSL accuracy |" in report and "| SimAM (before FT) |" in report
    # the default is the study: FT and linearized FT at a selected rate, with the similarity baselines
    for row in ("| FT accuracy |", "| linearized FT accuracy |", "| SimAOU (FT) |", "| SimAOU, shuffled pairs (FT) |",
                "| SimAOU excess over shuffled pairs (linearized FT) |", "| SimAOU ⊥ ĥ_ZSL (FT) |"):
        assert row in report, row
    assert "## Learning-rate selection" in report and "## Does ICL's update align with FT's beyond geometry?" in report
    chosen = json.loads((run_dir / "lr_search" / "sst2.json").read_text())["rates"]
    assert set(chosen) == {"ft", "ft_lin"} and json.loads((run_dir / "ft/sst2/ft/seed1.json").read_text())["lr"] == chosen["ft"]
    assert "| sst2 | 1 |" in report and f"| cb | 1 | offline:cb-jsonl | 4 of 56 | official | {meta['k_effective']}/32 |" in report


def test_real_model_shared_prefix_batches_equal_batch_one(data_dir):
    """AG News ICL (a prefix of > 1,200 tokens) on SmolLM2-135M: batches over one shared prefix
    copy, at the automatic size and at 8, give batch 1's predictions, option scores within 1e-4
    and the same capture points to float rounding."""
    from icl_scale.methods.evaluate import BatchSizer, batches, score_batch

    model, tok = load_model("smollm2-135m", "sdpa")
    spec = get_task("agnews")
    split = split_task(spec, load_source(spec, "offline", str(data_dir), ""), seed=1, k=32, eval_max=12)
    enc = Encoder(spec, tok)
    prompt = fit_prompt(enc, split.demos, split.eval_full, 2048)
    cache = PrefixCache(model, prompt.prefix_ids)
    queries = sorted((enc.input_ids(r) for r in split.eval), key=len)
    one = [score_batch(model, cache, [q], enc.options())[0] for q in queries]
    sizer = BatchSizer(0, most=8)
    auto = sizer.size(model, cache, queries, enc.options(), "prediction", True)
    assert auto in sizer.probe and set(sizer.probe) >= {1, 2}
    for size in sorted({auto, 8}):
        got = [s for b in batches(queries, size) for s in score_batch(model, cache, b, enc.options())]
        assert [s.pred for s in got] == [s.pred for s in one], size
        for a, b in zip(one, got):
            torch.testing.assert_close(torch.tensor(b.option_scores), torch.tensor(a.option_scores), atol=1e-4, rtol=0)
            torch.testing.assert_close(b.attn_out, a.attn_out, atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(b.scores, a.scores, atol=1e-3, rtol=1e-3)
