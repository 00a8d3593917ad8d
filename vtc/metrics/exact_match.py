"""Exact-match accuracy (GQA, the synthetic set, generic short answers) and TextVQA soft accuracy.

``ExactMatchAccuracy``: ``acc = #{i : norm(pred_i) == norm(target_i)} / N``, with ``norm`` one of

* ``"vqa"`` (default): the official VQA normalisation, :func:`~vtc.metrics.normalize.normalize_answer`,
  except that by default the word "none" is kept ("none" -> "0" is the official table; the
  synthetic digit-grid set answers "none" for an empty cell and "0" for the digit zero, which
  that mapping would score as each other). ``none_to_zero=True`` restores the official mapping.
* ``"gqa"``: what LLaVA does for GQA (``scripts/convert_gqa_for_eval.py``:
  ``text.rstrip('.').lower()``), then the official GQA ``eval.py`` compares ``predicted == gold``
  (Hudson & Manning, "GQA", CVPR 2019). Applied to both sides (a no-op on GQA's gold answers).
* ``"evalai"``: :func:`~vtc.metrics.normalize.normalize_answer_evalai`;
* ``"strip"``: ``s.strip()`` only; or any ``Callable[[str], str]``.

``TextVQAAccuracy``: the TextVQA accuracy as LLaVA computes it (``llava/eval/m4c_evaluator.py``,
``TextVQAAccuracyEvaluator``, from MMF; Singh et al., "Towards VQA Models That Can Read", CVPR
2019): prediction and the 10 answers go through the EvalAI processor, then the VQA leave-one-out
soft accuracy ``1/10 * sum_i min(1, #{j != i: a_j == pred} / 3)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torchmetrics import Metric

from vtc.metrics.normalize import normalize_answer, normalize_answer_evalai
from vtc.metrics.vqav2 import leave_one_out_accuracy

__all__ = ["ExactMatchAccuracy", "TextVQAAccuracy", "gqa_normalize", "get_normalizer"]


def gqa_normalize(s: str) -> str:
    """LLaVA's GQA answer conversion: ``s.rstrip('.').lower()``."""
    return str(s).rstrip(".").lower()


def _strip(s: str) -> str:
    return str(s).strip()


def get_normalizer(normalizer: str | Callable[[str], str], none_to_zero: bool = False) -> Callable[[str], str]:
    if callable(normalizer):
        return normalizer
    if normalizer == "vqa":
        return partial(normalize_answer, none_to_zero=none_to_zero)
    table = {"gqa": gqa_normalize, "evalai": normalize_answer_evalai, "strip": _strip}
    if normalizer not in table:
        raise ValueError(f"unknown normalizer {normalizer!r}: vqa, gqa, evalai, strip or a callable")
    return table[normalizer]


class _Accuracy(Metric):
    """``score`` (float64 sum of per-question scores) / ``total``, both summed across processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.score / self.total


class ExactMatchAccuracy(_Accuracy):
    """Normalised exact-match accuracy (see the module docstring for the normalisers).

    ``update(preds: list[str], targets: list[str])``; ``compute()`` -> 0-dim float64 tensor in
    [0, 1] (``float()`` it; a tensor so ``LightningModule.log(name, metric)`` accepts it), 0 before
    any update. States ``score`` and ``total`` use ``dist_reduce_fx="sum"``.
    """

    def __init__(self, normalizer: str | Callable[[str], str] = "vqa", none_to_zero: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.normalize = get_normalizer(normalizer, none_to_zero)

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        hits = 0
        for p, t in zip(preds, targets):
            if not isinstance(t, str):
                raise TypeError(f"targets must be strings, got {type(t).__name__} (TextVQAAccuracy takes answer lists)")
            hits += self.normalize(p) == self.normalize(t)
        self.score += hits
        self.total += len(preds)


class TextVQAAccuracy(_Accuracy):
    """TextVQA soft accuracy as LLaVA's ``m4c_evaluator.TextVQAAccuracyEvaluator``.

    ``update(preds: list[str], answers: list[list[str]])`` with the 10 annotator answers per
    question (the official evaluator asserts 10; other counts use the same formula with n).
    ``compute()`` -> 0-dim float64 tensor, the mean soft accuracy in [0, 1].
    """

    def soft_score(self, pred: str, gts: list[str]) -> float:
        return leave_one_out_accuracy(normalize_answer_evalai(pred), [normalize_answer_evalai(a) for a in gts])

    def update(self, preds: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions for {len(answers)} answer lists")
        total = 0.0
        for p, gts in zip(preds, answers):
            if isinstance(gts, str):
                raise TypeError("answers of one question must be a list of strings, not a string")
            total += self.soft_score(p, [str(a) for a in gts])
        self.score += total
        self.total += len(preds)
