"""POPE: accuracy, precision, recall, F1 and yes-ratio of yes/no object-existence answers.

Benchmark: Li et al., "Evaluating Object Hallucination in Large Vision-Language Models" (POPE),
EMNLP 2023. Scoring and answer parsing follow LLaVA's ``llava/eval/eval_pope.py``.

Answer parsing (:func:`parse_pope_answer`, verbatim LLaVA rule): keep the text before the first
"." (if any), delete every ",", split on single spaces; the answer is **no** if one of the words is
exactly ``"No"``, ``"not"`` or ``"no"`` (case-sensitive), otherwise **yes**. So "No, there is not."
-> no, "There is no dog" -> no, but "NO", "Not really", "Nope" and "no\\n..." -> yes (LLaVA strips
the generated text, so the last rarely matters).

Labels: "no" is the negative class, everything else positive (LLaVA maps ``label == 'no'`` -> 0,
else 1); here a label must be yes/no (any case) or a bool/int, anything else is an error.

With "yes" as the positive class::

    accuracy  = (TP + TN) / (TP + TN + FP + FN)
    precision = TP / (TP + FP)        recall = TP / (TP + FN)
    F1        = 2 * precision * recall / (precision + recall)
    yes_ratio = (TP + FP) / N         (share of "yes" predictions)

LLaVA divides by zero where a denominator is 0; here that ratio is 0.0. LLaVA evaluates each POPE
split (adversarial / popular / random) on its own;
:func:`vtc.data.eval_score.score_benchmark` does the same and also reports the mean over splits.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = ["POPEMetrics", "parse_pope_answer", "pope_label"]


def parse_pope_answer(text: str) -> str:
    """LLaVA's POPE answer rule -> "yes" or "no" (see the module docstring)."""
    text = str(text)
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_label(label) -> bool:
    """True for a positive ("yes") label, False for "no"."""
    if isinstance(label, bool):
        return label
    if isinstance(label, int):
        return label != 0
    s = str(label).strip().lower()
    if s not in ("yes", "no"):
        raise ValueError(f"POPE label must be yes or no, got {label!r}")
    return s == "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


class POPEMetrics(Metric):
    """Confusion counts of yes/no answers (states ``tp fp tn fn``, ``dist_reduce_fx="sum"``).

    ``update(preds: list[str], labels: list[str | bool | int])`` with the raw generated answers;
    ``compute()`` -> ``{"acc", "precision", "recall", "f1", "yes_ratio"}`` as Python floats in
    [0, 1] (all 0.0 before any update).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], labels: Sequence) -> None:
        if len(preds) != len(labels):
            raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
        tp = fp = tn = fn = 0
        for p, lab in zip(preds, labels):
            yes = parse_pope_answer(p) == "yes"
            pos = pope_label(lab)
            tp += yes and pos
            fp += yes and not pos
            tn += (not yes) and (not pos)
            fn += (not yes) and pos
        self.tp += tp
        self.fp += fp
        self.tn += tn
        self.fn += fn

    def compute(self) -> dict[str, float]:
        tp, fp, tn, fn = (float(x) for x in (self.tp, self.fp, self.tn, self.fn))
        n = tp + fp + tn + fn
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        return {
            "acc": _ratio(tp + tn, n),
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(tp + fp, n),
        }
