"""Bad input: one clear error line naming the culprit, exit 2, nothing written."""

import pytest

from conftest import run_cli


def base(tmp_path, data_dir):
    return ["run", "--model.name", "tiny-gpt2", "--data.tasks", "cb", "--data.eval_max", "2", "--data.k", "2",
            "--data.data_dir", str(data_dir), "--output.run_dir", str(tmp_path / "run"),
            "--output.report_dir", str(tmp_path / "reports")]


CASES = [
    (["--data.tasks", "imdb"], "data.tasks"),
    (["--model.name", "no-such-model-anywhere"], "unknown model 'no-such-model-anywhere'"),
    (["--data.k", "1000"], "data.k: 1000 is larger than task cb's demonstration pool"),
    (["--data.k", "-3"], "data.k"),
    (["--model.max_length", "40"], "model.max_length 40"),
    (["--eval.methods", "zsl,ft_full"], "eval.methods"),
    (["--finetune.lrs", "cb=-0.1"], "finetune.lrs"),
    (["--finetune.clip", "l3"], "finetune.clip"),
    (["--data.seeds", "1,1"], "data.seeds"),
    (["--data.data_dir", "/nonexistent"], "/nonexistent/cb/train.jsonl not found"),
    (["--data.source", "files", "--data.files_dir", "/nonexistent"], "/nonexistent/cb/train.jsonl"),
    (["--output.shard_mb", "0"], "output.shard_mb"),
    (["--eval.methods", "ft_lin", "--finetune.train", "all"], "trained module transformer.wte is not a linear projection"),
    (["--finetune.lc_clip_value", "0"], "finetune.lc_clip_value"),
    (["--finetune.deepspeed", "ds_configs/zero9.json"], "ds_configs/zero9.json not found"),
    (["--preset", "huge"], "option --preset: 'huge' is not one of paper, reference, smoke"),
    (["--suite.variants", "base,noisy"], "config field suite.variants: 'noisy'"),
    (["--suite.label_switch", "0"], "suite.label_switch"),
    (["--finetune.lr_grid", ""], "config field finetune.lr_grid: no learning-rate multiple"),
    (["--finetune.lr_grid", "0.1,-1"], "config field finetune.lr_grid: -1.0 must be a finite multiple > 0"),
    (["--finetune.lr_grid", "0.1,inf"], "config field finetune.lr_grid: 'inf' is not a finite number"),
    (["--finetune.lr_grid", "0.1,0"], "config field finetune.lr_grid: 0.0 must be"),
    (["--finetune.lr_dev_size", "0"], "config field finetune.lr_dev_size"),
    (["--eval.batch_size", "-1"], "config field eval.batch_size: -1 must be >= 1, or 0 (automatic)"),
    (["--eval.max_batch", "0"], "config field eval.max_batch: 0 must be >= 1"),
    (["--data.orders", "0"], "config field data.orders: 0 must be >= 1"),
    (["--finetune.clip_value", "nan"], "config field finetune.clip_value: 'nan' is not a finite number"),
    (["--finetune.lc_clip_value", "inf"], "config field finetune.lc_clip_value: 'inf' is not a finite number"),
    (["--output.shard_mb", "inf"], "config field output.shard_mb: 'inf' is not a finite number"),
    (["--finetune.lrs", "sst2=inf"], "config field finetune.lrs: 'sst2=inf' is not <task>=<finite learning rate > 0>"),
    (["--eval.calibration", "platt"], "config field eval.calibration"),
    (["--eval.methods", "ft", "--finetune.lr_search", "true", "--finetune.lr_dev_size", "100000"],
     "config field finetune.lr_dev_size: 100000 is larger than what task cb's train pool keeps"),
    (["--data.task_seeds", "imdb=1,2"], "config field data.task_seeds: unknown task 'imdb'"),
    (["--data.task_seeds", "cb=1,x"], "config field data.task_seeds: task cb"),
    (["--data.task_seeds", "cb"], "config field data.task_seeds: 'cb' is not"),
    (["--data.seeds", "-5"], "config field data.seeds: -5 must be >= 0"),
]


@pytest.mark.parametrize("extra, message", CASES)
def test_bad_option(tmp_path, data_dir, extra, message):
    r = run_cli(base(tmp_path, data_dir) + extra)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("icl-scale: error:") and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "reports").exists()


@pytest.mark.parametrize("extra, message", [
    (["--suite.variants", "untrained,shuffled"], "config field suite.variants: 'shuffled'"),
    (["--data.tasks", "sst2,imdb"], "data.tasks"),
])
def test_bad_suite_option(tmp_path, data_dir, extra, message):
    r = run_cli(["suite"] + base(tmp_path, data_dir)[1:] + extra)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "reports").exists()


