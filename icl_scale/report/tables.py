"""The report's tables, built once from the analysis results; markdown, CSV and the console
summary all draw from them. Tables in the layout of the papers: metrics as rows, tasks as columns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from icl_scale.report import metrics as M
from icl_scale.report.keys import LEARNERS, MAP_LABELS, RPA_LABELS, SIMAOU_PARTS, Key
from icl_scale.report.reference import MODEL as REFERENCE_MODEL, MODEL_IDS, reference, reference_average
from icl_scale.settings import SETTINGS


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    keys: list[Key] = field(default_factory=list)   # the metric key of each row, where rows are metrics


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(x: float | None, digits: int = 4) -> str:
    return "–" if _nan(x) else f"{x:.{digits}f}"


def _seeds_of(task_results: dict, what: str, key: Key) -> list[int]:
    return sorted({seed for setting in key.settings for seed in task_results.get(what, {}).get(setting, [])})


def cell(task_results: dict, key: Key, task: str, compare: bool, excluded: bool = False) -> str:
    """mean ± std over seeds, with the seeds whose runs failed or diverged named beside it."""
    s = task_results["summary"].get(key)
    failed, diverged = _seeds_of(task_results, "failed", key), _seeds_of(task_results, "diverged", key)
    if s is None or _nan(s["mean"]):
        text = "failed" if failed else ("diverged" if diverged else "–")
    else:
        text = fmt(s["mean"]) + (f" ± {fmt(s['std'])}" if len(s["per_seed"]) > 1 else "")
        if failed:
            text += " (seed " + ", ".join(map(str, failed)) + " failed)"
    if diverged:
        text += " (seed " + ", ".join(map(str, diverged)) + " diverged" + (", left out" if excluded else "") + ")"
    if compare:
        held_out = any(r["meta"]["eval_from_train"] for r in task_results["seeds"].values())
        text += f" ({fmt(reference(key, task))})" + (" †" if held_out else "")
    return text


def average_cell(results: dict, key: Key, tasks: list[str], compare: bool) -> str:
    """Our average over tasks (naming them where some have no value); comparing, the papers'
    average and ours over the same tasks as theirs."""
    text = fmt(task_average(results, key))
    over = averaged_over(results, key)
    if over and len(over) < len(tasks):
        text += f" (over {', '.join(over)})"
    if compare:
        theirs, have = reference_average(key, tasks)
        if have and len(have) < len(tasks):
            ours = task_average(results, key, have)
            text += f" ({', '.join(have)}: {fmt(ours)} vs {fmt(theirs)})"
        else:
            text += f" ({fmt(theirs)})"
    return text


def averaged_over(results: dict, key: Key) -> list[str]:
    """The tasks an average of `key` is taken over: those with a value."""
    return [t for t, r in results["tasks"].items() if key in r["summary"] and not _nan(r["summary"][key]["mean"])]


def task_average(results: dict, key: Key, tasks: list[str] | None = None) -> float:
    """The mean over tasks (all, or `tasks`) of a figure's mean over seeds (NaN where none has it)."""
    means = [r["summary"][key]["mean"] for t, r in results["tasks"].items()
             if key in r["summary"] and (tasks is None or t in tasks)]
    means = [m for m in means if not _nan(m)]
    return sum(means) / len(means) if means else math.nan


VARIANT_KEYS = ([Key("acc", s) for s in SETTINGS] + [Key("rpa", "ft", "all"), Key("simaou", "random_uniform")]
                + [Key("simaou", f, v) for f in ("ft", "ft_lc", "ft_lin") for v in ("", "shuffled", "excess")]
                + [Key("simam", s) for s in ("zsl", "ft", "ft_lc", "ft_lin")])


def variant_table(results_of: dict[str, dict], titles: dict[str, str]) -> Table:
    """Study variants side by side: each figure's average over tasks, one column per variant."""
    keys = [k for k in VARIANT_KEYS if any(k in r["summary"] for res in results_of.values()
                                            for r in res["tasks"].values())]
    rows = [[k.label] + [fmt(task_average(res, k)) for res in results_of.values()] for k in keys]
    return Table("Variants side by side", ["metric"] + [titles[v] for v in results_of], rows,
                 "Each figure averaged over tasks (and seeds). Label switching shows how much of ICL and FT "
                 "follows the demonstrations' labels; the untrained control, what the similarity metrics "
                 "give without pretrained weights.", keys)


