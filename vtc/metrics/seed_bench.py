"""SEED-Bench multiple-choice accuracy (image questions), as LLaVA-1.5 scores it.

Benchmark: Li et al., "SEED-Bench: Benchmarking Multimodal LLMs with Generative Comprehension",
CVPR 2024 (arXiv 2307.16125); ``SEED-Bench.json`` holds ``questions`` (``question_id``,
``answer`` "A".."D", ``question_type_id``, ``data_type`` "image" | "video", ...) and
``question_type`` ``{name: id}``. LLaVA-1.5 prompts with the options as "A. ..." lines and "Answer
with the option's letter from the given choices directly." and scores with
``scripts/convert_seed_for_submission.py`` ``eval_single``::

    correct  <=>  answer_record["text"] == question["answer"]        (rule "llava", the default)

accuracy per ``question_type_id`` and over all questions of a ``data_type`` (LLaVA prints
"image accuracy"; the paper's "SEED-Bench-IMG" column). LLaVA's generation is stripped, so "A" is
right and "A." or "A. One" are wrong. ``rule="letter"`` reads the letter with
:func:`vtc.metrics.scienceqa.parse_choice` instead (a lone letter, "(A)", "A.", "A. One", "The
answer is A"): not LLaVA's number, for models that do not answer with the bare letter.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vtc.metrics.scienceqa import parse_choice

__all__ = ["RULES", "SeedBenchAccuracy", "seed_correct"]

RULES = ("llava", "letter")
_LETTERS = "ABCD"


def seed_correct(text: str, answer: str, rule: str = "llava") -> bool:
    """One question by ``rule`` (module docstring); ``answer`` is the letter A-D."""
    if rule == "llava":
        return str(text) == str(answer)
    if rule == "letter":
        i = parse_choice(str(text), len(_LETTERS))
        return i >= 0 and _LETTERS[i] == str(answer).strip().upper()
    raise ValueError(f"unknown SEED-Bench rule {rule!r}; one of {RULES}")


class SeedBenchAccuracy(Metric):
    """Fraction of answers equal to the answer letter (``rule``: see the module docstring).

    ``update(preds: list[str], answers: list[str])``; ``compute()`` -> 0-dim float64 tensor in
    [0, 1], 0 before any update. States ``correct`` and ``total``, ``dist_reduce_fx="sum"``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, rule: str = "llava", **kwargs):
        super().__init__(**kwargs)
        if rule not in RULES:
            raise ValueError(f"unknown SEED-Bench rule {rule!r}; one of {RULES}")
        self.rule = rule
        for name in ("correct", "total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], answers: Sequence[str]) -> None:
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions for {len(answers)} answers")
        self.correct += sum(seed_correct(p, a, self.rule) for p, a in zip(preds, answers))
        self.total += len(preds)

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.correct.to(torch.float64) / self.total
