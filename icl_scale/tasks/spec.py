"""The six tasks of the study as data (DESIGN.md §2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from icl_scale.errors import UserError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str                      # str.format over the row's text fields
    label_words: tuple[str, ...]       # in label-id order; the answer is " " + word
    fields: tuple[str, ...] = ("text",)
    hub_path: str = ""
    hub_name: str | None = None
    hub_train: str = "train"
    hub_eval: str = "validation"
    hub_columns: dict = field(default_factory=dict)   # our field -> hub column, where they differ
    label_aliases: dict = field(default_factory=dict)  # label strings some sources use -> label id
    eval_size: int = 2000              # eval rows kept after the seed-1 shuffle
    ft_lr: float = 1e-3                # the reference's SGD learning rate for this task
    offline: str = ""                  # offline source: "staicc:<name>", "cb", "sst2"

    def format(self, row: dict) -> str:
        return self.template.format(**{f: row[f] for f in self.fields})


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("sst2", "Sentence: {text} Label:", ("Negative", "Positive"),
                 hub_path="glue", hub_name="sst2", hub_columns={"text": "sentence"},
                 eval_size=872, ft_lr=5e-4, offline="sst2"),
        TaskSpec("sst5", "Sentence: {text} Label:", ("terrible", "bad", "neutral", "good", "great"),
                 hub_path="SetFit/sst5", eval_size=1101, ft_lr=1.6e-4, offline="staicc:sst5"),
        TaskSpec("mr", "Review: {text} Sentiment:", ("Negative", "Positive"),
                 hub_path="rotten_tomatoes", eval_size=1066, ft_lr=3e-3, offline="staicc:rotten_tomatoes"),
        TaskSpec("subj", "Input: {text} Type:", ("objective", "subjective"),
                 hub_path="SetFit/subj", hub_eval="test", eval_size=2000, ft_lr=3e-3,
                 offline="staicc:subjective"),
        TaskSpec("agnews",
                 "Classify the news articles into the categories of World, Sports, Business, and "
                 "Technology. Article: {text} Answer:",
                 ("World", "Sports", "Business", "Technology"),
                 hub_path="ag_news", hub_eval="test", eval_size=2000, ft_lr=0.2, offline="staicc:agnews"),
        # CB always appends "." after the hypothesis.
        TaskSpec("cb", "{premise} Question: {hypothesis}. True, False, or Neither? Answer:",
                 ("True", "False", "Neither"), fields=("premise", "hypothesis"),
                 hub_path="super_glue", hub_name="cb",
                 label_aliases={"entailment": 0, "contradiction": 1, "neutral": 2},
                 eval_size=56, ft_lr=0.08, offline="cb"),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return TASKS[name]