def with_parts(keys: list[Key]) -> list[Key]:
    """Every SimAOU of an FT setting followed by what it is made of, its baselines (a, b, floor,
    shuffled pairs, excess, orthogonal part) and the noise ceilings; every SimAM by its centred and
    post-softmax variants and the ceilings."""
    out: list[Key] = []
    for k in keys:
        out.append(k)
        if k.metric == "simaou" and k.of in SETTINGS and not k.variant:
            out += [Key("cos_zsl", "icl"), Key("cos_zsl", k.of)] + [Key("simaou", k.of, v) for v in SIMAOU_PARTS]
            out += [Key("ceiling", "icl"), Key("ceiling", k.of)]
        elif k.metric in ("simam", "simam_delta") and not k.variant:
            out += [Key(k.metric, k.of, v) for v in MAP_LABELS if v]
            if k.of != "zsl":
                out += [Key(f"ceiling_{k.metric}", "icl"), Key(f"ceiling_{k.metric}", k.of)]
    return list(dict.fromkeys(out))   # a once, where two SimAOU rows bring it


def metric_table(results: dict, title: str, keys: list[Key], caption: str, compare: bool) -> Table | None:
    tasks = list(results["tasks"])
    keys = [k for k in with_parts(keys) if any(k in results["tasks"][t]["summary"] for t in tasks)]
    if not keys:
        return None
    excluded = results.get("exclude_diverged", False)
    rows = [[k.label] + [cell(results["tasks"][t], k, t, compare, excluded) for t in tasks]
            + [average_cell(results, k, tasks, compare)] for k in keys]
    caption += (" Averages: over every task, or over the tasks named in the cell." +
                (" Diverged FT runs (last loss above the first, or non-finite) are left out of every mean."
                 if excluded else " Diverged FT runs (last loss above the first, or non-finite) are flagged and "
                 "included; `--report.exclude_diverged` leaves them out."))
    if compare:
        caption += (f" In parentheses: the paper's figure ({REFERENCE_MODEL}), – where it has none; where the paper "
                    "reports fewer tasks, the average column compares over its tasks only. The paper's RPA is its "
                    "code's ChangeRecall and stands beside ours. †: our eval set is held out of train (no official "
                    "eval split offline), not the paper's.")
        if results["config"].model.name not in MODEL_IDS:
            caption += f" Our model is `{results['config'].model.name}`, not the paper's: no figure is like for like."
    return Table(title, ["metric"] + tasks + ["average"], rows, caption, keys)


def order_table(results: dict) -> Table | None:
    """The demonstration-order control: per figure and task, the spread over orders beside the
    spread over demonstration draws."""
    n_orders = results["config"].data.orders
    keys = list(dict.fromkeys(k for t in results["tasks"].values() for k in t.get("orders", {})))
    if n_orders < 2 or not keys:
        return None
    tasks = list(results["tasks"])

    def spread(task: str, key: Key) -> str:
        o = results["tasks"][task].get("orders", {}).get(key)
        if o is None:
            return "–"
        return f"{fmt(o['std_over_orders'], 3)} / {fmt(o['std_over_draws'], 3)}"

    rows = [[k.label] + [spread(t, k) for t in tasks] for k in keys]
    return Table("Demonstration order", ["figure"] + tasks, rows,
                 f"Std over {n_orders} orders of the same demonstrations (sample std within a seed, mean over seeds; "
                 "ICL and FT see the same permutation) / std over demonstration draws (seeds, the drawn order). "
                 "An order spread near the draw spread: which demonstrations matter no more than how they are "
                 "ordered.", keys)


