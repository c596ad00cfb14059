"""Learner baselines: kNN against a plain loop, logistic regression at the optimum of its stated
objective (gradient written out in numpy), and a run whose agreement figures equal a
recomputation from its shards and learner records, the same on one and two processes."""

import json

import numpy as np
import pytest

from conftest import launch, run_cli
from helpers import run_records
from icl_scale.methods.learners import knn_predict, logreg_fit, logreg_predict


def test_knn_against_a_plain_loop():
    rng = np.random.default_rng(0)
    train, labels, test = rng.normal(size=(12, 5)), rng.integers(0, 3, 12), rng.normal(size=(30, 5))
    want = []
    for t in test:
        sims = [(float(t @ x / np.linalg.norm(t) / np.linalg.norm(x)), i) for i, x in enumerate(train)]
        near = [i for _, i in sorted(sims, key=lambda s: -s[0])[:5]]
        counts = {c: sum(labels[i] == c for i in near) for c in set(labels[near])}
        best = max(counts.values())
        want.append(next(int(labels[i]) for i in near if counts[labels[i]] == best))
    assert knn_predict(train, labels, test).tolist() == want
    assert knn_predict(train[:2], labels[:2], test).shape == (30,)   # fewer demonstrations than k


def test_logistic_regression_is_at_its_objective_optimum():
    rng = np.random.default_rng(1)
    train, labels = rng.normal(size=(20, 4)) + np.repeat(np.eye(4)[:2] * 2, 10, 0), np.repeat([0, 1], 10)
    w, b, mu, sd = logreg_fit(train, labels, 3)   # a class without demonstrations, too
    x = (train - mu) / sd
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[labels]
    grad_w = x.T @ (p - onehot) / len(x) + w / len(x)
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6
    assert (logreg_predict(train, labels, train, 3) == labels).mean() >= 0.9


def test_learner_agreement_against_the_records_on_one_and_two_processes(tmp_path, data_dir):
    merged = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        args = ["run", "--model.name", "tiny-llama", "--data.tasks", "sst2,cb", "--data.k", "8", "--data.eval_max", "7",
                "--eval.methods", "zsl,icl,ft", "--eval.learners", "true", "--model.max_length", "1500",
                "--data.data_dir", str(data_dir), "--output.run_dir", str(out / "run"),
                "--output.report_dir", str(out / "reports")]
        r = launch(args, nproc=nproc) if nproc > 1 else run_cli(args)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert len(list((out / "run/learners/cb").glob("seed1-r*.json"))) == nproc   # each rank its share
        results = json.loads((out / "reports/run/results.json").read_text())
        records = run_records(out / "run")
        for task in ("sst2", "cb"):
            learned = {}
            for p in (out / f"run/learners/{task}").glob("seed1-r*.json"):
                rec = json.loads(p.read_text())
                for name in ("knn", "logreg"):
                    learned.setdefault(name, {}).update(zip(rec["ids"], rec[name]))
            merged[nproc, task] = learned
            icl = records[task, "icl", 1]
            got = results["tasks"][task]["seeds"]["1"]["learners"]
            for name in ("knn", "logreg"):
                pred = np.array([learned[name][i] for i in icl["ids"].tolist()])
                assert got["acc"][name] == pytest.approx(float((pred == icl["gold"]).mean()))
                assert got["agree"][name] == pytest.approx(float((pred == icl["pred"]).mean()))
            assert got["agree"]["ft"] == pytest.approx(float((records[task, "ft", 1]["pred"] == icl["pred"]).mean()))
    for task in ("sst2", "cb"):   # the world size changes nothing
        assert merged[1, task] == merged[2, task]
