"""VizWiz-VQA accuracy and unanswerability, as the VizWiz evaluation computes them.

Benchmark: Gurari et al., "VizWiz Grand Challenge: Answering Visual Questions from Blind People",
CVPR 2018; 10 crowd answers per question, ``answer_type`` one of ``other``, ``yes/no``,
``number``, ``unanswerable``, and ``answerable`` (0/1). Scoring follows the VizWiz API's
``vqaEval.py`` (Qing Li's evaluation code linked from vizwiz.org, ``VQAEval.evaluate`` and
``evaluate_unanswerability``):

* the result answer: newlines/tabs -> spaces, strip, ``processPunctuation``,
  ``processDigitArticle`` (the VQA processing, :func:`vtc.metrics.normalize.normalize_answer`);
  the 10 ground-truth answers are compared **unprocessed** (unlike VQAv2's script, which
  punctuation-processes them when annotators disagree; the VizWiz annotations are stored
  lower-case). Per question, ``1/n * sum_i min(1, #{j != i: gt_j == pred} / 3)`` over the n
  answers (:func:`vtc.metrics.vqav2.leave_one_out_accuracy`), averaged over questions, overall and
  per ``answer_type`` (the leaderboard's Overall / Yes/No / Number / Other / Unanswerable);
* a prediction is "unanswerable" when its processed text is exactly ``unanswerable`` (the API's
  ``get_answerable_preds``); ``f1`` of the unanswerable class against ``answerable == 0`` (the
  API's ``f1_score(1 - answerable, 1 - pred)``).

What is scored is what LLaVA submits: ``scripts/convert_vizwiz_for_submission.py`` puts each answer
through EvalAI's answer processor (:func:`vtc.metrics.normalize.normalize_answer_evalai`), and the
server then applies the processing above; :func:`vizwiz_prediction` is the two in a row. That is
also how "Unanswerable", the answer LLaVA-1.5's prompt asks for, becomes the annotations'
``unanswerable``. The VizWiz API writes its contraction table with typographic apostrophes
("dont" -> "don’t"); vtc's table has straight ones, which only matters for a prediction that is an
apostrophe-less contraction.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vtc.metrics.exact_match import TextVQAAccuracy
from vtc.metrics.normalize import normalize_answer, normalize_answer_evalai
from vtc.metrics.vqav2 import leave_one_out_accuracy

__all__ = ["UNANSWERABLE", "VizWizAccuracy", "VizWizUnanswerableF1", "vizwiz_prediction"]

UNANSWERABLE = "unanswerable"


def vizwiz_prediction(text: str) -> str:
    """The answer as the VizWiz server compares it: LLaVA's EvalAI processing, then the VQA one."""
    return normalize_answer(normalize_answer_evalai(text))


class VizWizAccuracy(TextVQAAccuracy):
    """Mean VizWiz soft accuracy (module docstring): TextVQA's leave-one-out average, with the
    prediction processed as the VizWiz server does and the annotators' answers compared as stored.

    ``update(preds, answers)``: the model's raw answers and, per question, the annotators' answer
    strings. ``compute()`` -> 0-dim float64 tensor in [0, 1], 0 before any update.
    """

    def soft_score(self, pred: str, gts: list[str]) -> float:
        return leave_one_out_accuracy(vizwiz_prediction(pred), gts)


class VizWizUnanswerableF1(Metric):
    """F1 of predicting "unanswerable" against the annotation's ``answerable == 0``.

    ``update(preds, answerable)``: raw answers and the 0/1 ``answerable`` flags. ``compute()`` ->
    ``{"f1", "precision", "recall"}`` (floats; 0.0 where a denominator is 0, as sklearn's
    ``zero_division`` warning case returns). States ``tp fp fn``, summed across processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], answerable: Sequence[int]) -> None:
        if len(preds) != len(answerable):
            raise ValueError(f"{len(preds)} predictions for {len(answerable)} answerable flags")
        tp = fp = fn = 0
        for p, a in zip(preds, answerable):
            said = vizwiz_prediction(p) == UNANSWERABLE
            truth = int(a) == 0
            tp += said and truth
            fp += said and not truth
            fn += truth and not said
        self.tp += tp
        self.fp += fp
        self.fn += fn

    def compute(self) -> dict[str, float]:
        tp, fp, fn = int(self.tp), int(self.fp), int(self.fn)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"f1": f1, "precision": precision, "recall": recall}