def paper_tables(results: dict, compare: bool = False) -> list[Table]:
    ft, cfg = results["ft_settings"], results["config"]
    counts = sorted({len(t["seeds"]) for t in results["tasks"].values()})
    seeds = "–".join(map(str, dict.fromkeys([counts[0], counts[-1]])))
    spread = f" Mean over {seeds} seeds ± standard deviation." if counts[-1] > 1 else " One seed."
    out = [metric_table(
        results, "Accuracy and prediction alignment",
        [Key("acc", m) for m in results["methods"]] + [Key("rec2ftp", f) for f in ft]
        + [Key("rpa", f, v) for f in ft for v in RPA_LABELS],
        "RPA = |D_ICL ∩ D_FT| / |D_ICL ∪ D_FT|, D_X the examples whose prediction X changed from ZSL." + spread,
        compare)]
    out.append(metric_table(
        results, "Calibration",
        [k for m in results["methods"] for k in (Key("acc", m), Key("acc_cal", m), Key("ece", m), Key("brier", m))]
        + [k for f in ft for k in (Key("rpa", f, "all"), Key("rpa_cal", f))],
        "Option probabilities: the option scores softmaxed over the options. ECE: |accuracy − confidence| of the "
        "top option over 15 equal-width confidence bins, weighted by their share of examples; Brier: Σ over "
        "options of (p − one-hot)², mean over examples. Calibrated (`eval.calibration`: "
        f"{cfg.eval.calibration}): the mean option distribution of content-free inputs scored after the same "
        "prefix divided out, per setting." + spread, compare))
    out.append(metric_table(
        results, "SimAOU and SimAM: standard vs layer-causal FT",
        [Key("simaou", "random_uniform"), Key("simaou", "random_gaussian"), Key("simaou", "random_state"),
         Key("simaou", "ft"), Key("simaou", "ft_lc"),
         Key("simam", "zsl"), Key("simam", "ft"), Key("simam", "ft_lc"), Key("simam_delta", "ft"),
         Key("simam_delta", "ft_lc")],
        "Means over examples and layers. Random baselines: the FT update replaced by a seeded random vector. "
        "Beside each SimAOU: a = cos(h_ICL, h_ZSL) and b = cos(h_FT, h_ZSL); the floor √((1−a)(1−b))/2, what SimAOU "
        "is when the two updates share only their way off ĥ_ZSL; SimAOU with the FT update of another example "
        "(shuffled pairs, a seeded derangement) and the excess over it; the same for the updates' parts "
        "orthogonal to ĥ_ZSL. SimAM on plain, centred and post-softmax scores." + spread,
        compare))
    if "ft_lc_clip" in ft:
        f = cfg.finetune
        out.append(metric_table(
            results, "Layer-causal FT with clipping",
            [Key("simaou", "ft"), Key("simaou", "ft_lc"), Key("simaou", "ft_lc_clip"), Key("simam", "zsl"),
             Key("simam", "ft"), Key("simam", "ft_lc"), Key("simam", "ft_lc_clip"), Key("simam_delta", "ft_lc_clip")],
            f"Clipped setting: {f.lc_clip} at {f.lc_clip_value}." + spread, compare))
    if "ft_lin" in ft:
        out.append(metric_table(
            results, "Linearized FT",
            [Key("simaou", "random_uniform"), Key("simaou", "ft"), Key("simaou", "ft_lin"), Key("simam", "zsl"),
             Key("simam", "ft"), Key("simam", "ft_lin"), Key("simam_delta", "ft_lin")],
            "f_lin = f(θ0) + J·δ, evaluated through its dual pass; every task." + spread, compare))
    out.append(metric_table(
        results, "Learner baselines",
        [Key("acc", "icl")] + [Key("acc", n) for n in LEARNERS] + [Key("acc", f) for f in ft]
        + [Key("agree", n) for n in LEARNERS] + [Key("agree", m) for m in results["methods"] if m != "icl"],
        "kNN (5 nearest by cosine, a tie to the nearest) and logistic regression (multinomial, standardised "
        "features, sklearn's C = 1) trained on the demonstrations' frozen representations (the model's last "
        "hidden state at θ0, mean-pooled over the input). If ICL agrees with a learner as often as with FT, "
        "agreement with FT is not specific to finetuning." + spread, compare)
        if any("learners" in r for t in results["tasks"].values() for r in t["seeds"].values()) else None)
    out.append(order_table(results))
    out = [t for t in out if t is not None]
    shown = {k.of for t in out for k in t.keys if k.metric == "simaou"}
    for f in ft:   # a setting the papers' tables do not have: a table of its own
        if f not in shown:
            out.append(metric_table(
                results, f"SimAOU and SimAM: {SETTINGS[f].label}",
                [Key("simaou", "random_uniform"), Key("simaou", f), Key("simam", "zsl"), Key("simam", f),
                 Key("simam_delta", f)],
                "Means over examples and layers." + spread, compare))
    return [t for t in out if t is not None]


