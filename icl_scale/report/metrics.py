"""The study's metrics (DESIGN.md §2.7) as functions of per-example arrays. Pure numpy.

Predictions are int arrays [N] aligned by example id. Attention outputs are [N, L, d]; attention
maps are per example [L, H, n] (pre-softmax scores of the recording position over the query's own
tokens, which are the same tokens in every setting).
"""

from __future__ import annotations

import math

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold)) if len(gold) else float("nan")


def option_probs(option_scores: np.ndarray) -> np.ndarray:
    """[N, n_options] option scores → the options' probabilities (softmax over the options);
    a row with a non-finite score is NaN."""
    s = np.asarray(option_scores, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(s - s.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    p[~np.isfinite(s).all(axis=1)] = np.nan
    return p


def calibrated(probs: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Predictions with the content-free option distribution divided out."""
    return np.argmax(probs / np.asarray(content_free, dtype=np.float64)[None], axis=1)


def ece(probs: np.ndarray, gold: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top option: |accuracy − confidence| over equal-width
    confidence bins, weighted by their share of examples (rows with NaN left out)."""
    ok = np.isfinite(probs).all(axis=1)
    probs, gold = probs[ok], np.asarray(gold)[ok]
    if not len(gold):
        return math.nan
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    which = np.minimum((conf * bins).astype(int), bins - 1)   # a confidence of exactly 1 in the top bin
    total = 0.0
    for b in range(bins):
        inb = which == b
        if inb.any():
            total += inb.mean() * abs((pred[inb] == gold[inb]).mean() - conf[inb].mean())
    return float(total)


def brier(probs: np.ndarray, gold: np.ndarray) -> float:
    """Mean over examples of Σ_options (p − one-hot(gold))² (rows with NaN left out)."""
    ok = np.isfinite(probs).all(axis=1)
    probs, gold = probs[ok], np.asarray(gold)[ok]
    if not len(gold):
        return math.nan
    onehot = np.eye(probs.shape[1])[gold]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def rec2ftp(zsl: np.ndarray, icl: np.ndarray, ft: np.ndarray, gold: np.ndarray) -> float:
    """|ZSL wrong ∧ FT right ∧ ICL right| / |ZSL wrong ∧ FT right| (Dai et al.)."""
    base = (zsl != gold) & (ft == gold)
    return _ratio(int((base & (icl == gold)).sum()), int(base.sum()))


def rpa(zsl: np.ndarray, icl: np.ndarray, ft: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Relative prediction alignment |D_ICL ∩ D_FT| / |D_ICL ∪ D_FT|, D_X the examples whose
    prediction X changed from ZSL; restricted to changes to the gold label (correct) and to a wrong
    label (incorrect); over the union, those both changed to the same label (same_label); and the
    reference code's ChangeRecall, same / (|D_ICL| + |D_FT| − same) with same = both changed to
    the same label (change_recall)."""
    d_icl, d_ft = icl != zsl, ft != zsl
    out = {}
    for name, keep_icl, keep_ft in (("all", d_icl, d_ft),
                                    ("correct", d_icl & (icl == gold), d_ft & (ft == gold)),
                                    ("incorrect", d_icl & (icl != gold), d_ft & (ft != gold))):
        out[name] = _ratio(int((keep_icl & keep_ft).sum()), int((keep_icl | keep_ft).sum()))
    same = int((d_icl & d_ft & (icl == ft)).sum())
    out["same_label"] = _ratio(same, int((d_icl | d_ft).sum()))
    out["change_recall"] = _ratio(same, int(d_icl.sum()) + int(d_ft.sum()) - same)
    return out


CHANGES = ("icl_only_correct", "icl_only_incorrect", "ft_only_correct", "ft_only_incorrect",
           "both_correct", "both_incorrect", "both_mixed")


def change_masks(zsl: np.ndarray, icl: np.ndarray, ft: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Per example: changed from ZSL by ICL only, FT only, or both, and whether the new predictions
    are correct (both: both correct, both wrong, or one of each); disjoint, one per CHANGES name."""
    d_icl, d_ft = icl != zsl, ft != zsl
    ok_icl, ok_ft = icl == gold, ft == gold
    return {"icl_only_correct": d_icl & ~d_ft & ok_icl, "icl_only_incorrect": d_icl & ~d_ft & ~ok_icl,
            "ft_only_correct": d_ft & ~d_icl & ok_ft, "ft_only_incorrect": d_ft & ~d_icl & ~ok_ft,
            "both_correct": d_icl & d_ft & ok_icl & ok_ft, "both_incorrect": d_icl & d_ft & ~ok_icl & ~ok_ft,
            "both_mixed": d_icl & d_ft & (ok_icl != ok_ft)}


def change_counts(zsl: np.ndarray, icl: np.ndarray, ft: np.ndarray, gold: np.ndarray) -> dict[str, int]:
    """How many examples fall in each of `change_masks`."""
    masks = change_masks(zsl, icl, ft, gold)
    return {k: int(masks[k].sum()) for k in CHANGES}


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


def simaou_parts(h_zsl: np.ndarray, h_icl: np.ndarray, h_ft: np.ndarray) -> dict[str, np.ndarray]:
    """SimAOU and what it is made of, per example and layer [N, L] (DESIGN.md §2.7.1):
    a = cos(h_ICL, h_ZSL), b = cos(h_FT, h_ZSL); floor = √((1−a)(1−b))/2, what SimAOU is when the
    updates share only their way off ĥ_ZSL; orth = the cosine of the updates' components
    orthogonal to ĥ_ZSL (ĥ_ICL − a·ĥ_ZSL and ĥ_FT − b·ĥ_ZSL in exact arithmetic; taken from the
    updates, so no update stays exactly zero, undefined)."""
    z = _unit(h_zsl.astype(np.float64))
    i, f = _unit(h_icl.astype(np.float64)), _unit(h_ft.astype(np.float64))
    a, b = np.sum(i * z, axis=-1), np.sum(f * z, axis=-1)
    return {"a": a, "b": b, "floor": np.sqrt(np.clip((1 - a) * (1 - b), 0, None)) / 2,
            "simaou": cosine(i - z, f - z), "orth": cosine(_orthogonal(i - z, z), _orthogonal(f - z, z))}


def _orthogonal(u: np.ndarray, z: np.ndarray) -> np.ndarray:
    """u's component orthogonal to the unit vector z; exactly zero where u is (no update)."""
    return u - np.sum(u * z, axis=-1, keepdims=True) * z


def simaou_pairs(h_zsl_i, h_icl_i, h_zsl_j, h_ft_j) -> dict[str, np.ndarray]:
    """[N, L]: SimAOU (shuffled) and orthogonal SimAOU (orth_shuffled) between the ICL update of
    example i and the FT update of another example j (row by row)."""
    zi, zj = _unit(h_zsl_i.astype(np.float64)), _unit(h_zsl_j.astype(np.float64))
    u, v = _unit(h_icl_i.astype(np.float64)) - zi, _unit(h_ft_j.astype(np.float64)) - zj
    return {"shuffled": cosine(u, v), "orth_shuffled": cosine(_orthogonal(u, zi), _orthogonal(v, zj))}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (one cycle through all n, Sattolo's algorithm);
    n < 2 has none: -1 there."""
    if n < 2:
        return np.full(n, -1)
    p = np.arange(n)
    for k in range(n - 1, 0, -1):
        j = int(rng.integers(0, k))
        p[k], p[j] = p[j], p[k]
    return p


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


def simaou_random_state(h_zsl: np.ndarray, h_icl: np.ndarray, h_rand: np.ndarray) -> np.ndarray:
    """[N, L]: the papers' text baseline, a random state in place of h_FT: cos(ĥ_ICL − ĥ_ZSL,
    ĥ_rand − ĥ_ZSL)."""
    z = _unit(h_zsl.astype(np.float64))
    return cosine(_unit(h_icl.astype(np.float64)) - z, _unit(h_rand.astype(np.float64)) - z)


MAP_VARIANTS = ("plain", "centred", "softmax")


def attention_map(m: np.ndarray, variant: str) -> np.ndarray:
    """Scores [.., H, n] as compared: plain (pre-softmax), centred (minus each head's mean over the
    query tokens, which softmax ignores) or softmax (the attention over the query tokens)."""
    m = m.astype(np.float64)
    if variant == "centred":
        return m - m.mean(axis=-1, keepdims=True)
    if variant == "softmax":
        e = np.exp(m - m.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return m


def map_cosines(m_a: list[np.ndarray], m_b: list[np.ndarray], m_zsl: list[np.ndarray] | None = None,
                variant: str = "plain") -> np.ndarray:
    """Per example, layer and head [N, L, H]: cos(m_a, m_b) over the query tokens, or with m_zsl
    cos(m_a − m_zsl, m_b − m_zsl); NaN where a side is zero (a head whose scores did not move)."""
    out = []
    for k, (a, b) in enumerate(zip(m_a, m_b)):
        a, b = attention_map(a, variant), attention_map(b, variant)
        if m_zsl is not None:
            z = attention_map(m_zsl[k], variant)
            a, b = a - z, b - z
        out.append(cosine(a, b))
    return np.stack(out)


def head_mean(cos: np.ndarray) -> np.ndarray:
    """[N, L, H] -> [N, L]: mean over heads, leaving out a head whose cosine is undefined."""
    return nanmean(cos, axis=-1)


def simam(m_a: list[np.ndarray], m_b: list[np.ndarray], variant: str = "plain") -> np.ndarray:
    """Per example and layer [N, L]: mean over heads of cos(m_a, m_b) over the query tokens."""
    return head_mean(map_cosines(m_a, m_b, None, variant))


def simam_delta(m_zsl: list[np.ndarray], m_icl: list[np.ndarray], m_ft: list[np.ndarray],
                variant: str = "plain") -> np.ndarray:
    """[N, L]: mean over heads of cos(m_ICL − m_ZSL, m_FT − m_ZSL)."""
    return head_mean(map_cosines(m_icl, m_ft, m_zsl, variant))


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


BOOTSTRAP = 1000   # resamples of every bootstrap interval


def bootstrap_ci(per_seed: list, stat, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
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


def diverged(log: dict) -> bool:
    """An FT run that did not learn: a non-finite loss (a skipped step) or a last loss above the first."""
    losses = log["losses"]
    if not losses or log.get("skipped") or not all(math.isfinite(x) for x in losses):
        return bool(losses)
    return losses[-1] > losses[0]
