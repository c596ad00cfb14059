"""The per-example view: which examples ICL and FT agree on.

    <report>/examples.csv          every eval example of every task and seed: id, text (shortened),
                                   gold, each setting's prediction and option probabilities, per FT
                                   setting the change from ZSL it falls in (change_masks) and its
                                   SimAOU (layer mean) with the excess over its shuffled pair
    <report>/examples/<task>.md    the first report.example_rows rows of the task's first seed

Built from the analysis's per-example arrays (report/analysis.py), so it agrees with every figure.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from icl_scale import atomic
from icl_scale.report import metrics as M
from icl_scale.report.keys import Key
from icl_scale.settings import ft_settings

TEXT_CSV, TEXT_MD = 160, 80   # characters of each example's text shown


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def rows(results: dict, per_example: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) over every (task, seed) whose settings all have records."""
    methods = results["methods"]
    ft = ft_settings(methods)
    learners = sorted({k[1] for ex in per_example.values() for k in ex
                       if isinstance(k, tuple) and k[0] == "pred" and k[1] not in methods})
    header = ["task", "seed", "id", "text", "gold"]
    for s in methods:
        header += [f"pred_{s}", f"probs_{s}"]
    header += [f"pred_{n}" for n in learners]
    for f in ft:
        header += [f"change_{f}", f"simaou_{f}", f"simaou_excess_{f}"]
    out = []
    for (task, seed), ex in per_example.items():
        if "ids" not in ex:   # every setting failed
            continue
        words = results["tasks"][task]["seeds"][str(seed)]["meta"]["label_words"]
        word = lambda y: words[int(y)]   # noqa: E731
        zsl, icl = ex.get(("pred", "zsl")), ex.get(("pred", "icl"))
        changes = {f: M.change_masks(zsl, icl, ex[("pred", f)], ex["gold"]) for f in ft
                   if zsl is not None and icl is not None and ("pred", f) in ex}
        for n, i in enumerate(ex["ids"]):
            row = [task, str(seed), str(int(i)), _short(ex["texts"][n], TEXT_CSV), word(ex["gold"][n])]
            for s in methods:
                have = ("pred", s) in ex
                row += [word(ex[("pred", s)][n]) if have else "",
                        ";".join(f"{p:.4f}" for p in ex[("probs", s)][n]) if have else ""]
            row += [word(ex[("pred", m)][n]) if ("pred", m) in ex else "" for m in learners]
            for f in ft:
                change = next((k for k, mask in changes[f].items() if mask[n]), "unchanged") if f in changes else ""
                sims = [ex.get(Key("simaou", f)), ex.get(Key("simaou", f, "excess"))]
                row += [change] + ["" if v is None or np.isnan(v[n]) else f"{v[n]:.6g}" for v in sims]
            out.append(row)
    return header, out


def write(results: dict, per_example: dict, where, n_md: int) -> None:
    """examples.csv and one markdown page per task under `where` (the report's temporary dir)."""
    header, table = rows(results, per_example)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(table)
    atomic.write_text(where / "examples.csv", buf.getvalue())
    ft = ft_settings(results["methods"])
    keep = ["id", "text", "gold", *(f"pred_{s}" for s in results["methods"]),
            *(c for f in ft for c in (f"change_{f}", f"simaou_{f}"))]
    at = [header.index(c) for c in keep]
    for task in results["tasks"]:
        mine = [r for r in table if r[0] == task]
        if not mine:
            continue
        first_seed = mine[0][1]
        shown = [r for r in mine if r[1] == first_seed][:n_md]
        lines = [f"# `{task}`: the first {len(shown)} examples of seed {first_seed}", "",
                 "Each setting's prediction; per FT setting the change from ZSL the example falls in "
                 "(`icl_only_*`, `ft_only_*`, `both_*`: who changed the ZSL prediction and whether the new one is "
                 "correct) and its SimAOU, the mean over layers. Every example, seed and option probability: "
                 "`../examples.csv`.", "",
                 "| " + " | ".join(keep) + " |", "|" + "|".join("---" for _ in keep) + "|"]
        for r in shown:
            cells = [r[j] for j in at]
            cells[1] = _short(cells[1], TEXT_MD).replace("|", "\\|")
            lines.append("| " + " | ".join(cells) + " |")
        atomic.write_text(where / "examples" / f"{task}.md", "\n".join(lines) + "\n")