def excess_sentences(results: dict) -> list[str]:
    """One sentence per FT setting: is SimAOU's excess over shuffled pairs significantly above 0?"""
    out = []
    for f in results["ft_settings"]:
        for part, what in (("excess", "SimAOU"), ("orth_excess", "SimAOU of the parts orthogonal to ĥ_ZSL")):
            key = Key("simaou", f, part)
            have = {t: r["summary"][key] for t, r in results["tasks"].items() if key in r["summary"]}
            if not have:
                continue
            above = [t for t, s in have.items() if not _nan(s["ci"][0]) and s["ci"][0] > 0]
            below = [t for t, s in have.items() if not _nan(s["ci"][1]) and s["ci"][1] < 0]
            verdict = (f"its 95% interval is above 0 on {len(above)} of {len(have)} tasks"
                       + (f" ({', '.join(above)})" if above else "")
                       + (f" and below 0 on {', '.join(below)}" if below else ""))
            sizes = sorted({r["n"] for t in have for r in results["tasks"][t]["seeds"].values()})
            n = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
            shuffled, floor = (task_average(results, Key("simaou", f, v)) for v in ("shuffled", "floor"))
            below_floor = part == "excess" and not _nan(floor) and shuffled < floor
            if below_floor:
                reading = (f"But shuffled pairs ({fmt(shuffled)}) sit below the geometric floor ({fmt(floor)}) here: "
                           "ĥ_ZSL differs between examples, so shuffled pairs do not carry the floor and this excess "
                           "is partly the floor. The orthogonal excess, which the floor does not reach, is the figure "
                           "to read.")
            elif above:
                reading = ("Where it is above 0, ICL's update aligns with this FT's update on the same example beyond "
                           "what geometry and directions shared by all examples give.")
            else:
                reading = "Nowhere is the per-example alignment distinguishable from pairing with another example."
            out.append(f"- {SETTINGS[f].label}: {what} minus its shuffled-pair baseline is "
                       f"{fmt(task_average(results, key))} on average over {len(have)} tasks ({n} examples per "
                       f"task and seed); {verdict}. {reading}")
    return out


def interval_table(results: dict, task: str) -> Table:
    """Every headline figure of one task with its spread and bootstrap interval."""
    summary = results["tasks"][task]["summary"]
    rows = [[k.label, fmt(s["mean"]), fmt(s["std"]), f"[{fmt(s['ci'][0])}, {fmt(s['ci'][1])}]",
             ", ".join(f"{seed}: {fmt(v)}" for seed, v in zip(s["seeds"], s["per_seed"]))] for k, s in summary.items()]
    return Table(f"{task}: all figures", ["metric", "mean", "std over seeds", "bootstrap 95% CI", "per seed"], rows,
                 "Bootstrap: 1000 resamples of the examples of each seed (seeded), mean over seeds.",
                 list(summary))


LAYER_VARIANTS = ("", "shuffled", "excess")   # the report.md's per-layer columns; metrics.csv has every figure


def layer_table(results: dict, task: str) -> Table | None:
    layers = results["tasks"][task]["layers"]
    names = [k for k in layers if k.variant in LAYER_VARIANTS and k.metric in ("simaou", "simam", "simam_delta", "ceiling")]
    if not names:
        return None
    n = len(layers[names[0]])
    rows = [[str(i)] + [fmt(layers[k][i]) for k in names] for i in range(n)]
    return Table(f"{task}: per layer", ["layer"] + [k.label for k in names], rows,
                 "Mean over examples (and seeds) at each layer; layer 0 is nearest the input.")


CHANGE_COLUMNS = {"icl_only_correct": "ICL only → correct", "icl_only_incorrect": "ICL only → wrong",
                  "ft_only_correct": "FT only → correct", "ft_only_incorrect": "FT only → wrong",
                  "both_correct": "both → correct", "both_incorrect": "both → wrong", "both_mixed": "both, one correct"}


def change_totals(results: dict) -> dict[tuple[str, str], dict[str, int]]:
    """{(task, FT setting): counts of changed predictions summed over seeds}."""
    out: dict = {}
    for task, tr in results["tasks"].items():
        for r in tr["seeds"].values():
            for f, counts in r.get("changes", {}).items():
                total = out.setdefault((task, f), dict.fromkeys(CHANGE_COLUMNS, 0))
                for k, v in counts.items():
                    total[k] += v
    return out


def changes_table(results: dict) -> Table | None:
    totals = change_totals(results)
    if not totals:
        return None
    rows = [[task, SETTINGS[f].label] + [str(c[k]) for k in CHANGE_COLUMNS] + [str(sum(c.values()))]
            for (task, f), c in totals.items()]
    n_seeds = max(len(t["seeds"]) for t in results["tasks"].values())
    return Table("Changed predictions", ["task", "FT setting", *CHANGE_COLUMNS.values(), "changed"], rows,
                 f"Eval examples whose prediction ICL or FT changed from ZSL, summed over {n_seeds} seed(s): changed by "
                 "one of them only or by both, and whether the new prediction is correct. RPA is both / changed.")