def test_refused_resume_leaves_the_run_and_report_untouched(tmp_path, data_dir):
    r = run_cli(base(tmp_path, data_dir))
    assert r.returncode == 0, r.stderr
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts}
    r = run_cli(base(tmp_path, data_dir) + ["--data.k", "3"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "data.k differ" in lines[0], r.stderr
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "logs" not in p.parts}
    assert after == before


def test_malformed_data_file_names_row(tmp_path, data_dir):
    d = tmp_path / "files" / "cb"
    d.mkdir(parents=True)
    good = (data_dir / "cb" / "train.jsonl").read_text().splitlines()
    (d / "train.jsonl").write_text("\n".join(good[:5] + ['{"premise": "x", "hyp'] + good[5:]) + "\n")
    r = run_cli(base(tmp_path, data_dir) + ["--data.source", "files", "--data.files_dir", str(tmp_path / "files")])
    assert r.returncode == 2 and "train.jsonl: row 6 is not valid JSON" in r.stderr
    assert not (tmp_path / "run").exists()


def test_bad_config_file(tmp_path, data_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eval:\n  capture: three\n")
    r = run_cli(base(tmp_path, data_dir) + ["--config", str(cfg)])
    assert r.returncode == 2 and "config field eval.capture: 'three'" in r.stderr
    r = run_cli(base(tmp_path, data_dir) + ["--config", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2 and "missing.yaml: not found" in r.stderr


def test_report_of_a_non_run_dir(tmp_path):
    r = run_cli(["report", str(tmp_path)])
    assert r.returncode == 2 and "no config.json" in r.stderr


def cb_rows(data_dir, n=12) -> list[str]:
    return (data_dir / "cb" / "train.jsonl").read_text().splitlines()[:n]


# (file name, its bytes from the good CB rows, the message): written as <files>/cb/<name>
DATA_FILES = [
    ("train.jsonl", lambda g: ("\n".join(g[:3]) + "\n").encode() + b'{"premise": "\xff\xfe", "hypothesis": "x", '
     b'"label": 0}\n', "train.jsonl: line 4 is not UTF-8 (byte 0xff)"),
    ("train.jsonl", lambda g: "\n".join(g[:3] + [g[3].replace('"label": ', '"label": 1.5, "x": ')]).encode(),
     "train.jsonl row 4: label 1.5"),
    ("train.jsonl", lambda g: "\n".join(g[:2] + ['{"premise": "a", "hypothesis": "b", "label": true}']).encode(),
     "train.jsonl row 3: label True is a boolean"),
    ("train.csv", lambda g: b"premise,hypothesis,label\na,b,0\nc,d,1,extra\n", "train.csv: row 2 has 4 fields, the header 3"),
    ("train.csv", lambda g: b"premise,hypothesis,label\na,b,0.0\nc,d,2.5\n", "train.csv row 2: label 2.5"),
]


@pytest.mark.parametrize("name, content, message", DATA_FILES)
def test_bad_data_file_blames_its_row(tmp_path, data_dir, name, content, message):
    import json

    d = tmp_path / "files" / "cb"
    d.mkdir(parents=True)
    good = [json.dumps(json.loads(x) | {"label": json.loads(x)["label"]}) for x in cb_rows(data_dir)]
    (d / name).write_bytes(content(good))
    r = run_cli(base(tmp_path, data_dir) + ["--data.source", "files", "--data.files_dir", str(tmp_path / "files")])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_a_finetuning_demonstration_over_max_length_is_refused_in_the_plan(tmp_path, data_dir):
    import json

    d = tmp_path / "files" / "cb"
    d.mkdir(parents=True)
    rows = [json.loads(x) for x in cb_rows(data_dir, 40)]
    for r in rows[::2]:   # longer than max_length: never in the ICL prompt's fit, but finetune.demos all
        r["premise"] = " ".join(["word"] * 800)
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval.jsonl").write_text((data_dir / "cb" / "val.jsonl").read_text())
    args = base(tmp_path, data_dir) + ["--data.source", "files", "--data.files_dir", str(tmp_path / "files"),
                                       "--eval.methods", "zsl,icl,ft", "--finetune.demos", "all", "--data.k", "16",
                                       "--model.max_length", "2000"]
    r = run_cli(args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "finetuning demonstration id" in lines[0] and "over model.max_length 2000" in lines[0], r.stderr
    assert not (tmp_path / "run").exists()


def test_paths_are_checked_before_any_work(tmp_path, data_dir):
    (tmp_path / "afile").write_text("x")
    for field, value, message in [("--output.run_dir", "afile", "is a file, not a directory"),
                                  ("--output.run_dir", "afile/run", "is under a file"),
                                  ("--output.report_dir", "afile/reports", "is under a file")]:
        r = run_cli(base(tmp_path, data_dir) + [field, str(tmp_path / value)])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and f"config field {field[2:]}" in lines[0], r.stderr
        assert message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("body, message", [
    ({"zero_optimization": 3}, "zero_optimization must be a JSON object, not 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"devic": "cpu"}}},
     "zero_optimization.offload_optimizer.devic: Extra inputs are not permitted"),
    ({"bf16": {"enabled": "maybe"}}, "bf16.enabled"),
])
def test_nested_deepspeed_keys_are_validated_before_anything_is_written(tmp_path, data_dir, body, message):
    import json

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(body))
    r = run_cli(base(tmp_path, data_dir) + ["--eval.methods", "zsl,ft", "--finetune.deepspeed", str(ds)])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0] and str(ds) in lines[0], r.stderr
    assert not (tmp_path / "run").exists()
