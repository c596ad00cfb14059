"""The study's settings and suite variants, as data (no torch): every other module dispatches on
these fields instead of on names. Adding a setting is one entry here plus, for a new finetuning
loss, its function in methods/losses.py.

A setting scores the eval set after a prompt (`prompt`: the zero-shot prefix or the fitted ICL
prefix); a finetuning setting first trains on the demonstrations with `loss`, clipped as the config
fields named by `clip` say, and may store its trained tensors beside its records (`stores`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    label: str                        # in report tables and figures
    prompt: str                       # "zsl" or "icl": the prefix it scores after
    loss: str | None = None           # finetuning loss (methods/losses.py); None: no finetuning
    clip: tuple[str, str] = ("clip", "clip_value")   # finetune.<mode field>, finetune.<value field>
    stores: str = "weights"           # output.save_ft_weights: "weights" after FT, or "delta" (linearized)

    @property
    def finetunes(self) -> bool:
        return self.loss is not None

    @property
    def linearized(self) -> bool:
        return self.loss == "linearized"


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("zsl", "ZSL", "zsl"),
    Setting("icl", "ICL", "icl"),
    Setting("ft", "FT", "zsl", loss="standard"),
    Setting("ft_lc", "layer-causal FT", "zsl", loss="layer_causal"),
    Setting("ft_lc_clip", "layer-causal FT (clipped)", "zsl", loss="layer_causal", clip=("lc_clip", "lc_clip_value")),
    Setting("ft_lin", "linearized FT", "zsl", loss="linearized", stores="delta"),
)}
# global_l2: the trained gradient's L2 norm; layer_l2: each layer's L2 norm (the revisited paper's run);
# elem_clamp: every element to [-v, v]; linf_rescale: the whole gradient scaled so its largest |element| is v
CLIP_MODES = ("none", "global_l2", "layer_l2", "elem_clamp", "linf_rescale")


def ft_settings(names) -> list[str]:
    """The finetuning settings among `names`, in their order."""
    return [n for n in names if SETTINGS[n].finetunes]


@dataclass(frozen=True)
class Variant:
    """A run of `icl-scale suite`: the base config with `sets` applied. A value given as
    "@section.field" is read from that field of the config (e.g. the suite's own knob)."""
    name: str
    title: str
    note: str                         # str.format'ed with cfg=the suite's config
    sets: tuple[tuple[str, object], ...] = ()


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("base", "Base", "The model and demonstrations as they are."),
    Variant("label_switch", "Label switching",
            "{cfg.suite.label_switch:.0%} of the demonstrations' labels corrupted ({cfg.data.label_noise_mode}); "
            "the same corrupted set for ICL and FT.",
            sets=(("data.label_noise", "@suite.label_switch"),)),
    Variant("untrained", "Untrained-model control",
            "Attention and MLP weights re-initialised with each run seed; embeddings and norms kept.",
            sets=(("model.untrained", True),)),
)}
