"""Study variants: label switching and the untrained-model control."""

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
