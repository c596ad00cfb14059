"""The study's results from a run dir: every metric of DESIGN.md §2.7 per task, seed and layer, and
over seeds (mean ± std, bootstrap 95% interval over examples). A pure function of the run dir.

Attention outputs and maps are streamed shard by shard (report/merge.py); what stays in memory is
per example and layer: a few floats each.

The similarity results (each [examples, layers], and its mean over layers), by key (report/keys.py):
    simaou/<ft setting>         cos(ĥ_ICL − ĥ_ZSL, ĥ_FT − ĥ_ZSL)
    simaou/random_<kind>        the same with a seeded random vector as the FT update
    simam/zsl                   cos(m_ICL, m_ZSL): before FT (Dai et al.)
    simam/<ft setting>          cos(m_ICL, m_FT): after FT
    simam_delta/<ft setting>    cos(m_ICL − m_ZSL, m_FT − m_ZSL)

Results are keyed by `Key` in memory (results.json writes them out as strings).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from icl_scale import config as C
from icl_scale.report import metrics as M
from icl_scale.report.ceilings import ceilings
from icl_scale.report.keys import LEARNERS, RPA_LABELS, Key
from icl_scale.report.merge import JobRecords
from icl_scale.runtime import rundir
from icl_scale.settings import ft_settings

RANDOM_KINDS = ("uniform", "gaussian", "state")   # state: a random h in place of h_FT (the papers' text)
SHUFFLE_STREAM = len(RANDOM_KINDS)


def random_update(task: str, seed: int, example_id: int, kind: str, shape: tuple) -> np.ndarray:
    """The random baseline's vector for one example: seeded by (task, seed, id, kind), so it does
    not depend on how the examples were spread over ranks or shards."""
    rng = np.random.default_rng([zlib.crc32(task.encode()), seed, example_id, RANDOM_KINDS.index(kind)])
    return M.random_updates(shape, "gaussian" if kind == "state" else kind, rng)


def shuffled_partners(task: str, seed: int, ids: list[int]) -> dict[int, int]:
    """{example id: the id whose FT update it is paired with}, a seeded derangement of the job's
    examples (sorted by id, so it does not depend on ranks or shards); empty below two examples."""
    perm = M.derangement(len(ids), np.random.default_rng([zlib.crc32(task.encode()), seed, SHUFFLE_STREAM]))
    return {i: ids[int(p)] for i, p in zip(ids, perm) if p >= 0}


def _map_figures(m_z, m_i, data, ft, heads: dict) -> dict[Key, np.ndarray]:
    """SimAM before FT, after each FT setting and Δ, plain, centred and post-softmax; counts the
    heads left out of each head mean into `heads`."""
    vals = {}
    for variant in M.MAP_VARIANTS:
        v = "" if variant == "plain" else variant
        pairs = [(Key("simam", "zsl", v), m_i, m_z, None)]
        for f in ft:
            pairs += [(Key("simam", f, v), m_i, data[f][1], None), (Key("simam_delta", f, v), m_i, data[f][1], m_z)]
        for key, a, b, z in pairs:
            cos = M.map_cosines(a, b, z, variant)
            k, n = heads.get(key, (0, 0))
            heads[key] = (k + int(np.isnan(cos).sum()), n + cos.size)
            vals[key] = M.head_mean(cos)
    return vals


def similarities(recs: dict[str, JobRecords], ft: list[str], task: str, seed: int) -> tuple[dict, dict]:
    """Every similarity result of one job, [examples sorted by id, layers]; and per SimAM figure
    (heads left out, heads)."""
    ids = recs["zsl"].ids
    row = {i: k for k, i in enumerate(ids)}
    partner = shuffled_partners(task, seed, ids)
    out: dict[Key, np.ndarray] = {}
    heads: dict[Key, tuple[int, int]] = {}
    for chunk in recs["zsl"].chunks():
        data = {s: r.large(chunk) for s, r in recs.items()}
        (h_z, m_z), (h_i, m_i) = data["zsl"], data["icl"]
        vals = _map_figures(m_z, m_i, data, ft, heads)
        for kind in RANDOM_KINDS:
            r = np.stack([random_update(task, seed, i, kind, h_z.shape[1:]) for i in chunk])
            vals[Key("simaou", f"random_{kind}")] = (M.simaou_random_state(h_z, h_i, r) if kind == "state"
                                                     else M.simaou_random(h_z, h_i, r))
        paired = [i for i in chunk if i in partner]
        at_paired = [k for k, i in enumerate(chunk) if i in partner]
        h_zj = recs["zsl"].large([partner[i] for i in paired])[0] if paired else None
        for f in ft:
            parts = M.simaou_parts(h_z, h_i, data[f][0])
            vals[Key("cos_zsl", "icl")], vals[Key("cos_zsl", f)] = parts["a"], parts["b"]
            vals[Key("simaou", f)] = parts["simaou"]
            vals[Key("simaou", f, "floor")], vals[Key("simaou", f, "orth")] = parts["floor"], parts["orth"]
            shuffled = {k: np.full_like(parts["simaou"], np.nan) for k in ("shuffled", "orth_shuffled")}
            if paired:
                got = M.simaou_pairs(h_z[at_paired], h_i[at_paired], h_zj,
                                     recs[f].large([partner[i] for i in paired])[0])
                for k in shuffled:
                    shuffled[k][at_paired] = got[k]
            for k, v in shuffled.items():
                vals[Key("simaou", f, k)] = v
            vals[Key("simaou", f, "excess")] = parts["simaou"] - shuffled["shuffled"]
            vals[Key("simaou", f, "orth_excess")] = parts["orth"] - shuffled["orth_shuffled"]
        at = [row[i] for i in chunk]
        for name, v in vals.items():
            if name not in out:
                out[name] = np.full((len(ids), v.shape[1]), np.nan)
            out[name][at] = v
    return out, heads


def analyze_job(run_dir: Path, cfg, task: str, seed: int, meta: dict, recs: dict[str, JobRecords],
                key: str | None = None) -> tuple[dict, dict]:
    """(results of one task × seed, per-example arrays for the bootstrap). `recs`: the records of
    the settings that did not fail; `key`: the job's name in paths where it is not the seed (a
    demonstration order). A record the config says the run wrote and that is not there is an
    error naming the file."""
    key = str(seed) if key is None else key
    texts = dict(zip(meta["eval_ids"], meta.get("eval_texts", ())))   # for the per-example view only
    meta = {k: v for k, v in meta.items() if k != "eval_texts"}
    methods = list(recs)
    if not methods:
        return {"n": len(meta["eval_ids"]), "acc": {}, "meta": meta, "ft_logs": {}}, {}
    small = {s: r.small(("ids", "gold", "pred", "option_scores")) for s, r in recs.items()}
    gold = small[methods[0]]["gold"]
    # a setting with non-finite option scores (a diverged model) has no prediction to count
    nonfinite = {s: [int((~np.isfinite(small[s]["option_scores"]).all(1)).sum()), len(gold)] for s in methods}
    nonfinite = {s: kn for s, kn in nonfinite.items() if kn[0]}
    # every option scored the same: argmax picks option 0, no prediction; on every example, a collapsed model
    tied = {s: [int((np.ptp(small[s]["option_scores"], axis=1) == 0).sum()), len(gold)] for s in methods
            if s not in nonfinite}
    tied = {s: kn for s, kn in tied.items() if kn[0]}
    methods = [s for s in methods if s not in nonfinite and tied.get(s, [0])[0] < len(gold)]
    if not methods:
        return {"n": len(gold), "acc": {}, "meta": meta, "ft_logs": {}, "nonfinite": nonfinite, "tied": tied}, {}
    pred = {s: small[s]["pred"] for s in methods}
    probs = {s: M.option_probs(small[s]["option_scores"]) for s in methods}
    ft = ft_settings(methods)
    res: dict = {"n": len(gold), "acc": {s: M.accuracy(p, gold) for s, p in pred.items()}, "meta": meta,
                 "nonfinite": nonfinite, "tied": tied,
                 "ece": {s: M.ece(p, gold) for s, p in probs.items()},
                 "brier": {s: M.brier(p, gold) for s, p in probs.items()}}
    examples: dict = {"gold": gold} | {("pred", s): p for s, p in pred.items()} | {("probs", s): p
                                                                                    for s, p in probs.items()}
    examples["ids"] = small[methods[0]]["ids"]
    examples["texts"] = [texts.get(int(i), "") for i in examples["ids"]]
    content_free = {s: c["mean"] for s in methods if (c := rundir.read_calibration(
        run_dir, task, s, key, meta["config_hash"], required=cfg.eval.calibration != "none")) is not None}
    if content_free:
        cal = {s: M.calibrated(probs[s], c) for s, c in content_free.items()}
        res["acc_cal"] = {s: M.accuracy(p, gold) for s, p in cal.items()}
        res["content_free"] = content_free
        examples |= {("pred_cal", s): p for s, p in cal.items()}
        if "zsl" in cal and "icl" in cal:
            res["rpa_cal"] = {f: M.rpa(cal["zsl"], cal["icl"], cal[f], gold)["all"] for f in ft if f in cal}
    ids = small[methods[0]]["ids"].tolist()
    learned = (rundir.read_learners(run_dir, task, seed, meta["config_hash"],
                                    required_ids=ids if cfg.eval.learners else None) if key == str(seed) else None)
    if learned and all(i in learned[n] for n in learned for i in ids):
        lp = {n: np.array([learned[n][i] for i in ids], dtype=np.int64) for n in learned}
        examples |= {("pred", n): p for n, p in lp.items()}
        res["learners"] = {"acc": {n: M.accuracy(p, gold) for n, p in lp.items()}}
        if "icl" in pred:
            res["learners"]["agree"] = {n: float(np.mean(pred["icl"] == p)) for n, p in (lp | pred).items()
                                        if n != "icl"}
    if "zsl" in pred and "icl" in pred:
        res["rec2ftp"] = {f: M.rec2ftp(pred["zsl"], pred["icl"], pred[f], gold) for f in ft}
        res["rpa"] = {f: M.rpa(pred["zsl"], pred["icl"], pred[f], gold) for f in ft}
        res["changes"] = {f: M.change_counts(pred["zsl"], pred["icl"], pred[f], gold) for f in ft}
        if recs["zsl"].has_capture():
            sims, heads = similarities(recs, ft, task, seed)
            res["similarity"] = {name: float(M.nanmean(v)) for name, v in sims.items()}
            res["layers"] = {name: M.nanmean(v, axis=0).tolist() for name, v in sims.items()}
            examples |= {name: M.nanmean(v, axis=1) for name, v in sims.items()}
            # left out of the means above; the report says how many
            res["undefined"] = {name: [int(np.isnan(v).sum()), int(v.size)] for name, v in sims.items()
                                if np.isnan(v).any()}
            res["heads_left_out"] = {name: list(kn) for name, kn in heads.items() if kn[0]}
    logs = {f: rundir.read_ft_log(run_dir, task, f, key, meta["config_hash"]) for f in ft_settings(list(recs))}
    res["ft_logs"] = {f: log for f, log in logs.items() if log is not None}
    return res, examples


def stats(per_seed: dict[int, dict], examples: dict[int, dict], methods: list[str],
          left_out: dict[str, list[int]] | None = None) -> dict[str, dict]:
    """Every headline figure over seeds: per-seed values, mean ± std, bootstrap 95% interval.
    `left_out`: per setting, seeds whose runs no figure of that setting may use (diverged runs)."""
    left_out = left_out or {}
    ft = ft_settings(methods)
    seeds = sorted(per_seed)
    figures: dict[Key, tuple] = {}   # key -> (value of one seed's results, per-example fields, statistic)
    for s in methods:
        figures[Key("acc", s)] = (lambda r, s=s: r["acc"][s], (("pred", s), "gold"), lambda a: M.accuracy(*a))
        figures[Key("acc_cal", s)] = (lambda r, s=s: r["acc_cal"][s], (("pred_cal", s), "gold"),
                                      lambda a: M.accuracy(*a))
        figures[Key("ece", s)] = (lambda r, s=s: r["ece"][s], (("probs", s), "gold"), lambda a: M.ece(*a))
        figures[Key("brier", s)] = (lambda r, s=s: r["brier"][s], (("probs", s), "gold"), lambda a: M.brier(*a))
    for n in LEARNERS:
        figures[Key("acc", n)] = (lambda r, n=n: r["learners"]["acc"][n], (("pred", n), "gold"),
                                  lambda a: M.accuracy(*a))
    for other in [*LEARNERS, *(m for m in methods if m != "icl")]:   # seeds with learner records only
        figures[Key("agree", other)] = (lambda r, o=other: r["learners"]["agree"][o],
                                        (("pred", "icl"), ("pred", other), ("pred", "knn")),
                                        lambda a: float(np.mean(a[0] == a[1])))
    for f in ft:
        figures[Key("rpa_cal", f)] = (lambda r, f=f: r["rpa_cal"][f],
                                      (("pred_cal", "zsl"), ("pred_cal", "icl"), ("pred_cal", f), "gold"),
                                      lambda a: M.rpa(*a)["all"])
    if "zsl" in methods and "icl" in methods:
        fields = lambda f: (("pred", "zsl"), ("pred", "icl"), ("pred", f), "gold")   # noqa: E731
        for f in ft:
            figures[Key("rec2ftp", f)] = (lambda r, f=f: r["rec2ftp"][f], fields(f), lambda a: M.rec2ftp(*a))
            for v in RPA_LABELS:
                figures[Key("rpa", f, v)] = (lambda r, f=f, v=v: r["rpa"][f][v], fields(f),
                                             lambda a, v=v: M.rpa(*a)[v])
    for name in sorted({n for s in seeds for n in per_seed[s].get("similarity", {})}, key=str):
        figures[name] = (lambda r, n=name: r["similarity"][n], (name,), lambda a: float(M.nanmean(a[0])))
    out = {}
    for key, (value, fields, stat) in figures.items():
        have = [s for s in seeds if all(f in examples[s] for f in fields)   # a failed setting: left out
                and not any(s in left_out.get(m, ()) for m in key.settings)]
        if not have:
            continue
        vals = [value(per_seed[s]) for s in have]
        mean, std = M.mean_std(vals)
        ci = M.bootstrap_ci([tuple(examples[s][f] for f in fields) for s in have], stat)
        out[key] = {"mean": mean, "std": std, "ci": list(ci), "per_seed": vals, "seeds": have}
    return out


ORDER_FIGURES = ("acc", "simaou")


def order_spread(run_dir: Path, cfg, task: str, h: str, per_seed: dict, summary: dict, methods: list[str]) -> dict:
    """The demonstration-order control (data.orders): per figure of ICL and the FT settings, its
    value under every order of each seed, the spread over orders (sample std within a seed, mean
    over seeds) and, beside it, the spread over demonstration draws (std over seeds, order 0)."""
    values: dict[Key, dict[int, list[float]]] = {}
    for seed, r0 in per_seed.items():
        if "zsl" not in methods or "acc" not in r0:
            continue
        meta = rundir.read_job_meta(run_dir, task, seed, h)
        zsl = rundir.job_dir(run_dir, task, "zsl", seed)
        for order in range(1, cfg.data.orders):
            key = f"{seed}o{order}"
            recs = {"zsl": JobRecords(zsl, h, meta["eval_ids"])} | {
                m: JobRecords(rundir.job_dir(run_dir, task, m, key), h, meta["eval_ids"]) for m in methods if m != "zsl"}
            r, _ = analyze_job(run_dir, cfg, task, seed, meta, recs, key=key)
            for rec in recs.values():
                rec.release()
            for m in methods:
                if m == "zsl":
                    continue
                for k, v0, v in [(Key("acc", m), r0["acc"].get(m), r["acc"].get(m)),
                                 (Key("simaou", m), r0.get("similarity", {}).get(Key("simaou", m)),
                                  r.get("similarity", {}).get(Key("simaou", m)))]:
                    if v0 is not None and v is not None:
                        values.setdefault(k, {}).setdefault(seed, [float(v0)]).append(float(v))
    out = {}
    for k, by_seed in values.items():
        spreads = [float(np.std(v, ddof=1)) for v in by_seed.values() if len(v) > 1]
        out[k] = {"per_seed": {str(s): v for s, v in by_seed.items()},
                  "std_over_orders": float(np.mean(spreads)) if spreads else None,
                  "std_over_draws": summary[k]["std"] if k in summary else None}
    return out


def analyze(run_dir: Path, exclude_diverged: bool | None = None, per_example: dict | None = None) -> dict:
    """All results of a run (JSON-ready). Diverged FT runs are flagged; with `exclude_diverged`
    (default: the run's report.exclude_diverged) no mean uses them. `per_example`: filled with
    each (task, seed)'s per-example arrays (report/examples.py)."""
    run_dir = Path(run_dir)
    cfg, h = rundir.read_config(run_dir)
    if exclude_diverged is None:
        exclude_diverged = cfg.report.exclude_diverged
    methods = list(cfg.eval.methods)
    searched = cfg.finetune.lr_search and bool(ft_settings(methods))
    failures = [f for f in rundir.read_failures(run_dir) if f["config_hash"] == h]
    tasks = {}
    for task in cfg.data.tasks:
        per_seed, examples, failed, recs = {}, {}, {}, {}
        for seed in C.seeds_for(cfg, task):
            bad = {f["setting"] for f in failures if f["task"] == task and str(f["seed"]) == str(seed)}   # "1o2": an order job
            for s in sorted(bad):
                failed.setdefault(s, []).append(seed)
            meta = rundir.read_job_meta(run_dir, task, seed, h)
            # each job's shards verified once, here, for the job's figures and the ceilings alike
            recs[seed] = {m: JobRecords(rundir.job_dir(run_dir, task, m, seed), h, meta["eval_ids"])
                          for m in methods if m not in bad}
            per_seed[seed], examples[seed] = analyze_job(run_dir, cfg, task, seed, meta, recs[seed])
            if per_example is not None:
                per_example[task, seed] = examples[seed]
            for r in recs[seed].values():
                r.release()
        names = sorted({n for r in per_seed.values() for n in r.get("layers", {})}, key=str)
        layers = {n: M.nanmean([r["layers"][n] for r in per_seed.values() if n in r.get("layers", {})], axis=0).tolist()
                  for n in names}
        flagged: dict[str, list[int]] = {}
        for seed, r in per_seed.items():
            for f, log in r["ft_logs"].items():
                if M.diverged(log):
                    flagged.setdefault(f, []).append(seed)
        summary = stats(per_seed, examples, methods, flagged if exclude_diverged else None)
        for key, c in ceilings(recs, {s: r["meta"] for s, r in per_seed.items()}).items():
            layers[key] = c.pop("layers")
            summary[key] = c
        orders = order_spread(run_dir, cfg, task, h, per_seed, summary, methods) if cfg.data.orders > 1 else {}
        tasks[task] = {"seeds": {str(s): r for s, r in per_seed.items()}, "summary": summary, "orders": orders,
                       "layers": layers, "failed": failed, "diverged": flagged,
                       "lr_search": rundir.read_lr_search(run_dir, task, h, required=searched)}
    return {"run_dir": str(run_dir), "config_hash": h, "config": cfg, "methods": methods,
            "ft_settings": ft_settings(methods), "tasks": tasks, "failures": failures,
            "exclude_diverged": exclude_diverged}
