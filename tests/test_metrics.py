"""The metrics of DESIGN.md §2.7: hand-worked cases, and the vectorised numpy code against a plain
loop-over-examples implementation of the formulas written from the definitions."""

import math

import numpy as np
import pytest

from icl_scale.report import metrics as M


def test_rpa_hand_worked_binary():
    gold = np.array([1, 1, 1, 0, 0])
    zsl = np.array([0, 0, 0, 0, 1])
    icl = np.array([1, 0, 1, 0, 1])   # changed: 0, 2
    ft = np.array([1, 1, 0, 0, 1])    # changed: 0, 1
    r = M.rpa(zsl, icl, ft, gold)
    assert r["all"] == pytest.approx(1 / 3)          # {0} / {0, 1, 2}
    assert r["correct"] == pytest.approx(1 / 3)      # all changes were to the gold label
    assert math.isnan(r["incorrect"])                # no change to a wrong label anywhere
    assert r["same_label"] == pytest.approx(1 / 3)


def test_rpa_hand_worked_multiclass_and_same_label_variant():
    gold = np.array([1, 1, 1])
    zsl = np.array([0, 0, 0])
    icl = np.array([1, 2, 0])   # changed: 0 (to correct), 1 (to wrong 2)
    ft = np.array([2, 2, 1])    # changed: 0 (wrong 2), 1 (wrong 2), 2 (correct)
    r = M.rpa(zsl, icl, ft, gold)
    assert r["all"] == pytest.approx(2 / 3)
    assert r["same_label"] == pytest.approx(1 / 3)   # only example 1 changed to the same label in both
    assert r["correct"] == 0.0                       # {0} vs {2}
    assert r["incorrect"] == pytest.approx(1 / 2)    # {1} vs {0, 1}


def test_rec2ftp_and_accuracy_hand_worked():
    gold = np.array([1, 1, 1, 0])
    zsl = np.array([0, 0, 1, 1])   # wrong: 0, 1, 3
    ft = np.array([1, 1, 1, 1])    # right among those: 0, 1
    icl = np.array([1, 0, 0, 0])   # right among those: 0
    assert M.rec2ftp(zsl, icl, ft, gold) == pytest.approx(1 / 2)
    assert M.accuracy(ft, gold) == pytest.approx(3 / 4)
    assert math.isnan(M.rec2ftp(gold, icl, ft, gold))   # ZSL never wrong: undefined, not 0


def test_simaou_and_simam_hand_worked():
    z, i = np.array([[[1.0, 0.0]]]), np.array([[[0.0, 1.0]]])
    assert M.simaou(z, i, np.array([[[0.0, 2.0]]]))[0, 0] == pytest.approx(1.0)    # same update, FT scaled
    assert np.isnan(M.simaou(z, i, np.array([[[3.0, 0.0]]]))[0, 0])                # FT did not move ĥ: undefined
    assert M.simaou(z, i, np.array([[[1.0, -1.0]]]))[0, 0] == pytest.approx(
        np.dot([-1, 1], [1 / 2**.5 - 1, -1 / 2**.5]) / (2**.5 * np.linalg.norm([1 / 2**.5 - 1, -1 / 2**.5])))
    a = [np.array([[[1.0, 0.0], [1.0, 1.0]]])]   # [L=1, H=2, n=2]
    b = [np.array([[[0.0, 1.0], [2.0, 2.0]]])]
    assert M.simam(a, b)[0, 0] == pytest.approx(0.5)   # heads: 0 and 1
    zero = [np.zeros((1, 2, 2))]
    assert M.simam_delta(zero, a, b)[0, 0] == pytest.approx(0.5)   # ZSL at 0: Δ equals the maps themselves


# ---- the same formulas, written independently: plain loops over examples ---------------------

def _cos(u, v):
    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
    return float("nan") if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv)


def _norm(u):
    n = math.sqrt(sum(x * x for x in u))
    return [x / n for x in u]


