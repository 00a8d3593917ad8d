"""MVBench multiple-choice accuracy, with MVBench's own answer check.

Benchmark: Li et al., "MVBench: A Comprehensive Multi-modal Video Understanding Benchmark", CVPR
2024; 20 tasks of multiple-choice video QA. Scoring follows MVBench's evaluation notebook,
``video_chat2/mvbench.ipynb`` of github.com/OpenGVLab/Ask-Anything (read at commit 4dd8210b):

* the ground truth is ``"(X) <option text>"`` (``MVBench_dataset.qa_template``: X is the letter of
  the candidate equal to the answer);
* the prediction is what the model generated, ``.strip().split('\\n')[0]`` (first line), with
  the ``return_prompt`` ``"("`` put back in front when the assistant turn was pre-filled with
  ``"Best option:("`` (``infer_mvbench``): :func:`mvbench_prediction`;
* ``check_ans(pred, gt)`` (:func:`check_ans`, verbatim): lower-case both, take the text up to the
  first space of each (``split(' ')[0]``), and count the answer right when the prediction's
  first word with its periods removed is a substring of the ground truth's ``"(x)"``, or
  ``"(x)"`` is a substring of the prediction's first word. So ``"(B) cat"``, ``"B."``, ``"B"``,
  ``"b)"`` and ``"(B)cat"`` match ``"(B) cat"``; ``"The answer is B"`` (first word "the") and
  ``"cat"`` do not;
* accuracy per task (``acc_dict``) and overall (``'Avg'`` = all correct / all questions, pooled;
  MVBench reports percentages, here fractions).

Quirks kept from ``check_ans``: a prediction whose first word is empty (an empty answer, or one
starting with a space before :func:`mvbench_prediction` strips it) or a lone ``"("`` (an empty
answer after the pre-filled ``"Best option:("``) is a substring of every ``"(x)"`` and counts as
*right*; so do ``")"`` and ``"("``-prefixed fragments such as ``"(b"``, and a sentence starting
with the article "A" when the answer is (A). An answer naming the right letter after another
first word (``"Option B"``, ``"The answer is B"``) is wrong. ``MVBenchAccuracy`` therefore
also counts ``no_letter``: predictions in which :func:`vtc.metrics.scienceqa.parse_choice` finds
no option letter, so that a run whose answers are empty shows up.

``rule="letter"`` scores by the option letter instead: :func:`~vtc.metrics.scienceqa.parse_choice`
(a lone letter, ``"(B)"``, ``"B."``, ``"B) cat"``, ``"The answer is B"``) against the ground
truth's letter; no letter, or another one, is wrong. Not MVBench's rule: for comparing with it.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from torchmetrics import Metric

from vtc.metrics.scienceqa import parse_choice

__all__ = ["MVBenchAccuracy", "check_ans", "gt_letter", "mvbench_prediction", "option_letter"]

_GT = re.compile(r"^\(([A-Za-z])\)")
RULES = ("mvbench", "letter")


def check_ans(pred: str, gt: str) -> bool:
    """MVBench's ``check_ans`` (mvbench.ipynb), verbatim but for its dead ``gt_content`` lines."""
    pred_option = pred.lower().split(" ")[0]
    gt_option = gt.lower().split(" ")[0]
    if pred_option.replace(".", "") in gt_option:
        return True
    return gt_option in pred_option


def mvbench_prediction(text: str, return_prompt: str = "") -> str:
    """What MVBench checks: ``return_prompt + text.strip().split('\\n')[0]`` (``infer_mvbench``)."""
    return return_prompt + str(text).strip().split("\n")[0]


def gt_letter(gt: str) -> str:
    """The letter of a ``"(X) option"`` ground truth, upper-case; ValueError otherwise."""
    m = _GT.match(str(gt))
    if not m:
        raise ValueError(f"MVBench ground truth must start with '(X)', got {gt!r}")
    return m.group(1).upper()


def option_letter(pred: str) -> str | None:
    """The option letter :func:`~vtc.metrics.scienceqa.parse_choice` reads in ``pred``, or None."""
    i = parse_choice(str(pred), len(string.ascii_uppercase))
    return None if i < 0 else string.ascii_uppercase[i]


class MVBenchAccuracy(Metric):
    """Fraction of predictions that ``check_ans`` (``rule="mvbench"``, default) or the option
    letter (``rule="letter"``) finds right; see the module docstring.

    ``update(preds: list[str], gts: list[str])`` with the predictions as MVBench checks them (see
    :func:`mvbench_prediction`) and the ``"(X) option"`` ground truths. ``compute()`` -> 0-dim
    float64 tensor in [0, 1], 0 before any update. Also counts ``no_letter`` (predictions without
    an option letter, whatever the rule). States are sums (``dist_reduce_fx="sum"``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, rule: str = "mvbench", **kwargs):
        super().__init__(**kwargs)
        if rule not in RULES:
            raise ValueError(f"unknown MVBench rule {rule!r}; one of {RULES}")
        self.rule = rule
        for name in ("correct", "total", "no_letter"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], gts: Sequence[str]) -> None:
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions for {len(gts)} ground truths")
        correct = no_letter = 0
        for p, g in zip(preds, gts):
            letter = option_letter(p)
            no_letter += letter is None
            if self.rule == "mvbench":
                gt_letter(g)  # a malformed ground truth is an error under both rules
                correct += check_ans(str(p), str(g))
            else:
                correct += letter == gt_letter(g)
        self.correct += correct
        self.total += len(preds)
        self.no_letter += no_letter

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.correct.to(torch.float64) / self.total
