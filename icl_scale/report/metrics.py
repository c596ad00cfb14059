"""The study's metrics (DESIGN.md §2.7) as functions of per-example arrays. Pure numpy.

Predictions are int arrays [N] aligned by example id. Attention outputs are [N, L, d]; attention
maps are per example [L, H, n] (pre-softmax scores of the recording position over the query's own
tokens, which are the same tokens in every setting).
"""

from __future__ import annotations

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold)) if len(gold) else float("nan")


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def rec2ftp(zsl: np.ndarray, icl: np.ndarray, ft: np.ndarray, gold: np.ndarray) -> float:
    """|ZSL wrong ∧ FT right ∧ ICL right| / |ZSL wrong ∧ FT right| (Dai et al.)."""
    base = (zsl != gold) & (ft == gold)
    return _ratio(int((base & (icl == gold)).sum()), int(base.sum()))


def rpa(zsl: np.ndarray, icl: np.ndarray, ft: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Relative prediction alignment |D_ICL ∩ D_FT| / |D_ICL ∪ D_FT|, D_X the examples whose
    prediction X changed from ZSL; restricted to changes to the gold label (correct) and to a wrong
    label (incorrect); and the reference code's variant, whose intersection counts an example only
    when both changed it to the same label (same_label)."""
    d_icl, d_ft = icl != zsl, ft != zsl
    out = {}
    for name, keep_icl, keep_ft in (("all", d_icl, d_ft),
                                    ("correct", d_icl & (icl == gold), d_ft & (ft == gold)),
                                    ("incorrect", d_icl & (icl != gold), d_ft & (ft != gold))):
        out[name] = _ratio(int((keep_icl & keep_ft).sum()), int((keep_icl | keep_ft).sum()))
    out["same_label"] = _ratio(int((d_icl & d_ft & (icl == ft)).sum()), int((d_icl | d_ft).sum()))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n == 0, 1, n)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis; NaN where either side is zero (undefined: e.g. an ICL prompt
    that fitted no demonstration leaves no update), which the means over examples skip."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((na > 0) & (nb > 0), np.sum(a * b, axis=-1) / (na * nb), np.nan)


def simaou(h_zsl: np.ndarray, h_icl: np.ndarray, h_ft: np.ndarray) -> np.ndarray:
    """Per example and layer [N, L]: cos(ĥ_ICL − ĥ_ZSL, ĥ_FT − ĥ_ZSL), ĥ = h/‖h‖."""
    z = _unit(h_zsl.astype(np.float64))
    return cosine(_unit(h_icl.astype(np.float64)) - z, _unit(h_ft.astype(np.float64)) - z)


def random_updates(shape: tuple, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The random baseline's stand-in for the FT update: Uniform[0, 1) (the reference's) or a
    zero-mean Gaussian."""
    if kind == "uniform":
        return rng.random(shape)
    if kind == "gaussian":
        return rng.standard_normal(shape)
    raise ValueError(f"unknown random baseline {kind!r}")


def simaou_random(h_zsl: np.ndarray, h_icl: np.ndarray, r: np.ndarray) -> np.ndarray:
    """[N, L]: cos(ĥ_ICL − ĥ_ZSL, r) with r in place of the FT update."""
    return cosine(_unit(h_icl.astype(np.float64)) - _unit(h_zsl.astype(np.float64)), r)


def simam(m_a: list[np.ndarray], m_b: list[np.ndarray]) -> np.ndarray:
    """Per example and layer [N, L]: mean over heads of cos(m_a, m_b) over the query tokens."""
    return np.stack([cosine(a.astype(np.float64), b.astype(np.float64)).mean(axis=-1) for a, b in zip(m_a, m_b)])


def simam_delta(m_zsl: list[np.ndarray], m_icl: list[np.ndarray], m_ft: list[np.ndarray]) -> np.ndarray:
    """[N, L]: mean over heads of cos(m_ICL − m_ZSL, m_FT − m_ZSL)."""
    out = []
    for z, i, f in zip(m_zsl, m_icl, m_ft):
        z = z.astype(np.float64)
        out.append(cosine(i.astype(np.float64) - z, f.astype(np.float64) - z).mean(axis=-1))
    return np.stack(out)


def nanmean(x, axis=None):
    """Mean skipping NaN; NaN (no warning) where nothing is left."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.asarray(x, dtype=np.float64), axis=axis)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (std 0 for one seed)."""
    v = np.asarray([x for x in values if not np.isnan(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def bootstrap_ci(per_seed: list, stat, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean over seeds of `stat`, resampling each seed's examples with
    replacement. `per_seed`: one tuple of per-example arrays (same length) per seed; `stat` maps
    such a tuple to a number."""
    rng = np.random.default_rng(seed)
    draws = np.empty(n)
    for b in range(n):
        vals = []
        for arrays in per_seed:
            idx = rng.integers(0, len(arrays[0]), len(arrays[0]))
            vals.append(stat(tuple(a[idx] for a in arrays)))
        draws[b] = nanmean(vals)
    draws = draws[~np.isnan(draws)]
    if not len(draws):
        return float("nan"), float("nan")
    lo, hi = np.percentile(draws, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)
