"""Capture points against independent computations, and the prefix cache against full recompute."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.common import score_full, score_query
from icl_scale.methods.evaluate import PrefixCache, score_batch, shared_prefix_attention
from icl_scale.modeling.capture import attention_modules, capture
from icl_scale.modeling.load import load_model
from icl_scale.prompts import Encoder, fit_prompt, zsl_prompt
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import split_task

MODELS = ["tiny-gpt2", "tiny-llama", "tiny-opt", "tiny-neox", "tiny-gemma3", "tiny-qwen2", "tiny-mistral", "tiny-phi3",
          "tiny-xglm"]


def eager_twin(model):
    """The same weights under transformers' plain eager attention (returns attention probabilities)."""
    twin = AutoModelForCausalLM.from_config(model.config, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def out_proj(attn):
    for name in ("o_proj", "c_proj", "out_proj", "dense"):
        if hasattr(attn, name):
            return getattr(attn, name)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_scores_softmax_to_eager_probabilities(name, attn):
    model, tok = load_model(name, attn)
    ids = torch.tensor([tok.encode("Sentence: a moving film Label:")])  # shorter than gemma3's window
    pos = ids.shape[1] - 1
    with capture(model, pos + 1) as cap, torch.no_grad():
        model(input_ids=ids)
    out, scores = (t[0] for t in cap.stacked())
    twin = eager_twin(model)
    seen = {}
    handles = [out_proj(a).register_forward_hook(lambda m, i, o, l=a.layer_idx: seen.__setitem__(l, o[0, pos]))
               for a in attention_modules(twin)]
    with torch.no_grad():
        probs = twin(input_ids=ids, output_attentions=True).attentions
    for h in handles:
        h.remove()
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(torch.softmax(scores[layer], -1), probs[layer][0, :, pos, : pos + 1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out[layer], seen[layer], atol=1e-6, rtol=1e-5)
    assert scores.shape == (model.config.num_hidden_layers, model.config.num_attention_heads, pos + 1)


@pytest.mark.parametrize("name", MODELS)
def test_scores_after_cached_prefix_are_the_query_columns(name):
    model, tok = load_model(name, "eager")
    prefix = [tok.bos_token_id] + tok.encode("Sentence: dull Label: Negative") + [tok.eos_token_id]
    query = tok.encode("Sentence: bright Label:")
    cache = PrefixCache(model, prefix)
    with capture(model, len(query)) as cap:
        cache.forward([query], 1)
    scores = cap.stacked()[1][0]
    with torch.no_grad():
        probs = eager_twin(model)(input_ids=torch.tensor([prefix + query]), output_attentions=True).attentions
    for layer in range(model.config.num_hidden_layers):
        row = probs[layer][0, :, -1, len(prefix):]
        torch.testing.assert_close(torch.softmax(scores[layer], -1), row / row.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def cb_rows(data_dir):
    spec = get_task("cb")
    return spec, split_task(spec, load_source(spec, "offline", str(data_dir), ""), seed=1, k=32, eval_max=3)


def cb_setup(name, attn, cb_rows):
    """(model, encoder, split, ICL prompt) for CB with a tiny model."""
    spec, split = cb_rows
    model, tok = load_model(name, attn)
    enc = Encoder(spec, tok)
    return model, enc, split, fit_prompt(enc, split.demos, split.eval_full, 1500)


def assert_same_scored(a, b, tol=1e-5):
    assert a.pred == b.pred
    torch.testing.assert_close(torch.tensor(a.option_scores), torch.tensor(b.option_scores), atol=tol, rtol=tol)
    torch.testing.assert_close(a.attn_out, b.attn_out, atol=tol, rtol=tol)
    torch.testing.assert_close(a.scores, b.scores, atol=tol, rtol=tol)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("record", ["prediction", "answer"])
def test_prefix_cache_matches_full_recompute(name, attn, record, cb_rows):
    model, enc, split, icl = cb_setup(name, attn, cb_rows)
    for prompt in (zsl_prompt(enc), icl):
        cache = PrefixCache(model, prompt.prefix_ids)
        for row in split.eval:
            q = enc.input_ids(row)
            a = score_query(model, cache, q, enc.options(), record)
            b = score_full(model, prompt.prefix_ids, q, enc.options(), record)
            assert_same_scored(a, b)
            assert a.scores.shape[-1] == len(q) + (record == "answer")


def test_multi_token_option_score_is_mean_log_softmax():
    model, tok = load_model("tiny-llama", "eager")
    prefix = [tok.bos_token_id]
    q = tok.encode("Input: x Type:")
    options = [tok.encode(" objective"), tok.encode(" subjective")]
    assert all(len(o) > 1 for o in options)
    got = score_query(model, PrefixCache(model, prefix), q, options, do_capture=False)
    for opt, s in zip(options, got.option_scores):
        seq = prefix + q + opt
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        start = len(prefix) + len(q)
        want = sum(lp[start - 1 + j, t].item() for j, t in enumerate(opt)) / len(opt)
        assert abs(s - want) < 1e-5
    assert got.pred == max(range(2), key=lambda i: got.option_scores[i])


SHARED = shared_prefix_attention   # the real one, under the counting wrapper


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("record", ["prediction", "answer"])
def test_batched_queries_match_one_at_a_time(name, attn, record, cb_rows, monkeypatch):
    """A batch over one shared prefix copy (architectures on the attention interface; sliding
    windows score one at a time) equals each query alone; the prefix cache is left as it was."""
    import icl_scale.methods.evaluate as E

    layers = []
    monkeypatch.setattr(E, "shared_prefix_attention",
                        lambda kv, mask, module, *a: layers.append((module.layer_idx, kv[module.layer_idx][0].shape[0]))
                        or SHARED(kv, mask, module, *a))
    model, enc, split, icl = cb_setup(name, attn, cb_rows)
    cache = PrefixCache(model, icl.prefix_ids)
    keys = [layer.keys.clone() for layer in cache.cache.layers]
    queries = [enc.input_ids(r) for r in split.eval]
    assert len({len(q) for q in queries}) > 1  # different lengths: padding is exercised
    batched = score_batch(model, cache, queries, enc.options(), record)
    n_layers = model.config.num_hidden_layers
    if cache.shares and cache.max_batch is None:   # every layer attended to the one prefix copy
        assert sorted(set(layers)) == [(i, 1) for i in range(n_layers)]
    else:
        assert layers == []
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, cache.cache.layers))
    for q, a in zip(queries, batched):
        assert_same_scored(a, score_query(model, cache, q, enc.options(), record))
