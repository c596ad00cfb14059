"""The demonstration-order control (data.orders): seeded permutations of the same demonstrations,
the same for ICL and FT; the report's spread over orders against a recomputation from the shards."""

import json

import numpy as np
import pytest

from conftest import run_cli
from helpers import merge_job
from icl_scale import config as C
from icl_scale.modeling.load import load_model
from icl_scale.plan import plan


def test_orders_permute_the_same_demonstrations_for_icl_and_ft(data_dir):
    cfg = C.build({"data": {"tasks": ["sst2", "cb"], "k": 6, "seeds": [1, 2], "orders": 3, "eval_max": 4,
                            "data_dir": str(data_dir)}, "eval": {"methods": ["zsl", "icl", "ft", "ft_lin"]}})
    _, tok = load_model("tiny-llama")
    jobs = plan(cfg, tok, 2048)
    again = plan(cfg, tok, 2048)
    assert len(jobs) == 2 * 2 * 3
    for job, twin in zip(jobs, again):   # seeded: the same plan twice
        assert job.key == twin.key and job.prompts["icl"].demo_ids == twin.prompts["icl"].demo_ids
    for task in ("sst2", "cb"):
        for seed in (1, 2):
            group = [j for j in jobs if j.task == task and j.seed == seed]
            base = group[0]
            assert [j.order for j in group] == [0, 1, 2] and [j.key for j in group] == [f"{seed}", f"{seed}o1",
                                                                                        f"{seed}o2"]
            orders = []
            for j in group:
                demos = list(j.prompts["icl"].demo_ids)
                assert sorted(demos) == sorted(base.prompts["icl"].demo_ids)        # the same demonstrations
                assert [r["id"] for r in j.ft_rows] == demos                        # FT in the ICL order
                assert len(j.prompts["icl"].prefix_ids) == len(base.prompts["icl"].prefix_ids)
                assert [r["id"] for r in j.eval_rows] == [r["id"] for r in base.eval_rows]
                orders.append(tuple(demos))
            assert len(set(orders)) == 3 or len(base.prompts["icl"].demo_ids) < 3
            assert "zsl" not in group[1].prompts and set(group[1].prompts) == {"icl", "ft", "ft_lin"}


def test_order_spread_against_the_records(tmp_path, data_dir):
    r = run_cli(["run", "--model.name", "tiny-llama", "--data.tasks", "sst2", "--data.k", "6", "--data.seeds", "1,2",
                 "--data.orders", "3", "--data.eval_max", "8", "--eval.methods", "zsl,icl,ft",
                 "--model.max_length", "1500", "--data.data_dir", str(data_dir),
                 "--output.run_dir", str(tmp_path / "run"), "--output.report_dir", str(tmp_path / "reports")])
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "reports/run/results.json").read_text())
    h = results["config_hash"]
    got = results["tasks"]["sst2"]["orders"]
    for setting in ("icl", "ft"):
        spreads, firsts = [], []
        for seed in (1, 2):
            ids = json.loads((tmp_path / f"run/jobs/sst2/seed{seed}.json").read_text())["eval_ids"]
            accs = []
            for key in (f"{seed}", f"{seed}o1", f"{seed}o2"):
                rec = merge_job(tmp_path / f"run/shards/sst2/{setting}/seed{key}", h, ids)
                accs.append(float((rec["pred"] == rec["gold"]).mean()))
            assert got[f"acc/{setting}"]["per_seed"][str(seed)] == pytest.approx(accs)
            spreads.append(np.std(accs, ddof=1))
            firsts.append(accs[0])
        assert got[f"acc/{setting}"]["std_over_orders"] == pytest.approx(np.mean(spreads))
        assert got[f"acc/{setting}"]["std_over_draws"] == pytest.approx(np.std(firsts, ddof=1))
    assert "## Demonstration order" in (tmp_path / "reports/run/report.md").read_text()
