"""ScienceQA multiple-choice accuracy, overall and on the IMG subset.

Benchmark: Lu et al., "Learn to Explain: Multimodal Reasoning via Thought Chains for Science
Question Answering" (ScienceQA), NeurIPS 2022; problems.json gives each problem's ``choices`` and
the 0-based ``answer`` index, and ``image`` (null without an image context). Scoring follows
LLaVA's ``llava/eval/eval_science_qa.py`` (LLaVA-1.5)::

    acc     = #{problems whose parsed letter index == answer} / #problems
    img_acc = the same over the problems with an image context (the paper's IMG column)

A prediction that cannot be parsed, or names a letter beyond the problem's choices, is wrong
(LLaVA-1.5's ``get_pred_idx`` returns -1; LLaVA-1's picked a random choice).

Letter parsing, :func:`parse_choice`. ``strict=True`` is LLaVA-1.5's rule verbatim, with the
options A..E:

1. the whole text is an option letter ("B");
2. the text is at least 3 characters, starts with a letter and then ". " ("B. cat");
3. ``re.findall(r"The answer is ([A-Z]).", text)`` has exactly one match (note the "." is any
   character, so "The answer is B" at the very end does not match).

The default (``strict=False``) accepts a superset, for short-answer prompts: the text is stripped
and letters go up to Z; (1) a lone letter, optionally in parentheses and followed by ".", ")" or
":" ("B", "B.", "(B)", "B)", "B: cat", "B. cat"); (2) LLaVA's "X. " prefix; (3) the letters
captured by ``[Tt]he answer is:? \\(?([A-Z])\\b`` (so "The answer is B" and "the answer is (B)."),
taken when all matches agree. Everything LLaVA-1.5 accepts with a valid letter is accepted the
same way, except that repeated identical "The answer is X" sentences also count.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = ["ScienceQAAccuracy", "parse_choice"]

_LLAVA_OPTIONS = "ABCDE"
_LLAVA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
_LONE_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.:)]|$)(?:\s|$)")
_ANSWER_IS = re.compile(r"[Tt]he answer is:? ?\(?([A-Z])\b")


def parse_choice(text: str, n_choices: int, strict: bool = False) -> int:
    """The 0-based choice index named by ``text``, or -1 (unparsable or beyond ``n_choices``)."""
    text = str(text)
    if strict:
        options = _LLAVA_OPTIONS
        if text in options:
            letter = text
        elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
            letter = text[0]
        else:
            found = _LLAVA_ANSWER_IS.findall(text)
            letter = found[0] if len(found) == 1 else None
    else:
        options = string.ascii_uppercase
        t = text.strip()
        m = _LONE_LETTER.match(t)
        if m:
            letter = m.group(1)
        elif len(t) >= 3 and t[0] in options and t[1:3] == ". ":
            letter = t[0]
        else:
            found = set(_ANSWER_IS.findall(t))
            letter = found.pop() if len(found) == 1 else None
    if letter is None or letter not in options[:n_choices]:
        return -1
    return options.index(letter)


class ScienceQAAccuracy(Metric):
    """ScienceQA accuracy (module docstring).

    ``update(preds: list[str], answers: list[int], n_choices: list[int], has_image: list[bool] |
    None = None)``; ``compute()`` -> ``{"acc"}`` plus ``"img_acc"`` once an image problem was seen,
    Python floats in [0, 1]. States ``correct total img_correct img_total``, ``dist_reduce_fx="sum"``.
    ``strict=True`` parses with LLaVA-1.5's exact rule (see :func:`parse_choice`).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, strict: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.strict = strict
        for name in ("correct", "total", "img_correct", "img_total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], answers: Sequence[int], n_choices: Sequence[int],
               has_image: Sequence[bool] | None = None) -> None:
        if has_image is None:
            has_image = [False] * len(preds)
        if not (len(preds) == len(answers) == len(n_choices) == len(has_image)):
            raise ValueError("preds, answers, n_choices and has_image must have the same length")
        c = ic = it = 0
        for p, a, n, img in zip(preds, answers, n_choices, has_image):
            ok = parse_choice(p, int(n), self.strict) == int(a)
            c += ok
            ic += ok and bool(img)
            it += bool(img)
        self.correct += c
        self.total += len(preds)
        self.img_correct += ic
        self.img_total += it

    def compute(self) -> dict[str, float]:
        total, img_total = int(self.total), int(self.img_total)
        out = {"acc": int(self.correct) / total if total else 0.0}
        if img_total:
            out["img_acc"] = int(self.img_correct) / img_total
        return out
