import pytest

from icl_scale import config as C
from icl_scale.cli import build_parser
from icl_scale.errors import UserError


def test_defaults_resolve_and_overrides_coerce():
    cfg = C.build({"data": {"k": 8}}, {"data.tasks": "sst2,cb", "data.seeds": "1,2", "eval.capture": "false"})
    assert cfg.data.k == 8 and cfg.data.tasks == ("sst2", "cb") and cfg.data.seeds == (1, 2)
    assert cfg.eval.capture is False and cfg.model.name == "smollm2-135m"


def test_hash_covers_result_fields_only():
    base = C.build()
    assert C.config_hash(C.build(overrides={"output.run_dir": "elsewhere", "output.shard_mb": 1})) == C.config_hash(base)
    changed = C.build(overrides={"data.k": 4})
    assert C.config_hash(changed) != C.config_hash(base)
    assert C.diff_fields(C.result_dict(base), C.result_dict(changed)) == ["data.k"]


@pytest.mark.parametrize("overrides, culprit", [
    ({"data.tasks": "sst2,imdb"}, "data.tasks"),
    ({"data.k": "many"}, "data.k"),
    ({"data.k": -1}, "data.k"),
    ({"data.eval_max": 0}, "data.eval_max"),
    ({"eval.record_position": "middle"}, "eval.record_position"),
    ({"eval.capture": "maybe"}, "eval.capture"),
    ({"data.task_sources": "cb=ftp"}, "data.task_sources"),
    ({"model.nope": 1}, "model.nope"),
])
def test_invalid_values_name_the_field(overrides, culprit):
    with pytest.raises(UserError, match=culprit.replace(".", r"\.")):
        C.build(overrides=overrides)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2")
    with pytest.raises(UserError, match="bad.yaml"):
        C.load(str(bad))
    unknown = tmp_path / "u.yaml"
    unknown.write_text("dataa:\n  k: 2\n")
    with pytest.raises(UserError, match="unknown section 'dataa'"):
        C.load(str(unknown))


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for name, _, _ in C.leaves():
        assert f"--{name}" in text


def test_task_seeds_from_a_string_or_a_mapping():
    a = C.build(overrides={"data.task_seeds": " sst2=2, 3,4 ; cb=5", "data.seeds": "1,2"})
    b = C.build({"data": {"task_seeds": {"sst2": [2, 3, 4], "cb": 5}, "seeds": [1, 2]}})
    assert a.data.task_seeds == b.data.task_seeds == "sst2=2,3,4;cb=5"
    assert C.config_hash(a) == C.config_hash(b)
    assert C.seeds_for(a, "sst2") == (2, 3, 4) and C.seeds_for(a, "cb") == (5,) and C.seeds_for(a, "mr") == (1, 2)
    assert C.describe_seeds(C.build(overrides={"data.tasks": "sst2,mr", "data.task_seeds": "sst2=2"})) == "sst2 2; mr 1"
    for bad in ("sst2=1,1", "sst2=", "sst2=-1", "sst2=1.5", "imdb=1", {"sst2": "x"}):
        with pytest.raises(UserError, match="data.task_seeds"):
            C.build(overrides={"data.task_seeds": bad})