def loop_rpa(zsl, icl, ft, gold):
    out = {}
    for name, keep in (("all", lambda p, g: True), ("correct", lambda p, g: p == g), ("incorrect", lambda p, g: p != g)):
        a = {k for k in range(len(gold)) if icl[k] != zsl[k] and keep(icl[k], gold[k])}
        b = {k for k in range(len(gold)) if ft[k] != zsl[k] and keep(ft[k], gold[k])}
        out[name] = len(a & b) / len(a | b) if a | b else float("nan")
    a = {k for k in range(len(gold)) if icl[k] != zsl[k]}
    b = {k for k in range(len(gold)) if ft[k] != zsl[k]}
    out["same_label"] = len({k for k in a & b if icl[k] == ft[k]}) / len(a | b) if a | b else float("nan")
    return out


def test_vectorised_metrics_match_loops_on_random_data():
    rng = np.random.default_rng(7)
    n, L, d, H = 40, 3, 8, 2
    gold, zsl, icl, ft = (rng.integers(0, 3, n) for _ in range(4))
    got, want = M.rpa(zsl, icl, ft, gold), loop_rpa(zsl, icl, ft, gold)
    for k in want:
        assert got[k] == pytest.approx(want[k], nan_ok=True)
    base = [k for k in range(n) if zsl[k] != gold[k] and ft[k] == gold[k]]
    assert M.rec2ftp(zsl, icl, ft, gold) == pytest.approx(sum(icl[k] == gold[k] for k in base) / len(base))

    hz, hi, hf = (rng.standard_normal((n, L, d)) for _ in range(3))
    sim = M.simaou(hz, hi, hf)
    r = M.random_updates((n, L, d), "gaussian", np.random.default_rng(0))
    rnd = M.simaou_random(hz, hi, r)
    for k in range(n):
        for layer in range(L):
            z, i, f = _norm(hz[k, layer]), _norm(hi[k, layer]), _norm(hf[k, layer])
            du = [b - a for a, b in zip(z, i)]
            assert sim[k, layer] == pytest.approx(_cos(du, [b - a for a, b in zip(z, f)]), abs=1e-12)
            assert rnd[k, layer] == pytest.approx(_cos(du, r[k, layer]), abs=1e-12)

    keys = rng.integers(2, 6, n)
    mz, mi, mf = ([rng.standard_normal((L, H, int(t))) for t in keys] for _ in range(3))
    before, after, delta = M.simam(mi, mz), M.simam(mi, mf), M.simam_delta(mz, mi, mf)
    for k in range(n):
        for layer in range(L):
            heads = range(H)
            assert before[k, layer] == pytest.approx(sum(_cos(mi[k][layer, h], mz[k][layer, h]) for h in heads) / H)
            assert after[k, layer] == pytest.approx(sum(_cos(mi[k][layer, h], mf[k][layer, h]) for h in heads) / H)
            want = sum(_cos(mi[k][layer, h] - mz[k][layer, h], mf[k][layer, h] - mz[k][layer, h]) for h in heads) / H
            assert delta[k, layer] == pytest.approx(want)


def test_random_baselines_are_seeded_and_shaped():
    a = M.random_updates((4, 3), "uniform", np.random.default_rng(1))
    b = M.random_updates((4, 3), "uniform", np.random.default_rng(1))
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() < 1
    g = M.random_updates((20000,), "gaussian", np.random.default_rng(2))
    assert abs(g.mean()) < 0.03 and abs(g.std() - 1) < 0.03
    with pytest.raises(ValueError):
        M.random_updates((2,), "cauchy", np.random.default_rng(0))


def test_mean_std_and_bootstrap():
    assert M.mean_std([0.5]) == (0.5, 0.0)
    mean, std = M.mean_std([0.2, 0.4, 0.9])
    assert mean == pytest.approx(0.5) and std == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    const = [(np.ones(50),), (np.ones(30),)]
    assert M.bootstrap_ci(const, lambda a: float(a[0].mean())) == (1.0, 1.0)
    # accuracy 0.5 on 400 examples: the 95% interval is about ±1.96·√(.25/400) = ±0.049
    hits = (np.arange(400) % 2 == 0).astype(float)
    lo, hi = M.bootstrap_ci([(hits,)], lambda a: float(a[0].mean()), n=2000)
    assert lo < 0.5 < hi and 0.07 < hi - lo < 0.13
    assert M.bootstrap_ci([(hits,)], lambda a: float(a[0].mean()), seed=3) == \
        M.bootstrap_ci([(hits,)], lambda a: float(a[0].mean()), seed=3)
