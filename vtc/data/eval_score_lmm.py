"""Scoring MMBench (CircularEval), VizWiz and SEED-Bench answers offline; called by
:func:`vtc.data.eval_score.score_benchmark` (file formats: :mod:`vtc.data.eval_lmm`,
:mod:`vtc.data.mmbench`; metrics: :mod:`vtc.metrics.mmbench`, :mod:`vtc.metrics.vizwiz`,
:mod:`vtc.metrics.seed_bench`).

Returned keys (fractions; ``n`` and ``n_*`` counts):

* mmbench, mmbench_cn: ``acc`` (CircularEval over questions, VLMEvalKit's ``Overall``),
  ``acc_<category>``, ``acc_l2_<l2-category>`` (``report_acc``), ``acc_first`` (the first pass
  alone: the row as the TSV lists it, round 0: accuracy without CircularEval), ``n`` (questions),
  ``n_passes`` (answers), ``n_unresolved`` (passes in which no option could be inferred; VLMEvalKit
  would ask its GPT judge), ``n_missing`` (questions without any answer);
* vizwiz: ``acc``, ``acc_<answer type>`` (``acc_other``, ``acc_unanswerable``, ``acc_yes_no``,
  ``acc_number``), ``unanswerable_f1`` / ``_precision`` / ``_recall``, ``n``, ``n_missing``;
* seed_bench: ``acc``, ``acc_<question type>``, ``n``, ``n_missing``. LLaVA's script counts an
  unanswered question as wrong; here it is ``n_missing`` and left out, as for every vtc benchmark.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

from vtc.data.eval_files import question_key, read_answers
from vtc.data.eval_lmm import MMBENCH, read_seed_gt, read_vizwiz_gt, read_vizwiz_questions
from vtc.data.eval_match import accuracy_by_type, match_answers
from vtc.data.mmbench import LETTERS, read_mmbench_gt
from vtc.metrics.mmbench import MMBenchCircularAccuracy
from vtc.metrics.seed_bench import SeedBenchAccuracy
from vtc.metrics.vizwiz import VizWizAccuracy, VizWizUnanswerableF1

__all__ = ["mmbench_groups", "score_lmm_benchmark"]


def mmbench_groups(answers: list[dict], gt: Mapping[str, dict]) -> list[dict]:
    """The answers as CircularEval groups: ``{"group", "preds", "targets", "category"?,
    "l2_category"?}`` per question, passes ordered by (TSV index, round), so the first is the
    question as listed. A pass's right letter is where the row's answer went among the options it
    showed (``option_char``: their letters in the file; LLaVA's answers record both)."""
    groups: dict[int, list] = {}
    seen, unknown = set(), []
    for a in answers:
        k = question_key(a["question_id"])
        g = gt.get(k)
        if g is None:
            unknown.append(a["question_id"])
            continue
        rnd = int(a.get("round_id") or 0)
        if (k, rnd) in seen:
            raise ValueError(f"question {a['question_id']!r} round {rnd} is answered more than once")
        seen.add((k, rnd))
        shown = list(a.get("options") or g["options"])
        chars = list(a.get("option_char") or LETTERS[: len(shown)])
        if g["answer"] not in chars or len(chars) != len(shown):
            raise ValueError(f"question {a['question_id']!r}: answer {g['answer']!r} is not among the options "
                             f"shown {chars} (wrong files?)")
        target = (LETTERS[chars.index(g["answer"])], dict(zip(LETTERS, shown)))
        groups.setdefault(g["group"], []).append((int(k), rnd, str(a["text"]), target, g))
    if unknown:
        raise ValueError(f"{len(unknown)} MMBench answers have no row in the TSV (wrong files?), e.g. {unknown[:5]}")
    out = []
    for group, passes in sorted(groups.items()):
        passes.sort(key=lambda p: (p[0], p[1]))
        main = next((p[4] for p in passes if p[0] == group), passes[0][4])  # the row whose index is the group's
        rec = {"group": group, "preds": [p[2] for p in passes], "targets": [p[3] for p in passes]}
        rec.update({k: main[k] for k in ("category", "l2_category") if k in main})
        out.append(rec)
    return out


def _score_mmbench(answers, gt) -> dict[str, float]:
    if isinstance(gt, (str, os.PathLike)):
        gt = read_mmbench_gt(gt)
    groups = mmbench_groups(answers, gt)

    def types(_, g):
        return tuple(t for t in (g.get("category"), g.get("l2_category") and f"l2_{g['l2_category']}") if t)

    pairs = [(g["preds"], g) for g in groups]
    out = accuracy_by_type(MMBenchCircularAccuracy, pairs, lambda p, g: (p, g["targets"]), types)
    total = MMBenchCircularAccuracy()
    if groups:
        total.update([g["preds"] for g in groups], [g["targets"] for g in groups])
    n = int(total.total)
    out["acc_first"] = int(total.first_hits) / n if n else 0.0
    out.update(n=float(n), n_passes=float(total.passes), n_unresolved=float(total.unresolved),
               n_missing=float(len({g["group"] for g in gt.values()}) - n))
    return out


def _score_vizwiz(answers, gt, questions) -> dict[str, float]:
    if isinstance(gt, (str, os.PathLike)):
        gt = read_vizwiz_gt(gt)
    image_of = {}
    if questions is not None:
        qs = read_vizwiz_questions(questions) if isinstance(questions, (str, os.PathLike)) else list(questions)
        image_of = {question_key(q["question_id"]): str(q["image"]).replace("\\", "/").split("/")[-1]
                    for q in qs if q.get("image")}

    def by_image(a):  # VizWiz's annotations are per image; LLaVA's answers carry the question id
        return image_of.get(question_key(a["question_id"]))

    pairs, missing = match_answers(answers, gt, key=by_image, fallback=lambda a: question_key(a["question_id"]))
    out = accuracy_by_type(VizWizAccuracy, pairs, lambda a, g: (a["text"], g["answers"]),
                           lambda a, g: g.get("answer_type"))
    flagged = [(a["text"], g["answerable"]) for a, g in pairs if g.get("answerable") is not None]
    if flagged:
        f1 = VizWizUnanswerableF1()
        f1.update([p for p, _ in flagged], [a for _, a in flagged])
        out.update({f"unanswerable_{k}": v for k, v in f1.compute().items()})
    out.update(n=float(len(pairs)), n_missing=float(missing))
    return out


def _score_seed(answers, gt, options: Mapping) -> dict[str, float]:
    if isinstance(gt, (str, os.PathLike)):
        gt = read_seed_gt(gt, options.get("data_type", "image"))
    pairs, missing = match_answers(answers, gt)
    out = accuracy_by_type(SeedBenchAccuracy, pairs, lambda a, g: (a["text"], g["answer"]),
                           lambda a, g: g.get("question_type"), rule=options.get("rule", "llava"))
    out.update(n=float(len(pairs)), n_missing=float(missing))
    return out


def score_lmm_benchmark(name: str, answers, gt, questions=None, **options) -> dict[str, float]:
    """Score ``answers`` (a path, paths or records) of ``name`` (mmbench, mmbench_cn, vizwiz,
    seed_bench) against ``gt`` (a path or its reader's result); keys in the module docstring.
    ``questions``: VizWiz's question file (its answers meet the annotations by image).
    ``options``: seed_bench ``data_type`` ("image"; None: all) and ``rule`` ("llava" | "letter")."""
    if gt is None:
        raise ValueError(f"{name}: ground truth needed (benchmark.gt); null writes the answers only")
    answers = read_answers(answers)
    if name in MMBENCH:
        return _score_mmbench(answers, gt)
    if name == "vizwiz":
        return _score_vizwiz(answers, gt, questions)
    if name == "seed_bench":
        return _score_seed(answers, gt, options)
    raise ValueError(f"{name!r} is not an LMM benchmark scored here; one of {(*MMBENCH, 'vizwiz', 'seed_bench')}")
