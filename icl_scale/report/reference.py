"""The papers' numbers (../shared/paper/, GPT 1.3B = fairseq en_dense_lm_1_3b, one seed), keyed
like our results, for `icl-scale report --compare-reference`. Accuracies and RPA as fractions.

Sources: "Rethinking ICL as GD" Table 1 (accuracy, RPA), Table 2 (SimAOU/SimAM, standard vs
layer-causal FT), Table 3 (layer-causal FT clipped at 12.0, Subj), Table 4 (linearized FT).
The random SimAOU baseline of the papers is the reference's unseeded Uniform[0, 1).
"""

from __future__ import annotations

MODEL = "GPT 1.3B (fairseq en_dense_lm_1_3b)"
MODEL_IDS = ("KoboldAI/fairseq-dense-1.3B",)   # our model names that are the papers' model

_TASKS = ("sst2", "sst5", "mr", "subj", "agnews", "cb")


def _row(*values):
    return {t: v for t, v in zip(_TASKS, values) if v is not None}


REFERENCE: dict[str, dict[str, float]] = {
    "acc/zsl": _row(.705, .393, .659, .726, .462, .375),
    "acc/ft": _row(.74, .394, .726, .778, .667, .571),
    "acc/icl": _row(.927, .450, .891, .900, .792, .500),
    # the papers' RPA is their code's ChangeRecall: shown beside ours of that formula
    "rpa/ft/change_recall": _row(.164, .034, .340, .362, .480, .800),
    "rpa/ft/correct": _row(.198, .032, .402, .480, .635, .917),
    "rpa/ft/incorrect": _row(.018, .035, .177, .102, .192, .667),
    "simaou/random_uniform": _row(.0016, .0025, .0008, .0022, .0021, .0037),
    "simaou/ft": _row(.1091, .113, .2190, .1932, .3053, .2013),
    "simaou/ft_lc": _row(.2297, .1065, .3299, .3439, .3213, .3435),
    "simaou/ft_lc_clip": _row(None, None, None, .3480, None, None),
    "simaou/ft_lin": _row(.122, .0789, .171, .148, None, None),
    "simam/zsl": _row(.5546, .3913, .3979, .3786, .1518, .1524),
    "simam/ft": _row(.5850, .4047, .4980, .4870, .4944, .1875),
    "simam/ft_lc": _row(.5774, .4039, .2919, .2844, .1201, .0293),
    "simam/ft_lc_clip": _row(None, None, None, .4227, None, None),
    "simam/ft_lin": _row(.573, .403, .448, .449, None, None),
}


def reference(key, task: str) -> float | None:
    """The papers' figure of a report key (report/keys.py) on a task, if they have it."""
    return REFERENCE.get(str(key), {}).get(task)


def reference_average(key, tasks: list[str]) -> tuple[float | None, list[str]]:
    """The papers' average of a figure over those of `tasks` they report, and which those are."""
    row = REFERENCE.get(str(key), {})
    have = [t for t in tasks if t in row]
    return (sum(row[t] for t in have) / len(have) if have else None), have
