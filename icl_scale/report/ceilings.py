"""Noise ceilings (DESIGN.md §2.7.1): how alike two updates of the *same* method are, from the seeds
already run. For every pair of seeds s < s′ whose eval sets are the same examples: SimAOU, SimAM
and SimAM_Δ between ICL with demonstration draw s and ICL with draw s′, and between an FT setting
after draw s and after draw s′. Shown beside ICL vs FT: a similarity is high only next to these.
"""

from __future__ import annotations

import numpy as np

from icl_scale.report import metrics as M
from icl_scale.report.keys import Key
from icl_scale.report.merge import JobRecords
from icl_scale.settings import SETTINGS


def ceilings(recs: dict[int, dict[str, JobRecords]], metas: dict[int, dict]) -> dict:
    """Noise ceilings from the seeds run (`recs`: per seed, the records of the settings that did not
    fail): SimAOU, SimAM and SimAM_Δ between the updates of one method after two demonstration draws
    s < s′ (ICL vs ICL, FT vs FT), for the same examples. Per key: mean over pairs, std over pairs,
    bootstrap interval over examples, the value of each pair."""
    seeds = list(recs)
    pairs = [(s, t) for k, s in enumerate(seeds) for t in seeds[k + 1:] if metas[s]["eval_ids"] == metas[t]["eval_ids"]]
    per_pair: dict[Key, list] = {}
    for s, t in pairs:
        both = [m for m in recs[s] if m in recs[t] and (m == "icl" or SETTINGS[m].finetunes)]
        if "zsl" not in recs[s] or not both:
            continue
        zsl = recs[s]["zsl"]
        if not zsl.has_capture():
            return {}
        pair = {m: (recs[s][m], recs[t][m]) for m in both}
        vals: dict[Key, list] = {}
        for chunk in zsl.chunks():
            h_z, m_z = zsl.large(chunk)
            for m, (a, b) in pair.items():
                (h_a, m_a), (h_b, m_b) = a.large(chunk), b.large(chunk)
                for key, v in ((Key("ceiling", m), M.simaou(h_z, h_a, h_b)), (Key("ceiling_simam", m), M.simam(m_a, m_b)),
                               (Key("ceiling_simam_delta", m), M.simam_delta(m_z, m_a, m_b))):
                    vals.setdefault(key, []).append(v)
        for key, parts in vals.items():
            per_pair.setdefault(key, []).append((f"{s}-{t}", np.concatenate(parts)))
        for r in [zsl, *(x for ab in pair.values() for x in ab)]:
            r.release()
    out = {}
    for key, items in per_pair.items():
        values = [float(M.nanmean(v)) for _, v in items]
        mean, std = M.mean_std(values)
        ci = M.bootstrap_ci([(M.nanmean(v, axis=1),) for _, v in items], lambda a: float(M.nanmean(a[0])))
        out[key] = {"mean": mean, "std": std, "ci": list(ci), "per_seed": values, "seeds": [p for p, _ in items],
                    "layers": M.nanmean(np.stack([v for _, v in items]), axis=(0, 1)).tolist()}
    return out
