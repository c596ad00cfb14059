import pickle

import pytest

from icl_scale.errors import UserError
from icl_scale.tasks import TASKS, get_task
from icl_scale.tasks import staicc
from icl_scale.tasks.sources import load_source, read_table
from icl_scale.tasks.split import split_task


def test_staicc_unshuffle_recovers_original_agnews_order():
    rows = staicc.load_rows("agnews")
    assert len(rows) == 127_600
    # the first rows of the original AG News train and test splits
    assert rows[0][0].startswith("Wall St. Bears Claw Back Into the Black") and rows[0][1] == 2
    assert rows[120_000][0].startswith("Fears for T N pension after talks") and rows[120_000][1] == 2


def test_lcg_order_is_a_permutation_matching_the_draw_rule():
    order = staicc._lcg_order(50)
    assert sorted(order) == list(range(50))
    x = (42 * 1664525 + 1013904223) % 2**32
    assert order[0] == int(x / 2**32 * 50)


def test_restricted_unpickler_refuses_globals(tmp_path):
    import io

    import collections

    blob = pickle.dumps([(["a"], 0), (["b"], collections.OrderedDict())])  # a class reference is a global
    with pytest.raises(pickle.UnpicklingError):
        staicc._ContainersOnly(io.BytesIO(blob)).load()


def test_offline_sources_give_all_six_tasks(data_dir):
    for name, spec in TASKS.items():
        src = load_source(spec, "offline", str(data_dir), "")
        assert src.train and all(0 <= r["label"] < len(spec.label_words) for r in src.train[:200])
        if name in ("sst5", "mr", "subj"):
            assert src.eval is None
        else:
            assert src.eval
    assert len(load_source(TASKS["cb"], "offline", str(data_dir), "").eval) == 56
    assert len(load_source(TASKS["sst2"], "offline", str(data_dir), "").eval) == 872


def test_split_is_seeded_and_holds_eval_out_of_demos(data_dir):
    spec = TASKS["mr"]
    src = load_source(spec, "offline", str(data_dir), "")
    a = split_task(spec, src, seed=1, k=32, eval_max=50)
    b = split_task(spec, src, seed=1, k=32, eval_max=10)
    c = split_task(spec, src, seed=2, k=32, eval_max=50)
    assert [r["id"] for r in a.demos] == [r["id"] for r in b.demos]  # the eval cap does not move demos
    assert [r["id"] for r in a.eval[:10]] == [r["id"] for r in b.eval]
    assert [r["id"] for r in a.demos] != [r["id"] for r in c.demos]
    assert [r["id"] for r in a.eval] == [r["id"] for r in c.eval]  # eval independent of the run seed
    held = {r["id"] for r in a.eval_full}
    assert len(a.eval_full) == spec.eval_size and not held & {r["id"] for r in a.demos}


def test_k_larger_than_pool(data_dir):
    spec = TASKS["cb"]
    src = load_source(spec, "offline", str(data_dir), "")
    with pytest.raises(UserError, match="data.k: 251"):
        split_task(spec, src, seed=1, k=251, eval_max=10)


def test_local_files_and_bad_rows(tmp_path):
    spec = get_task("cb")
    good = tmp_path / "cb" / "train.jsonl"
    good.parent.mkdir()
    good.write_text('{"premise": "It rained.", "hypothesis": "It was wet", "label": "entailment"}\n'
                    '{"premise": "It rained.", "hypothesis": "It was dry", "label": 1}\n')
    rows = read_table(spec, good)
    assert [r["label"] for r in rows] == [0, 1] and rows[1]["id"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{"premise": "a", "hyp\n')
    with pytest.raises(UserError, match=r"bad.jsonl: row 2 is not valid JSON"):
        read_table(spec, bad)
    badlabel = tmp_path / "badlabel.jsonl"
    badlabel.write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{"premise": "a", "hypothesis": "b", "label": 7}\n')
    with pytest.raises(UserError, match=r"badlabel.jsonl row 2: label 7"):
        read_table(spec, badlabel)
    csv = tmp_path / "sst2.csv"
    csv.write_text("text,label\ngreat film,Positive\nawful,0\n")
    assert [r["label"] for r in read_table(get_task("sst2"), csv)] == [1, 0]
    with pytest.raises(UserError, match="missing.jsonl not found"):
        read_table(spec, tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="unknown task 'imdb'"):
        get_task("imdb")


def test_empty_split(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="e.jsonl"):
        read_table(get_task("cb"), empty)


def test_hub_source_maps_columns_and_splits(monkeypatch):
    """The hub path with datasets.load_dataset answered locally (no hub here)."""
    import datasets

    calls = []

    def fake_load(path, name=None, split=None):
        calls.append((path, name, split))
        n = 3 if split == "train" else 2
        return datasets.Dataset.from_dict({"sentence": [f"{split} text {i}" for i in range(n)], "label": [0, 1, 1][:n],
                                           "idx": list(range(n))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    src = load_source(get_task("sst2"), "hub", "", "")
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert [r["text"] for r in src.eval] == ["validation text 0", "validation text 1"] and src.train[2]["label"] == 1
    assert src.description == "hub:glue/sst2"
