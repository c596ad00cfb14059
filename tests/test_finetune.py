"""Finetuning math: what standard FT trains, layer-causal gradient isolation, and the lean
linearized gradient against a direct reverse-mode-through-JVP computation."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from icl_scale.methods.linearized import dual_sdpa, linearized_logits
from icl_scale.methods.losses import layer_causal, layer_causal_loss, linearized_loss, sequence_nll, standard_loss
from icl_scale.modeling.load import load_model
from icl_scale.modeling.params import final_norm, trained_params

MODELS = ["tiny-gpt2", "tiny-llama", "tiny-neox", "tiny-opt", "tiny-qwen2", "tiny-mistral", "tiny-phi3", "tiny-xglm"]


def ids_of(tok, text="Sentence: a fine film Label: Positive"):
    return torch.tensor([[tok.bos_token_id] + tok.encode(text)])


@pytest.mark.parametrize("name", MODELS)
def test_standard_ft_changes_kv_in_every_layer_and_nothing_else(name):
    model, tok = load_model(name, "eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = trained_params(model, "kv")
    opt = torch.optim.SGD([t.param for t in trained], lr=0.5)
    for text in ("Sentence: dull Label: Negative", "Sentence: bright Label: Positive"):
        standard_loss(model, ids_of(tok, text)).backward()
        opt.step()
        opt.zero_grad()
    changed_layers = set()
    for n, p in model.named_parameters():
        diff = (p.detach() != before[n])
        is_kv = any(k in n for k in ("k_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj"))
        if not is_kv:
            assert not diff.any(), f"{n} changed"
            continue
        if "c_attn" in n:  # GPT-2 fused [q | k | v] columns: q fixed, k and v trained
            d = p.shape[-1] // 3
            assert not diff[..., :d].any() and diff[..., d:].any(), n
        elif "query_key_value" in n:  # NeoX fused rows per head (q, k, v)
            h = model.config.num_attention_heads
            per = diff.view(h, 3, -1, *p.shape[1:])
            assert not per[:, 0].any() and per[:, 1].any() and per[:, 2].any(), n
        elif "qkv_proj" in n:  # Phi-3 fused rows [q (4 heads × 16) | k (2 × 16) | v (2 × 16)]
            q_rows = model.config.num_attention_heads * 16
            assert not diff[:q_rows].any() and diff[q_rows:q_rows + 32].any() and diff[q_rows + 32:].any(), n
        else:
            assert diff.any(), n
        changed_layers.add(n.split("layers.")[-1].split(".")[0] if "layers." in n else n.split("h.")[-1].split(".")[0])
    assert len(changed_layers) == model.config.num_hidden_layers


@pytest.mark.parametrize("name", MODELS)
def test_layer_causal_gradient_of_layer_l_comes_from_loss_l_only(name):
    model, tok = load_model(name, "eager")
    trained = trained_params(model, "kv")
    ids = ids_of(tok)
    L = model.config.num_hidden_layers
    total, losses = layer_causal_loss(model, ids)
    assert len(losses) == L
    grads_sum = torch.autograd.grad(total, [t.param for t in trained])
    for l in range(L):
        _, losses = layer_causal_loss(model, ids)
        g = torch.autograd.grad(losses[l], [t.param for t in trained], allow_unused=True)
        for t, gl, gs in zip(trained, g, grads_sum):
            if t.layer == l:
                assert gl is not None and gl.abs().sum() > 0
                torch.testing.assert_close(gl, gs, atol=1e-6, rtol=1e-5)  # nothing else reaches layer l
            else:
                assert gl is None or gl.abs().sum() == 0
    # the last layer's loss is the ordinary loss
    torch.testing.assert_close(losses[-1], standard_loss(model, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 64])
@pytest.mark.parametrize("name", MODELS + ["tiny-gemma3"])
def test_layer_causal_gradients_are_bitwise_those_of_the_plain_graph(name, chunk, monkeypatch):
    """The per-layer head gradient taken at once (logits not kept), the head passes of `chunk`
    layers as one matmul, against autograd over the whole graph with every layer's logits kept:
    the same loss and the same gradient bits."""
    import icl_scale.methods.losses as L

    model, tok = load_model(name, "eager")
    params = [t.param for t in trained_params(model, "kv")]
    ids = ids_of(tok)
    monkeypatch.setattr(L, "HEAD_CHUNK_BYTES", chunk * 2 * 4 * ids.shape[1] * model.config.vocab_size)
    assert L.head_chunks(64, ids.shape[1], model.config.vocab_size) == chunk
    norm, head = final_norm(model), model.get_output_embeddings()
    with layer_causal(model) as outs:
        model.base_model(input_ids=ids)
    plain = torch.stack([sequence_nll(head(norm(h)), ids) for h in outs]).sum()
    expected = torch.autograd.grad(plain, params)
    loss, _ = layer_causal_loss(model, ids)
    assert torch.equal(loss, plain)
    for e, g in zip(expected, torch.autograd.grad(loss, params)):
        assert torch.equal(e, g) and e.abs().sum() > 0
    scaled = torch.autograd.grad(layer_causal_loss(model, ids)[0] * 0.25, params)  # a loss scale reaches it
    for e, g in zip(expected, scaled):
        torch.testing.assert_close(g, e * 0.25)


def deltas_like(trained, scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in trained:
        d = (torch.randn(t.param.shape, generator=g, dtype=t.param.dtype) * scale).to(t.param.device)
        out.append(d * t.mask if t.mask is not None else d)
    return out


def reference_linearized_grad(model, trained, deltas, ids):
    """Reverse mode through a JVP over the parameters (the reference's way), in one autograd graph."""
    names = {id(p): n for n, p in model.named_parameters()}
    ds = [d.clone().requires_grad_(True) for d in deltas]
    with fwAD.dual_level(), sdpa_kernel([SDPBackend.MATH]):
        params = {names[id(t.param)]: fwAD.make_dual(t.param.detach(), d) for t, d in zip(trained, ds)}
        out = functional_call(model, params, (ids,))
        primal, tangent = fwAD.unpack_dual(out.logits)
        loss = sequence_nll(primal + tangent, ids)
    return torch.autograd.grad(loss, ds)


@pytest.fixture
def float64_default():
    """Float64 models run only in these tests: XGLM's attention builds its mask floor with
    torch.full((), finfo(dtype).min) in the default dtype, which float32 cannot hold for float64."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("name", MODELS)
def test_lean_linearized_gradient_equals_reverse_through_jvp_float64(name, float64_default):
    # SDPA's math backend: the eager paths of some models run their softmax in float32
    model, tok = load_model(name, "sdpa", dtype="float64")
    trained = trained_params(model, "kv")
    ids = ids_of(tok)
    deltas = deltas_like(trained, 0.05)
    with sdpa_kernel([SDPBackend.MATH]):
        loss = linearized_loss(model, trained, deltas, ids)
        lean = torch.autograd.grad(loss, [t.param for t in trained])
    lean = [g * t.mask if t.mask is not None else g for g, t in zip(lean, trained)]
    ref = reference_linearized_grad(model, trained, deltas, ids)
    ref = [g * t.mask if t.mask is not None else g for g, t in zip(ref, trained)]  # δ lives on k/v parts only
    num = sum(((a - b) ** 2).sum() for a, b in zip(lean, ref)).sqrt()
    den = sum((b ** 2).sum() for b in ref).sqrt()
    assert den > 0 and (num / den).item() <= 1e-10


@pytest.mark.parametrize("name,attn", [("tiny-gpt2", "eager"), ("tiny-llama", "eager"), ("tiny-neox", "eager"),
                                       ("tiny-llama", "sdpa"), ("tiny-gpt2", "sdpa"), ("tiny-qwen2", "sdpa"),
                                       ("tiny-mistral", "eager"), ("tiny-phi3", "sdpa"),
                                       ("tiny-xglm", "eager")])  # smooth activations (not OPT's ReLU)
def test_linearization_is_exact_at_zero_and_second_order(name, attn, float64_default):
    model, tok = load_model(name, attn, dtype="float64")
    trained = trained_params(model, "kv")
    ids = ids_of(tok)
    with torch.no_grad():
        f0 = model(input_ids=ids).logits
    zero = [torch.zeros_like(t.param) for t in trained]
    assert torch.equal(linearized_logits(model, trained, zero, ids), f0)
    direction = deltas_like(trained, 1.0, seed=1)
    errors = []
    for eps in (1e-3, 5e-4, 2.5e-4):
        step = [eps * d for d in direction]
        f_lin = linearized_logits(model, trained, step, ids)
        with torch.no_grad():
            for t, d in zip(trained, step):
                t.param.add_(d)
            f_true = model(input_ids=ids).logits
            for t, d in zip(trained, step):
                t.param.sub_(d)
        errors.append((f_true - f_lin).abs().max().item())
    # halving ε divides the error by 4 (ε²), not by 2 (which a wrong tangent would give)
    for a, b in zip(errors, errors[1:]):
        assert 3.5 < a / b < 4.5, errors


def test_clipping_modes_against_hand_computation():
    from icl_scale.methods.finetune import clip_
    from icl_scale.modeling.params import Trained

    p = torch.nn.Parameter(torch.zeros(1))
    trained = [Trained("a", p, 0), Trained("b", p, 0), Trained("c", p, 1)]
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0]), torch.tensor([12.0])]   # layer norms 5 and 12

    def clipped(how, value):
        g = [x.clone() for x in grads]
        return [x.tolist() for x in g], clip_(trained, g, how, value).nonzero().flatten().tolist(), g

    # global L2: total norm 13 → everything times 6.5/13
    _, hit, g = clipped("global_l2", 6.5)
    assert [x.tolist() for x in g] == [[1.5, 2.0], [0.0], [6.0]] and hit == [0, 1]
    assert clipped("global_l2", 13.5)[1] == []
    # per-layer L2 at 6: layer 0 (norm 5) untouched, layer 1 (norm 12) halved
    _, hit, g = clipped("layer_l2", 6.0)
    assert [x.tolist() for x in g] == [[3.0, 4.0], [0.0], [6.0]] and hit == [1]
    # element clamp at 3.5: 4 → 3.5 and 12 → 3.5, 3 stays
    _, hit, g = clipped("elem_clamp", 3.5)
    assert [x.tolist() for x in g] == [[3.0, 3.5], [0.0], [3.5]] and hit == [0, 1]
    assert clipped("elem_clamp", 4.0)[1] == [1]
    # L-infinity rescale at 3: the largest element 12 → 3, everything times 1/4
    _, hit, g = clipped("linf_rescale", 3.0)
    assert [x.tolist() for x in g] == [[0.75, 1.0], [0.0], [3.0]] and hit == [0, 1]
    assert clipped("linf_rescale", 12.0)[1] == []
    assert clipped("none", 0.1)[1] == []


def test_finetune_loop_logs_steps_and_restores_theta0(monkeypatch):
    import icl_scale.methods.finetune as T
    from icl_scale.methods.losses import LOSSES

    model, tok = load_model("tiny-llama", "eager")
    trained = trained_params(model, "kv")
    seqs = [ids_of(tok, t)[0].tolist() for t in ("Sentence: a Label: Negative", "Sentence: b Label: Positive")]
    before = [t.param.detach().clone() for t in trained]
    with T.restored(trained):
        log, deltas = T.finetune(model, "ft_lc", trained, seqs, lr=0.1)
        assert any(not torch.equal(t.param, b) for t, b in zip(trained, before))
    assert all(torch.equal(t.param, b) for t, b in zip(trained, before))
    assert log.steps == 2 and log.skipped == 0 and deltas is None
    assert len(log.grad_norms) == 2 and all(len(r) == 3 and min(r) > 0 for r in log.grad_norms)
    assert log.clipped == [[], []]   # no clipping asked
    with T.restored(trained):
        log, _ = T.finetune(model, "ft", trained, seqs, lr=0.1, clip="layer_l2", clip_value=1e-9)
    assert log.clipped == [[0, 1, 2], [0, 1, 2]]   # every layer's norm is above 1e-9
    log, deltas = T.finetune(model, "ft_lin", trained, seqs, lr=0.1)
    assert all(torch.equal(t.param, b) for t, b in zip(trained, before))  # θ0 never moves
    assert any(d.abs().sum() > 0 for d in deltas)
    monkeypatch.setitem(LOSSES, "standard", lambda m, ids, trained, deltas: standard_loss(m, ids) * float("nan"))
    log, _ = T.finetune(model, "ft", trained, seqs, lr=0.1)
    assert log.skipped == 2 and all(torch.equal(t.param, b) for t, b in zip(trained, before))


class _Attention(torch.nn.Module):
    is_causal, layer_idx = True, 0

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


GPU = pytest.mark.gpu
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# float64 on the CPU to rounding; float32 on a GPU, where the primal runs a fused kernel (flash or
# memory-efficient) and the math backend's reference rounds differently
DEVICES = [pytest.param("cpu", torch.float64, 1e-12, id="cpu-f64"),
           pytest.param("cuda", torch.float32, 2e-5, id="cuda-f32", marks=[GPU, NO_CUDA])]


@pytest.mark.parametrize("device,dtype,atol", DEVICES)
@pytest.mark.parametrize("heads,kv_heads,q_len,k_len,mask,tangents", [
    (4, 2, 5, 5, None, "qkv"), (4, 4, 5, 9, "bool", "qkv"), (6, 2, 1, 7, None, "qkv"),
    (4, 2, 5, 8, "float", "qkv"), (4, 2, 6, 6, "bool", "kv")])
def test_attention_tangent_equals_math_backend_forward_ad(heads, kv_heads, q_len, k_len, mask, tangents,
                                                          device, dtype, atol):
    """The linearized model's attention writes its tangent out (capture._sdpa running
    linearized.dual_sdpa); it must equal forward-mode AD through SDPA's math backend, grouped-query
    heads and every mask kind included."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from icl_scale.modeling.capture import _sdpa, dual_attention

    g = torch.Generator().manual_seed(heads * 100 + k_len)
    shapes = {"q": (2, heads, q_len, 64), "k": (2, kv_heads, k_len, 64), "v": (2, kv_heads, k_len, 64)}
    primal = {n: torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for n, s in shapes.items()}
    tangent = {n: torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)
               for n, s in shapes.items() if n in tangents}
    m = None
    if mask == "bool":   # causal with a sliding window's cut
        m = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
        m[:, :2] = False
        m = m[None, None].expand(2, 1, q_len, k_len).to(device)
    elif mask == "float":
        m = torch.randn(2, 1, q_len, k_len, generator=g, dtype=torch.float64).to(device, dtype)
    module = _Attention(heads // kv_heads)
    with fwAD.dual_level():
        q, k, v = (fwAD.make_dual(primal[n], tangent[n]) if n in tangent else primal[n] for n in "qkv")
        with dual_attention(dual_sdpa):
            got_p, got_t = fwAD.unpack_dual(_sdpa(module, q, k, v, m, scaling=0.3)[0])
        with sdpa_kernel([SDPBackend.MATH]):
            want_p, want_t = fwAD.unpack_dual(sdpa_attention_forward(module, q, k, v, m, scaling=0.3, dropout=0.0)[0])
    assert want_t is not None and want_t.abs().max() > 0.1
    torch.testing.assert_close(got_p, want_p, rtol=0, atol=atol)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=atol)


@GPU
@NO_CUDA
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_linearized_model_on_gpu(name):
    """On a GPU under SDPA's fused kernels (float32): f_lin at δ = 0 is the plain forward exactly,
    and the lean gradient matches reverse mode through a JVP."""
    model, tok = load_model(name, "sdpa")
    model.cuda()
    trained = trained_params(model, "kv")
    ids = ids_of(tok).cuda()
    with torch.no_grad():
        f0 = model(input_ids=ids).logits
    assert torch.equal(linearized_logits(model, trained, [torch.zeros_like(t.param) for t in trained], ids), f0)
    deltas = deltas_like(trained, 0.05)
    loss = linearized_loss(model, trained, deltas, ids)
    lean = torch.autograd.grad(loss, [t.param for t in trained])
    ref = reference_linearized_grad(model, trained, deltas, ids)
    masked = lambda gs: [g * t.mask if t.mask is not None else g for g, t in zip(gs, trained)]  # noqa: E731
    num = sum(((a - b) ** 2).sum() for a, b in zip(masked(lean), masked(ref))).sqrt()
    den = sum((b ** 2).sum() for b in masked(ref)).sqrt()
    assert den > 0 and (num / den).item() <= 1e-4
