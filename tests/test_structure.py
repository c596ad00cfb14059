"""The report is a pure function of the run dir: building it needs neither torch nor the methods."""

import subprocess
import sys

from conftest import ROOT


def test_report_imports_neither_torch_nor_methods():
    code = ("import sys, icl_scale.report.render, icl_scale.report.analysis, icl_scale.report.plots; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'icl_scale.methods'))); "
            "print(' '.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"the report imports {r.stdout.strip() or r.stderr[-2000:]}"


def test_a_new_setting_is_one_registry_entry(tmp_path, data_dir, monkeypatch):
    """A setting added to settings.SETTINGS alone (here layer-causal FT clipped by the main clip
    fields) is a config choice, finetunes, is scored, and has its rows in every report table."""
    import json

    from icl_scale import config as C
    from icl_scale.run import run
    from icl_scale.settings import SETTINGS, Setting

    monkeypatch.setitem(SETTINGS, "ft_lc_l2", Setting("ft_lc_l2", "layer-causal FT (L2 at 1)", "zsl",
                                                      loss="layer_causal"))
    cfg = C.build({"model": {"name": "tiny-llama", "max_length": 1500},
                   "data": {"tasks": ["cb"], "k": 4, "eval_max": 3, "data_dir": str(data_dir)},
                   "eval": {"methods": ["zsl", "icl", "ft_lc_l2"]},
                   "finetune": {"clip": "global_l2", "clip_value": 1.0, "demos": "all"},
                   "output": {"run_dir": str(tmp_path / "run"), "report_dir": str(tmp_path / "reports")}})
    results = run(cfg)
    log = json.loads((tmp_path / "run/ft/cb/ft_lc_l2/seed1.json").read_text())
    assert log["method"] == "ft_lc_l2" and log["clip"] == "global_l2" and log["steps"] == 4
    assert "acc/ft_lc_l2" in {str(k) for k in results["tasks"]["cb"]["summary"]}
    text = (tmp_path / "reports/run/report.md").read_text()
    for row in ("| layer-causal FT (L2 at 1) accuracy |", "| RPA (layer-causal FT (L2 at 1)) |",
                "| SimAOU (layer-causal FT (L2 at 1)) |", "## SimAOU and SimAM: layer-causal FT (L2 at 1)",
                "| cb | 1 | layer-causal FT (L2 at 1) |"):
        assert row in text, row