def failure_table(results: dict) -> Table | None:
    rows = [[f["task"], str(f["seed"]), SETTINGS[f["setting"]].label if f["setting"] in SETTINGS else f["setting"],
             str(f["rank"]), f["error"]]
            for f in results.get("failures", [])]
    if not rows:
        return None
    return Table("Failed jobs", ["task", "seed", "setting", "rank", "error"], rows,
                 "These jobs failed and were left out; the others ran. Rerunning the same command retries them.")


def clip_rates(log: dict) -> tuple[float, float] | None:
    """How often the clip bound: the fraction of (finite) steps it changed, and of their
    step × layer pairs."""
    if log["clip"] == "none" or "clipped" not in log:
        return None
    steps = [(c, n) for c, n in zip(log["clipped"], log["grad_norms"]) if all(not _nan(x) for x in n)]
    if not steps:
        return None
    pairs = sum(len(n) for _, n in steps)
    return sum(bool(c) for c, _ in steps) / len(steps), sum(len(c) for c, _ in steps) / pairs


def finetune_table(results: dict) -> Table | None:
    rows = []
    for task, tr in results["tasks"].items():
        for seed, r in tr["seeds"].items():
            for f, log in r["ft_logs"].items():
                losses = [x for x in log["losses"] if not _nan(x)]
                clip = "none" if log["clip"] == "none" else f"{log['clip']} at {log['clip_value']}"
                rates = clip_rates(log)
                bound = "–" if rates is None else f"{rates[0]:.0%} / {rates[1]:.0%}"
                rows.append([task, seed, SETTINGS[f].label, f"{log['lr']:g}", clip, bound, str(log["steps"]),
                             str(log["skipped"]), fmt(losses[0]) if losses else "–",
                             (fmt(losses[-1]) + (" (then non-finite)" if _nan(log["losses"][-1]) else "")) if losses
                             else "non-finite" if log["losses"] else "–",
                             "**diverged**" if M.diverged(log) else "no"])
    if not rows:
        return None
    n = sum(row[-1] != "no" for row in rows)
    return Table("Finetuning runs", ["task", "seed", "setting", "lr", "clipping", "clip bound: steps / layers",
                                     "steps", "skipped", "first loss", "last loss", "diverged"], rows,
                 "Skipped: steps with a non-finite loss or gradient, counted, never silent. Clip bound: the share of "
                 "steps the clip changed, and of step × layer pairs it scaled. Diverged: the last loss is above the "
                 f"first, or a loss was non-finite ({n} of {len(rows)} runs); every figure from such a run is flagged.")


def lr_search_table(results: dict) -> Table | None:
    """The learning-rate search of each task: every grid point's dev accuracy and final loss."""
    searches = {t: r["lr_search"] for t, r in results["tasks"].items() if r.get("lr_search")}
    if not searches:
        return None
    multiples = list(dict.fromkeys(g["multiple"] for s in searches.values() for sr in s["searches"].values()
                                   for g in sr["grid"]))
    rows = []
    for task, s in searches.items():
        for setting, sr in s["searches"].items():
            by = {g["multiple"]: g for g in sr["grid"]}
            cells = []
            for m in multiples:
                g = by.get(m)
                if g is None:
                    cells.append("–")
                    continue
                text = f"{g['dev_accuracy']:.3f} / {fmt(g['final_loss'], 2)}" + ("" if g["finite"] else " (non-finite)")
                cells.append(f"**{text}**" if m == sr["chosen_multiple"] else text)
            rows.append([task, SETTINGS[setting].label, f"{s['base_lr']:g}", f"{s['dev_size']} × {len(s['seeds'])}",
                         *cells, f"{sr['chosen_lr']:g}"])
    select = next(iter(searches.values()))["select"]
    applies = ("the rate chosen by standard FT is used by every FT setting of the task (as in the papers)"
               if select == "task" else "each FT setting uses the rate its own search chose")
    return Table("Learning-rate selection", ["task", "searched with", "task rate", "dev examples × seeds",
                                             *[f"×{m:g}" for m in multiples], "chosen lr"], rows,
                 "Each grid point: the model finetuned on each seed's demonstrations at that multiple of the task's "
                 "rate, scored zero-shot on a dev split held out of train (no eval example, no seed's demonstration): "
                 "dev accuracy pooled over seeds / mean last loss; bold: chosen (best accuracy among finite runs, "
                 f"ties the smaller rate); {applies}.")
