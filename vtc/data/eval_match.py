"""Matching answers to ground truths, and accuracy per question type: what every scorer shares.

Split out of :mod:`vtc.data.eval_score` so that the scorers of the LMM benchmarks
(:mod:`vtc.data.eval_score_lmm`) use the same rules without an import cycle: an answer without a
ground truth, or two answers to one question, is an error (the files do not belong together);
ground truths without an answer are counted (``n_missing``) and not scored.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from vtc.data.eval_files import question_key

__all__ = ["accuracy_by_type", "match_answers", "type_key"]


def type_key(t: str) -> str:
    """``acc_<type>`` with every run of non-alphanumerics as one "_" (an MLflow-safe name)."""
    return "acc_" + re.sub(r"[^0-9A-Za-z]+", "_", str(t)).strip("_")


def match_answers(answers: list[dict], gt: Mapping, key=lambda a: question_key(a["question_id"]), fallback=None):
    """Pairs (answer, gt record); errors for unknown or repeated keys; the number of gt entries
    without an answer."""
    pairs, seen, unknown = [], set(), []
    for a in answers:
        k = key(a)
        if k not in gt and fallback is not None:
            k = fallback(a)
        if k is None or k not in gt:
            unknown.append(a["question_id"])
            continue
        if k in seen:
            raise ValueError(f"question {a['question_id']!r} is answered more than once")
        seen.add(k)
        pairs.append((a, gt[k]))
    if unknown:
        raise ValueError(f"{len(unknown)} answers have no ground truth (wrong files?), e.g. {unknown[:5]}")
    return pairs, len(gt) - len(seen)


def accuracy_by_type(metric_cls, pairs, pred_target, type_of, **metric_kwargs) -> dict[str, float]:
    """``acc`` over all pairs and ``acc_<type>`` per type (one batched update per group);
    ``type_of`` gives a type, None, or a tuple of types (a pair counts in each)."""
    groups: dict[str | None, tuple[list, list]] = {None: ([], [])}
    for a, g in pairs:
        p, t = pred_target(a, g)
        typ = type_of(a, g)
        types = tuple(typ) if isinstance(typ, (tuple, list)) else ((typ,) if typ else ())
        for k in (None, *types):
            preds, targets = groups.setdefault(k, ([], []))
            preds.append(p)
            targets.append(t)
    out = {}
    for typ, (preds, targets) in groups.items():
        metric = metric_cls(**metric_kwargs)
        if preds:
            metric.update(preds, targets)
        out["acc" if typ is None else type_key(typ)] = float(metric.compute()) if preds else 0.0
    return {"acc": out.pop("acc"), **dict(sorted(out.items()))}
