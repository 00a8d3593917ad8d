"""MMBench's CircularEval accuracy, with VLMEvalKit's exact-matching answer extraction.

Benchmark: Liu et al., "MMBench: Is Your Multi-modal Model an All-around Player?", arXiv
2307.06281 (ECCV 2024), Sec. 3.1 "CircularEval": a question with N options is asked N times, its
options circularly shifted each time, and counts as solved only if *every* pass is answered
correctly. The official implementation is VLMEvalKit's (github.com/open-compass/VLMEvalKit):

* ``vlmeval/dataset/utils/multiple_choice.py`` ``mcq_circular_eval`` / ``prefetch_circular_group``:
  the passes of a question are the TSV rows whose ``index % 1e6`` is that question's index (the
  released TSVs hold the shifted copies as rows ``index + k * 1e6``); a group is a hit only if the
  option extracted from each pass equals that pass's answer letter. Reported by ``report_acc``:
  ``Overall`` and the mean hit per ``l2-category`` and per ``category``;
* ``vlmeval/utils/matching_util.py`` ``can_infer`` = ``can_infer_option`` then ``can_infer_text``
  (read at commit 0bccf4527f, before a later change added a "the answer is X" regex), which
  :func:`infer_choice` follows:

  1. ``can_infer_option``: a refusal phrase ("Sorry, I can't help with images of people yet.",
     "I can't process this file.", "I'm sorry, but without the image provided", "Cannot determine
     the answer") gives ``Z``; otherwise each of ``.()[],:;!*#{}`` becomes a space and the text is
     split on whitespace. If exactly one option letter occurs as a word and it is among the last
     four words, that letter; no letter but a word ``Z`` gives ``Z``; else nothing;
  2. ``can_infer_text``: the answer lower-cased, if not longer than twice the options' total
     length, names the option whose (lower-cased) text it contains, when exactly one does.

  VLMEvalKit then asks a GPT judge for the passes that stay unresolved; offline (its
  ``exact_matching`` mode, ``model=None``) such a pass is wrong, and so is ``Z``. This module is
  that offline mode: numbers can sit slightly below a GPT-judged run for models that answer in
  sentences; :class:`MMBenchCircularAccuracy` counts the unresolved passes (``unresolved``) so
  that this shows.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

__all__ = ["MMBenchCircularAccuracy", "can_infer_option", "can_infer_text", "infer_choice"]

_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_SEPARATORS = ".()[],:;!*#{}"


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_option``: the option letter (or ``"Z"``) named in ``answer``."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in _REFUSALS):
        return "Z"
    text = answer
    for c in _SEPARATORS:
        text = text.replace(c, " ")
    words = text.split()
    named = [c for c in choices if c in words]
    if len(named) == 1:
        # the letter must be one of the last four words ("A cat is on the mat" names no option)
        return named[0] if words.index(named[0]) > len(words) - 5 else None
    if not named and "Z" in words:
        return "Z"
    return None


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer_text``: the one option whose text the answer contains."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else None


def infer_choice(answer: str, choices: Mapping[str, str]) -> str | None:
    """VLMEvalKit's ``can_infer``: option letter, ``"Z"`` (refusal / none of them), or None."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


class MMBenchCircularAccuracy(Metric):
    """CircularEval accuracy over questions, each a list of passes (module docstring).

    ``update(preds, targets)``: ``preds[i]`` the answers of question i's passes,
    ``targets[i]`` the matching ``(answer letter, {letter: option text})`` of each pass (the
    options as that pass showed them). A question is a hit when every pass's
    :func:`infer_choice` equals its letter. ``compute()`` -> 0-dim float64 tensor: hits /
    questions (0 before any update). Also counted: ``first_hits`` (questions whose first pass is
    right: the accuracy without CircularEval), ``passes`` and ``unresolved`` (passes in which no
    option could be inferred). States are sums (``dist_reduce_fx="sum"``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("hits", "first_hits", "total", "passes", "unresolved"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Sequence[str]], targets: Sequence[Sequence[tuple[str, Mapping[str, str]]]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predicted questions for {len(targets)} targets")
        hits = first = passes = unresolved = 0
        for pred, target in zip(preds, targets):
            if isinstance(pred, str) or len(pred) != len(target) or not pred:
                raise ValueError("each question needs a non-empty list of passes, one target per pass")
            ok = []
            for text, (letter, choices) in zip(pred, target):
                got = infer_choice(text, choices)
                unresolved += got is None
                ok.append(got == letter)
            hits += all(ok)
            first += ok[0]
            passes += len(ok)
        self.hits += hits
        self.first_hits += first
        self.total += len(preds)
        self.passes += passes
        self.unresolved += unresolved

    def compute(self) -> torch.Tensor:
        if int(self.total) == 0:
            return torch.tensor(0.0, dtype=torch.float64)
        return self.hits.to(torch.float64) / self.total
