"""VQAv2 accuracy: the official leave-one-out soft accuracy.

Reference: the official VQA evaluation, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
(github.com/GT-Vision-Lab/VQA; Antol et al., ICCV 2015; Goyal et al., CVPR 2017). Per question,
with the n = 10 annotator answers ``g_1..g_n`` and the normalised prediction ``p``::

    acc(p) = 1/n * sum_i min(1, #{j != i : g_j == p} / 3)

i.e. the "min(#humans that said p / 3, 1)" score averaged over the n leave-one-out subsets of
n - 1 annotators. With k of the n answers equal to p this is
``(k * min(1, (k-1)/3) + (n-k) * min(1, k/3)) / n``; for n = 10: k=0 -> 0, 1 -> 0.3, 2 -> 0.6,
3 -> 0.9, k >= 4 -> 1. The benchmark score is the mean over questions (the official script prints
100x this, rounded to 2 decimals; we return the fraction).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vtc.metrics.normalize import normalize_answer, process_punctuation

__all__ = ["VQAv2Accuracy", "leave_one_out_accuracy", "official_gt_answers"]


def leave_one_out_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """``1/n * sum_i min(1, #{j != i: gt_j == pred} / 3)`` over the n given answers (already
    normalised; compared as strings)."""
    n = len(gt_answers)
    if n == 0:
        raise ValueError("a question needs at least one ground-truth answer")
    k = sum(1 for g in gt_answers if g == pred)
    # annotator i agrees with pred: k - 1 others match; disagrees: all k match
    return (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n


def official_gt_answers(answers: Sequence[str]) -> list[str]:
    """Ground-truth answers as the official script compares them: only when the annotators
    disagree (more than one distinct raw string) is ``processPunctuation`` applied to every
    answer; number words, articles and case are *not* processed on the ground-truth side (the
    released annotations already hold the processed form)."""
    answers = [str(a) for a in answers]
    if len(set(answers)) > 1:
        return [process_punctuation(a) for a in answers]
    return answers


class VQAv2Accuracy(Metric):
    """VQAv2 soft accuracy (official leave-one-out formula; see the module docstring).

    ``update(preds, answers)``: ``preds`` are the model's answers, ``answers[i]`` the (10)
    annotator answers of question i, raw strings as in the annotation file. The prediction is
    normalised with :func:`~vtc.metrics.normalize.normalize_answer` (the official result-answer
    processing). Ground truths:

    * ``official_gt=True`` (default): as the official script, :func:`official_gt_answers`;
    * ``official_gt=False``: every answer through ``normalize_answer`` too (use it for
      hand-written ground truths such as "Two" that are not in the released processed form).

    ``compute()`` -> 0-dim float64 tensor: mean soft accuracy in [0, 1] (``float()`` it; a tensor
    so that ``LightningModule.log(name, metric)`` accepts it). 0 before any update.
    States: ``score`` (float64 sum of per-question accuracies) and ``total`` (question count),
    both ``dist_reduce_fx="sum"``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, official_gt: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.official_gt = official_gt
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def question_score(self, pred: str, answers: Sequence[str]) -> float:
        if isinstance(answers, str):
            raise TypeError("answers of one question must be a list of strings, not a string")
        gts = official_gt_answers(answers) if self.official_gt else [normalize_answer(a) for a in answers]
        return leave_one_out_accuracy(normalize_answer(pred), gts)

    def update(self, preds: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions for {len(answers)} answer lists")
        self.score += sum(self.question_score(p, a) for p, a in zip(preds, answers))
        self.total += len(preds)

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.score / self.total
