"""The name of every figure of a report: which metric, of which setting (or baseline), which variant
of the metric. Written out as `metric/of/variant` (metrics.csv, results.json), never parsed back.

    Key("acc", "icl")                   accuracy of a setting; "acc_cal": with calibration (eval.calibration)
    Key("ece", "icl"), Key("brier", …)  expected calibration error, Brier score of the option probabilities
    Key("rpa_cal", "ft")                RPA of calibrated predictions
    Key("acc", "knn"), Key("agree", x)  a learner baseline's accuracy (LEARNERS); how often ICL's
                                        prediction equals a learner's or a setting's
    Key("rec2ftp", "ft")                Rec2FTP of an FT setting
    Key("rpa", "ft", "same_label")      RPA of an FT setting, one of RPA_LABELS
    Key("simaou", "ft_lin")             SimAOU of an FT setting; of "random_uniform": a baseline
    Key("simaou", "ft", "shuffled")     what SimAOU is made of, and its baselines (SIMAOU_PARTS)
    Key("cos_zsl", "icl")               a = cos(h_ICL, h_ZSL); of an FT setting: b
    Key("simam", "zsl")                 SimAM before FT; of an FT setting: after it
    Key("simam", "zsl", "centred")      the same on centred (or "softmax") scores
    Key("simam_delta", "ft")            SimAM_Δ of an FT setting
    Key("ceiling", "icl")               noise ceiling: SimAOU of ICL vs ICL over two seeds (CEILINGS)
"""

from __future__ import annotations

from dataclasses import dataclass

from icl_scale.settings import SETTINGS

RANDOM_BASELINES = {"random_uniform": "random, Uniform[0,1)", "random_gaussian": "random, Gaussian",
                    "random_state": "random h in place of h_FT, the papers' text"}
RPA_LABELS = {"all": "RPA", "correct": "RPA – changes to correct", "incorrect": "RPA – changes to incorrect",
              "same_label": "RPA – both to the same new label, over the union",
              "change_recall": "ChangeRecall (the reference code's RPA)"}
SIMAOU_PARTS = {"floor": "SimAOU floor √((1−a)(1−b))/2", "shuffled": "SimAOU, shuffled pairs",
                "excess": "SimAOU excess over shuffled pairs", "orth": "SimAOU ⊥ ĥ_ZSL",
                "orth_shuffled": "SimAOU ⊥ ĥ_ZSL, shuffled pairs", "orth_excess": "SimAOU ⊥ ĥ_ZSL excess over shuffled pairs"}
LEARNERS = {"knn": "kNN", "logreg": "logistic regression"}   # methods/learners.py
MAP_LABELS = {"": "", "centred": ", centred", "softmax": ", post-softmax"}
CEILINGS = {"ceiling": "SimAOU", "ceiling_simam": "SimAM", "ceiling_simam_delta": "SimAM_Δ"}


@dataclass(frozen=True)
class Key:
    metric: str
    of: str = ""
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.metric, self.of, self.variant) if p)

    @property
    def label(self) -> str:
        of = SETTINGS[self.of].label if self.of in SETTINGS else LEARNERS.get(self.of, self.of)
        if self.metric == "acc":
            return f"{of} accuracy"
        if self.metric == "agree":
            return f"ICL agrees with {of}"
        if self.metric == "acc_cal":
            return f"{of} accuracy, calibrated"
        if self.metric == "ece":
            return f"ECE ({of})"
        if self.metric == "brier":
            return f"Brier score ({of})"
        if self.metric == "rpa_cal":
            return f"RPA, calibrated ({of})"
        if self.metric == "rec2ftp":
            return f"Rec2FTP ({of})"
        if self.metric == "rpa":
            return f"{RPA_LABELS[self.variant]} ({of})"
        if self.metric == "simaou":
            if self.of in RANDOM_BASELINES:
                return f"SimAOU ({RANDOM_BASELINES[self.of]})"
            return f"{SIMAOU_PARTS[self.variant]} ({of})" if self.variant else f"SimAOU ({of})"
        if self.metric == "cos_zsl":
            return f"cos(h_{of}, h_ZSL)" if self.of == "icl" else f"cos(h_FT, h_ZSL) ({of})"
        if self.metric == "simam":
            when = "before FT" if self.of == "zsl" else f"after {of}"
            return f"SimAM ({when}{MAP_LABELS[self.variant]})"
        if self.metric == "simam_delta":
            return f"SimAM_Δ ({of}{MAP_LABELS[self.variant]})"
        if self.metric in CEILINGS:
            return f"{CEILINGS[self.metric]} ceiling: {of} vs {of}, two demonstration draws"
        return str(self)

    @property
    def settings(self) -> set[str]:
        """The settings the figure is computed from."""
        if self.metric in ("acc", "acc_cal", "ece", "brier"):
            return {self.of} & set(SETTINGS)
        if self.metric == "agree":
            return {"icl"} | ({self.of} & set(SETTINGS))
        return {"zsl", "icl"} | ({self.of} if self.of in SETTINGS else set())

    @property
    def baseline(self) -> bool:
        return self.of in RANDOM_BASELINES
