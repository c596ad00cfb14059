"""Study variants: label switching and the untrained-model control."""

import json

import numpy as np
import pytest
import torch

from icl_scale.modeling.load import load_model
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import split_task


def test_label_switching_flip_and_permute(data_dir):
    spec = get_task("sst5")
    src = load_source(spec, "offline", str(data_dir), "")
    clean = split_task(spec, src, seed=4, k=32, eval_max=5)
    flip = split_task(spec, src, seed=4, k=32, eval_max=5, label_noise=0.25, label_noise_mode="flip")
    again = split_task(spec, src, seed=4, k=32, eval_max=5, label_noise=0.25, label_noise_mode="flip")
    perm = split_task(spec, src, seed=4, k=32, eval_max=5, label_noise=0.5, label_noise_mode="permute")
    assert [r["id"] for r in flip.demos] == [r["id"] for r in clean.demos]
    changed = [i for i, (a, b) in enumerate(zip(clean.demos, flip.demos)) if a["label"] != b["label"]]
    assert len(changed) == 8 and changed == [i for i, r in enumerate(flip.demos) if r.get("corrupted")]
    assert all(flip.demos[i]["label"] == (clean.demos[i]["label"] + 1) % 5 for i in changed)
    assert [r["label"] for r in again.demos] == [r["label"] for r in flip.demos]
    chosen = [i for i, r in enumerate(perm.demos) if r.get("corrupted")]
    assert len(chosen) == 16
    assert sorted(perm.demos[i]["label"] for i in chosen) == sorted(clean.demos[i]["label"] for i in chosen)
    assert all("corrupted" not in r for r in clean.demos)  # the pool rows are not touched


@pytest.mark.parametrize("saved", [False, True])
def test_untrained_control_reinitialises_blocks_only(tmp_path, saved):
    name = "tiny-llama"
    if saved:   # loaded through from_pretrained, as every real checkpoint is
        model, tok = load_model(name, "eager")
        model.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        name = str(tmp_path)
    trained, _ = load_model(name, "eager")
    control, _ = load_model(name, "eager", untrained=True)
    for (n, p), (_, q) in zip(trained.named_parameters(), control.named_parameters()):
        block_linear = ".layers." in n and n.endswith(".weight") and "norm" not in n
        if block_linear:
            assert not torch.equal(p, q), n
        else:
            assert torch.equal(p, q), n


def test_untrained_control_is_one_network_per_run_seed(tmp_path, data_dir):
    """Seed s's network is re-initialised with s: two seeds give two networks (zero-shot scores
    differ although ZSL sees no demonstration), and seed 2's records do not depend on whether
    seed 1 ran before it in the same launch."""
    from conftest import run_cli
    from helpers import run_records

    def run(name, seeds):
        r = run_cli(["run", "--model.name", "tiny-llama", "--model.untrained", "true", "--data.tasks", "sst2",
                     "--data.k", "4", "--data.eval_max", "4", "--data.seeds", seeds, "--eval.methods", "zsl,ft",
                     "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp_path / name),
                     "--output.report_dir", str(tmp_path / "reports")])
        assert r.returncode == 0, r.stderr[-3000:]
        return run_records(tmp_path / name)

    both, alone = run("both", "1,2"), run("alone", "2")
    one, two = both["sst2", "zsl", 1]["option_scores"], both["sst2", "zsl", 2]["option_scores"]
    assert one.shape == two.shape and not np.allclose(one, two)
    for setting in ("zsl", "ft"):
        assert np.array_equal(both["sst2", setting, 2]["option_scores"], alone["sst2", setting, 2]["option_scores"])
    meta = json.loads((tmp_path / "both" / "jobs" / "sst2" / "seed2.json").read_text())
    assert meta["untrained_init_seed"] == 2
