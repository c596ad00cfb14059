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


# ---- what SimAOU is made of, and the robust SimAM ---------------------------------------------

def test_change_recall_is_the_reference_formula():
    zsl = np.array([0, 0, 0, 0, 0])
    icl = np.array([1, 2, 0, 1, 0])   # changed: 0, 1, 3
    ft = np.array([1, 1, 1, 0, 0])    # changed: 0, 1, 2; the same new label: example 0 only
    same, n_icl, n_ft = 1, 3, 3
    assert M.rpa(zsl, icl, ft, zsl)["change_recall"] == pytest.approx(same / (n_icl + n_ft - same))
    assert M.rpa(zsl, icl, ft, zsl)["same_label"] == pytest.approx(1 / 4)   # over the union of 4


def test_unrelated_updates_give_simaou_at_the_floor_and_no_excess():
    """Two updates that share only their way off ĥ_ZSL: SimAOU ≈ √((1−a)(1−b))/2 ≈ shuffled pairs.
    (Shuffled pairs carry the floor through the direction ĥ_ZSL shares across examples, as a
    language model's attention outputs do: here one direction plus a little noise.)"""
    rng = np.random.default_rng(0)
    n, d = 400, 512
    z = rng.standard_normal((1, 1, d)) + 0.05 * rng.standard_normal((n, 1, d))
    i = 0.3 * z + rng.standard_normal((n, 1, d)) * np.linalg.norm(z, axis=-1, keepdims=True) / d ** .5
    f = 0.3 * z + rng.standard_normal((n, 1, d)) * np.linalg.norm(z, axis=-1, keepdims=True) / d ** .5
    parts = M.simaou_parts(z, i, f)
    perm = M.derangement(n, np.random.default_rng(1))
    pairs = M.simaou_pairs(z, i, z[perm], f[perm])
    assert parts["simaou"].mean() == pytest.approx(parts["floor"].mean(), abs=0.02)
    assert parts["simaou"].mean() - pairs["shuffled"].mean() == pytest.approx(0, abs=0.02)
    assert abs(parts["orth"].mean()) < 0.02
    # a = cos(h_ICL, h_ZSL) written out
    zz, ii = z[:, 0], i[:, 0]
    assert parts["a"][:, 0] == pytest.approx((zz * ii).sum(1) / np.linalg.norm(zz, axis=1) / np.linalg.norm(ii, axis=1))


def test_identical_updates_give_orthogonal_simaou_one():
    rng = np.random.default_rng(2)
    z, i = rng.standard_normal((5, 3, 16)), rng.standard_normal((5, 3, 16))
    parts = M.simaou_parts(z, i, 2.5 * i)   # the same direction: ĥ_FT = ĥ_ICL
    assert parts["orth"] == pytest.approx(np.ones((5, 3)))
    assert parts["simaou"] == pytest.approx(np.ones((5, 3)))


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 10, 101):
        p = M.derangement(n, np.random.default_rng(n))
        assert sorted(p) == list(range(n)) and not (p == np.arange(n)).any()
    assert M.derangement(1, np.random.default_rng(0)).tolist() == [-1]


def test_an_offset_shared_across_keys_moves_plain_simam_only():
    rng = np.random.default_rng(3)
    a = [rng.standard_normal((2, 4, 7)) for _ in range(3)]   # [L, H, n] per example
    b = [x + rng.standard_normal(x.shape) * 0.3 for x in a]
    shifted = [x + rng.standard_normal((2, 4, 1)) * 5 for x in b]   # a constant per head
    for variant in ("centred", "softmax"):
        assert M.simam(a, shifted, variant) == pytest.approx(M.simam(a, b, variant), abs=1e-12)
    assert not np.allclose(M.simam(a, shifted), M.simam(a, b))


def test_robust_simam_against_loops_and_a_zero_head_drops_only_that_head():
    rng = np.random.default_rng(4)
    z, i, f = ([rng.standard_normal((2, 3, 5)) for _ in range(2)] for _ in range(3))
    f[0][1, 2] = z[0][1, 2]   # example 0, layer 1, head 2: FT left this head's scores exactly as ZSL's

    def maps(m, variant):
        if variant == "centred":
            return m - m.mean()
        if variant == "softmax":
            return np.exp(m) / np.exp(m).sum()
        return m

    for variant in ("plain", "centred", "softmax"):
        got = M.simam_delta(z, i, f, variant)
        for e in range(2):
            for layer in range(2):
                cos = []
                for h in range(3):
                    x = maps(i[e][layer, h], variant) - maps(z[e][layer, h], variant)
                    y = maps(f[e][layer, h], variant) - maps(z[e][layer, h], variant)
                    if np.linalg.norm(x) > 0 and np.linalg.norm(y) > 0:
                        cos.append(x @ y / np.linalg.norm(x) / np.linalg.norm(y))
                assert got[e, layer] == pytest.approx(np.mean(cos), abs=1e-12)
                assert len(cos) == (2 if (e, layer) == (0, 1) else 3)


def test_change_counts_against_a_loop():
    rng = np.random.default_rng(5)
    zsl, icl, ft, gold = (rng.integers(0, 3, 200) for _ in range(4))
    want = dict.fromkeys(M.CHANGES, 0)
    for z, i, f, g in zip(zsl, icl, ft, gold):
        if i != z and f == z:
            want["icl_only_correct" if i == g else "icl_only_incorrect"] += 1
        elif f != z and i == z:
            want["ft_only_correct" if f == g else "ft_only_incorrect"] += 1
        elif i != z and f != z:
            right = int(i == g) + int(f == g)
            want[{2: "both_correct", 0: "both_incorrect", 1: "both_mixed"}[right]] += 1
    got = M.change_counts(zsl, icl, ft, gold)
    assert got == want and sum(got.values()) == int(((icl != zsl) | (ft != zsl)).sum())
    both = got["both_correct"] + got["both_incorrect"] + got["both_mixed"]
    assert M.rpa(zsl, icl, ft, gold)["all"] == pytest.approx(both / sum(got.values()))
