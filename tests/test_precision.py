"""A bfloat16 model finetunes float32 key/value projections: their weights, gradients, updates
and the linearized model's δ are float32 (an update far below bfloat16's resolution is kept), the
rest of the model stays bfloat16, and a bfloat16 run records its precision — the same FT logs
under plain PyTorch and ZeRO-3 with offload on two processes."""

import json

import pytest
import torch

from conftest import launch, run_cli
from icl_scale.methods.finetune import finetune
from icl_scale.methods.losses import standard_loss
from icl_scale.modeling.load import load_model
from icl_scale.modeling.params import trained_params
from icl_scale.modeling.precision import keep_trained_fp32

MODELS = ["tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-opt", "tiny-qwen2", "tiny-mistral", "tiny-phi3", "tiny-xglm"]


@pytest.mark.parametrize("name", MODELS)
def test_bfloat16_model_steps_kv_in_float32(name):
    model, tok = load_model(name, "eager", "bfloat16")
    trained = trained_params(model, "kv")
    record = keep_trained_fp32(model, trained)
    assert record == {"model": "bfloat16", "option_scores": "float32", "trained": "float32",
                      "trained_forward": "float32"}
    ids_trained = {id(t.param) for t in trained}
    assert all(t.param.dtype == torch.float32 for t in trained)
    # what else is float32: only the untrained parts of fused projections' modules (q, biases)
    others = [n for n, p in model.named_parameters() if id(p) not in ids_trained and p.dtype != torch.bfloat16]
    assert all(any(k in n for k in ("c_attn", "query_key_value", "qkv_proj", "k_proj", "v_proj")) for n in others)
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("Sentence: a fine film Label: Positive")])
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16   # the rest of the forward runs in the model's dtype

    lr = 1e-6
    grads = torch.autograd.grad(standard_loss(model, ids), [t.param for t in trained])
    assert all(g.dtype == torch.float32 for g in grads)
    before = [t.param.detach().clone() for t in trained]
    finetune(model, "ft", trained, [ids[0].tolist()], lr=lr)
    moved = lost = 0
    for t, b, g in zip(trained, before, grads):
        m = t.mask if t.mask is not None else torch.ones_like(g)
        want = b - lr * (g * m)   # the SGD step, in float32
        assert torch.equal(t.param.detach(), want), t.name
        moved += int((t.param != b).sum())
        lost += int(((want.bfloat16() == b.bfloat16()) & (want != b)).sum())
    # most of these updates are below bfloat16's resolution: a bfloat16 weight would not move
    assert moved > 0 and lost > moved / 2

    _, deltas = finetune(model, "ft_lin", trained, [ids[0].tolist()], lr=lr)
    assert all(d.dtype == torch.float32 for d in deltas) and any(bool(d.abs().sum() > 0) for d in deltas)


def test_bfloat16_run_records_precision_and_zero3_matches_plain(tmp_path, data_dir):
    base = ["run", "--model.name", "tiny-llama", "--model.dtype", "bfloat16", "--data.tasks", "sst2",
            "--data.k", "6", "--data.eval_max", "4", "--eval.methods", "zsl,icl,ft,ft_lin",
            "--data.data_dir", str(data_dir)]

    def out(name):
        return ["--output.run_dir", str(tmp_path / name / "run"), "--output.report_dir", str(tmp_path / name / "rep")]
    r = run_cli(base + out("plain"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(base + out("zero3") + ["--finetune.deepspeed", "ds_configs/zero3_offload.json"], nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("plain", "zero3"):
        inv = json.loads(next((tmp_path / name / "run/invocations").glob("*.json")).read_text())
        assert inv["precision"]["model"] == "bfloat16" and inv["precision"]["trained"] == "float32"
        report = (tmp_path / name / "rep/run/report.md").read_text()
        assert "Precision: model in bfloat16; trained k/v parameters and their updates in float32" in report
    for setting in ("ft", "ft_lin"):
        a, b = (json.loads((tmp_path / n / f"run/ft/sst2/{setting}/seed1.json").read_text()) for n in ("plain", "zero3"))
        assert a["steps"] == b["steps"] > 1
        assert a["losses"] == pytest.approx(b["losses"], rel=1e-6)
