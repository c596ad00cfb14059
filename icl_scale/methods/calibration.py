"""Calibrated scoring (`eval.calibration`): an ICL prompt can shift the label prior, which moves
accuracy and RPA without the model reading the input better. The content-free inputs of a mode
are scored after the same prefix (its KV cache reused) and their mean option distribution
p_cf is recorded per (task, setting, seed); the report divides it out: calibrated prediction =
argmax_i p_i / p_cf,i, p the option scores softmaxed over the options.

- contextual (Zhao et al. 2021): "N/A", "" and "[MASK]" in every input field of the template;
- domain (Fei et al. 2023): 20 inputs of random words drawn from the job's demonstration texts,
  each as long as a mean demonstration (seeded by the job's seed).
"""

from __future__ import annotations

import random

import numpy as np

CONTEXTUAL = ("N/A", "", "[MASK]")
DOMAIN_INPUTS = 20


def content_free_rows(spec, mode: str, demos: list[dict], seed: int) -> list[dict]:
    if mode == "contextual":
        return [{f: text for f in spec.fields} for text in CONTEXTUAL]
    words = [w for row in demos for f in spec.fields for w in str(row[f]).split()]
    if not words:
        return [{f: text for f in spec.fields} for text in CONTEXTUAL]
    length = max(1, round(len(words) / max(1, len(demos)) / len(spec.fields)))
    rng = random.Random(seed)
    return [{f: " ".join(rng.choice(words) for _ in range(length)) for f in spec.fields} for _ in range(DOMAIN_INPUTS)]


def option_distribution(scored) -> list[list[float]]:
    """Each scored input's option scores softmaxed over the options."""
    s = np.array([x.option_scores for x in scored], dtype=np.float64)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).tolist()


def calibration_record(model, cache, enc, rows: list[dict], mode: str, record: str) -> dict:
    from icl_scale.methods.evaluate import score_batch

    scored = [score_batch(model, cache, [enc.input_ids(r)], enc.options(), record, do_capture=False)[0] for r in rows]
    probs = option_distribution(scored)
    return {"mode": mode, "inputs": [enc.spec.format(r) for r in rows], "option_probs": probs,
            "mean": np.mean(probs, axis=0).tolist()}
