import pytest

from icl_scale.errors import UserError
from icl_scale.modeling.tiny import byte_tokenizer
from icl_scale.prompts import Encoder, fit_prompt, query_budget, zsl_prompt
from icl_scale.tasks import get_task
from icl_scale.tasks.sources import load_source
from icl_scale.tasks.split import split_task


@pytest.fixture(scope="module")
def cb(data_dir):
    spec = get_task("cb")
    return spec, split_task(spec, load_source(spec, "offline", str(data_dir), ""), seed=3, k=32, eval_max=56)


@pytest.mark.parametrize("max_length", [1400, 2048, 4096])
def test_greedy_fit_is_maximal_and_in_order(cb, max_length):
    spec, split = cb
    enc = Encoder(spec, byte_tokenizer())
    p = fit_prompt(enc, split.demos, split.eval_full, max_length)
    budget = query_budget(enc, split.eval_full)
    expected = [enc.bos]
    for row in split.demos[: p.k_effective]:
        expected += enc.input_ids(row) + enc.options()[row["label"]] + [enc.sep]
    assert list(p.prefix_ids) == expected
    assert list(p.demo_ids) == [r["id"] for r in split.demos[: p.k_effective]]
    assert len(p.prefix_ids) + budget <= max_length
    if p.k_effective < len(split.demos):
        nxt = split.demos[p.k_effective]
        assert len(p.prefix_ids) + len(enc.demo_ids(nxt)) + 1 + budget > max_length


def test_answer_is_label_word_with_leading_space_encoded_apart(cb):
    spec, _ = cb
    tok = byte_tokenizer()
    enc = Encoder(spec, tok)
    assert [tok.decode(o) for o in enc.options()] == [" True", " False", " Neither"]
    assert zsl_prompt(enc).prefix_ids == (tok.bos_token_id,)
    row = {"premise": "It rained", "hypothesis": "It was wet", "label": 0}
    assert tok.decode(enc.input_ids(row)) == "It rained Question: It was wet. True, False, or Neither? Answer:"


def test_query_that_cannot_fit_is_an_error(cb):
    spec, split = cb
    with pytest.raises(UserError, match="model.max_length 100"):
        fit_prompt(Encoder(spec, byte_tokenizer()), split.demos, split.eval_full, 100)
