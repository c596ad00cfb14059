import json
from pathlib import Path

from icl_scale.report.merge import merge_job
from icl_scale.runtime.rundir import job_dir, job_meta_path, load_run

ALL_KEYS = ("ids", "gold", "pred", "option_scores", "attn_out", "scores")


def run_records(run_dir: Path) -> dict:
    """{(task, setting, seed): merged records} of a finished run."""
    run = load_run(run_dir)
    cfg = run["config"]
    out = {}
    for task in cfg["data"]["tasks"]:
        for seed in cfg["data"]["seeds"]:
            meta = json.loads(job_meta_path(run_dir, task, seed).read_text())
            for setting in cfg["eval"]["methods"]:
                out[task, setting, seed] = merge_job(job_dir(run_dir, task, setting, seed), run["config_hash"],
                                                     meta["eval_ids"], ALL_KEYS)
    return out


def assert_same_records(a: dict, b: dict, atol=1e-5, rtol=1e-7):
    import numpy as np

    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        for k in ("ids", "gold", "pred"):
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{key} {k}")
        np.testing.assert_allclose(x["option_scores"], y["option_scores"], atol=atol, rtol=rtol, err_msg=str(key))
        np.testing.assert_allclose(x["attn_out"].astype("f4"), y["attn_out"].astype("f4"), atol=atol, rtol=rtol, err_msg=str(key))
        for s, t in zip(x["scores"], y["scores"]):
            np.testing.assert_allclose(s.astype("f4"), t.astype("f4"), atol=atol, rtol=rtol, err_msg=str(key))
