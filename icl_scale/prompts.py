"""Token-level prompt assembly and the greedy fit of demonstrations (DESIGN.md §2.2).

Sequence: <bos> d1 <sep> d2 <sep> ... dK <sep> query answer, each demonstration being
`input answer_gold`; <sep> is the model's end-of-sequence token; the answer is " " + label word,
encoded separately from the input. ZSL is the same with no demonstrations. The prefix
(<bos> ... dK <sep>) is what the evaluation caches once per (task, seed).
"""

from __future__ import annotations

from dataclasses import dataclass

from icl_scale.errors import UserError
from icl_scale.tasks.spec import TaskSpec


@dataclass(frozen=True)
class Encoder:
    """Encodes a task's inputs and answers for one tokenizer."""
    spec: TaskSpec
    tok: object

    def __post_init__(self):
        # the same rows are encoded for every seed and setting: tokenize each once
        object.__setattr__(self, "_inputs", {})
        object.__setattr__(self, "_options", [self.tok.encode(" " + w, add_special_tokens=False)
                                              for w in self.spec.label_words])

    @property
    def bos(self) -> int:
        t = self.tok
        return t.bos_token_id if t.bos_token_id is not None else t.eos_token_id

    @property
    def sep(self) -> int:
        return self.tok.eos_token_id

    def input_ids(self, row: dict) -> list[int]:
        text = self.spec.format(row)
        if text not in self._inputs:
            self._inputs[text] = self.tok.encode(text, add_special_tokens=False)
        return list(self._inputs[text])

    def options(self) -> list[list[int]]:
        return [list(o) for o in self._options]

    def demo_ids(self, row: dict) -> list[int]:
        return self.input_ids(row) + self.options()[row["label"]]


@dataclass(frozen=True)
class Prompt:
    prefix_ids: tuple[int, ...]   # <bos> d1 <sep> ... dK <sep>
    demo_ids: tuple[int, ...]     # example ids of the demonstrations that fit, in order
    k_requested: int

    @property
    def k_effective(self) -> int:
        return len(self.demo_ids)


def query_budget(enc: Encoder, eval_rows: list[dict]) -> int:
    """Tokens the longest eval query needs after the prefix: its input plus the longest answer."""
    return max(len(enc.input_ids(r)) for r in eval_rows) + max(len(o) for o in enc.options())


def fit_prompt(enc: Encoder, demos: list[dict], eval_rows: list[dict], max_length: int) -> Prompt:
    """Add demonstrations in order while prefix + demo + <sep> + longest query fits max_length."""
    budget = query_budget(enc, eval_rows)
    if 1 + budget > max_length:
        longest = max(eval_rows, key=lambda r: len(enc.input_ids(r)))
        raise UserError(f"task {enc.spec.name}: eval example {longest['id']} needs {1 + budget} tokens, "
                        f"more than model.max_length {max_length}")
    prefix, used = [enc.bos], []
    for row in demos:
        piece = enc.demo_ids(row) + [enc.sep]
        if len(prefix) + len(piece) + budget > max_length:
            break
        prefix += piece
        used.append(row["id"])
    return Prompt(tuple(prefix), tuple(used), len(demos))


def zsl_prompt(enc: Encoder) -> Prompt:
    return Prompt((enc.bos,), (), 0)
