"""The name of every figure of a report: which metric, of which setting (or baseline), which variant
of the metric. Written out as `metric/of/variant` (metrics.csv, results.json), never parsed back.

    Key("acc", "icl")                   accuracy of a setting
    Key("rec2ftp", "ft")                Rec2FTP of an FT setting
    Key("rpa", "ft", "same_label")      RPA of an FT setting, one of RPA_LABELS
    Key("simaou", "ft_lin")             SimAOU of an FT setting; of "random_uniform": a baseline
    Key("simam", "zsl")                 SimAM before FT; of an FT setting: after it
    Key("simam_delta", "ft")            SimAM_Δ of an FT setting
"""

from __future__ import annotations

from dataclasses import dataclass

from icl_scale.settings import SETTINGS

RANDOM_BASELINES = {"random_uniform": "Uniform[0,1)", "random_gaussian": "Gaussian"}
RPA_LABELS = {"all": "RPA", "correct": "RPA – changes to correct", "incorrect": "RPA – changes to incorrect",
              "same_label": "RPA – same new label (reference's variant)"}


@dataclass(frozen=True)
class Key:
    metric: str
    of: str = ""
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.metric, self.of, self.variant) if p)

    @property
    def label(self) -> str:
        of = SETTINGS[self.of].label if self.of in SETTINGS else self.of
        if self.metric == "acc":
            return f"{of} accuracy"
        if self.metric == "rec2ftp":
            return f"Rec2FTP ({of})"
        if self.metric == "rpa":
            return f"{RPA_LABELS[self.variant]} ({of})"
        if self.metric == "simaou":
            return f"SimAOU (random, {RANDOM_BASELINES[self.of]})" if self.of in RANDOM_BASELINES else f"SimAOU ({of})"
        if self.metric == "simam":
            return "SimAM (before FT)" if self.of == "zsl" else f"SimAM (after {of})"
        if self.metric == "simam_delta":
            return f"SimAM_Δ ({of})"
        return str(self)

    @property
    def settings(self) -> set[str]:
        """The settings the figure is computed from."""
        if self.metric == "acc":
            return {self.of}
        return {"zsl", "icl"} | ({self.of} if self.of in SETTINGS else set())

    @property
    def baseline(self) -> bool:
        return self.of in RANDOM_BASELINES
