"""Scoring LLaVA-format answers against a benchmark's ground truths, with :mod:`vtc.metrics`.

Separate from reading the files (:mod:`vtc.data.eval_files`, :mod:`vtc.data.eval_gt`): this is
the matching of answers to ground truths and the per-benchmark choice of metric, the part that
decides the reported numbers.

:func:`score_benchmark` matches answers to ground truths and feeds the metrics of
:mod:`vtc.metrics`; answers without a ground truth and repeated answers are errors (a mismatch of
files), ground truths without an answer are counted in ``n_missing`` and not scored. The video
benchmarks (``VIDEO_BENCHMARKS``: Video-LLaVA's open-ended QA, MVBench) are scored here too,
offline (:func:`_score_video`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

from vtc.data.eval_files import question_key, read_answers, read_questions
from vtc.data.eval_gt import BENCHMARKS, VIDEO_BENCHMARKS, mme_key, read_gt, read_pope_gt, read_scienceqa_gt
from vtc.data.eval_lmm import JUDGED, LMM_BENCHMARKS
from vtc.data.eval_match import accuracy_by_type as _accuracy_by_type
from vtc.data.eval_match import match_answers as _match
from vtc.data.eval_score_lmm import score_lmm_benchmark
from vtc.data.video_qa import ACTIVITYNET_QA_TYPES, read_video_qa_answers
from vtc.metrics.exact_match import ExactMatchAccuracy, TextVQAAccuracy
from vtc.metrics.mme import MMEScore
from vtc.metrics.mvbench import MVBenchAccuracy, mvbench_prediction, option_letter
from vtc.metrics.pope import POPEMetrics
from vtc.metrics.scienceqa import ScienceQAAccuracy
from vtc.metrics.vqav2 import VQAv2Accuracy

__all__ = ["score_benchmark"]


def _textvqa_question(prompt: str) -> str | None:
    """The question inside a LLaVA TextVQA prompt, lower-cased (``eval_textvqa.prompt_processor``)."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        return m.group(1).lower() if m else None
    if "Reference OCR token: " in prompt and len(lines) == 3:
        return (lines[1] if prompt.startswith("Reference OCR token:") else lines[0]).lower()
    if len(lines) == 2:
        return lines[0].lower()
    return None


def _activitynet_types(g: Mapping) -> tuple[str, ...]:
    """ActivityNet-QA's type name, and "free" for types 3-8 (the paper's Free column)."""
    t = g.get("answer_type")
    if t is None:
        return ()
    name = ACTIVITYNET_QA_TYPES.get(int(t), f"type_{t}")
    return (name, "free") if int(t) >= 3 else (name,)


def _score_video(name: str, answers, gt, questions, options: Mapping) -> dict[str, float]:
    """Video benchmarks, offline (no judge model).

    Open-ended (msvd_qa, msrvtt_qa, activitynet_qa): normalised exact match of the prediction and
    the reference answer (:class:`~vtc.metrics.exact_match.ExactMatchAccuracy`, the VQA
    normalisation by default: lower-case, punctuation and articles removed, number words as
    digits), ``acc`` and for ActivityNet-QA ``acc_<type>`` (motion, spatial_relationship,
    temporal_relationship, yes_no, color, object, location, number, other, free). NOT the papers'
    number: Video-LLaVA (and Video-ChatGPT before it) report GPT-3.5's yes/no verdict ("accuracy")
    and 0-5 score from ``eval_video_qa.py``, which accepts synonyms and paraphrases; run that judge
    on :func:`vtc.data.video_qa.write_video_qa_answers`'s file for comparable numbers.

    mvbench: ``acc`` (pooled, MVBench's "Avg") and ``acc_<task>``, by MVBench's ``check_ans``
    (option ``rule="letter"``: by the option letter) on ``return_prompt + first line`` of each
    answer (option ``return_prompt``: ``"("`` when the answer turn was pre-filled with
    ``"Best option:("``); ``n_no_letter``: answers without an option letter (see
    :mod:`vtc.metrics.mvbench`: MVBench counts an empty answer as right).
    """
    answers = read_video_qa_answers(answers)
    missing = None
    if name == "mvbench":
        if gt is None:
            raise ValueError("mvbench: ground truth needed (MVBench's json folder)")
        if not isinstance(gt, Mapping):
            gt = read_gt(name, gt)
        ret = str(options.get("return_prompt", ""))
        pairs, missing = _match(answers, gt)
        out = _accuracy_by_type(MVBenchAccuracy, pairs, lambda a, g: (mvbench_prediction(a["text"], ret), g["gt"]),
                                lambda a, g: g.get("task"), rule=options.get("rule", "mvbench"))
        out["n_no_letter"] = float(sum(option_letter(mvbench_prediction(a["text"], ret)) is None for a, _ in pairs))
    else:
        if gt is None:
            if any("answer" not in a for a in answers):
                raise ValueError(f"{name}: no ground truth given and some answers carry no 'answer'")
            gt = {question_key(a["question_id"]): {"answer": a["answer"], **({"answer_type": a["answer_type"]}
                                                                            if "answer_type" in a else {})}
                  for a in answers}
            pairs, _ = _match(answers, gt)
        else:
            if not isinstance(gt, Mapping):
                gt = read_gt(name, gt, questions=questions)
            pairs, missing = _match(answers, gt)
        type_of = (lambda a, g: _activitynet_types(g)) if name == "activitynet_qa" else (lambda a, g: None)
        out = _accuracy_by_type(ExactMatchAccuracy, pairs, lambda a, g: (a["text"], g["answer"]), type_of,
                                normalizer=options.get("normalizer", "vqa"))
    out["n"] = float(len(pairs))
    if missing is not None:
        out["n_missing"] = float(missing)
    return out


def score_benchmark(name: str, answers, gt=None, *, questions=None, **options) -> dict[str, float]:
    """Score LLaVA-format answers on benchmark ``name`` (one of ``BENCHMARKS`` or ``VIDEO_BENCHMARKS``).

    ``answers``: an answers file path, a list of paths, or records ``{question_id, text,
    prompt?}``. ``gt``: a ground-truth path (read with that benchmark's reader) or what the reader
    returned; ``exact`` may take none. ``questions``: the question file (POPE categories, POPE's
    label folder, MME categories). ``options``: ``official_gt`` (vqav2), ``strict`` and ``split``
    (scienceqa), ``normalizer`` (exact; default "vqa").

    Returns floats: ``n`` (answers scored), ``n_missing`` (ground truths without an answer; not
    for exact-from-records, nor scienceqa without ``split``), and

    * gqa: ``acc``, ``acc_binary``, ``acc_open`` (fractions; LLaVA's GQA conversion + exact match);
    * vqav2: ``acc`` and ``acc_<answer type>`` (``acc_yes_no``, ``acc_number``, ``acc_other``);
    * textvqa: ``acc``;
    * pope: per category ``<category>/{acc,precision,recall,f1,yes_ratio}``, and the same five
      names at top level: the mean over categories (or the pooled values without categories);
    * mme: :class:`~vtc.metrics.mme.MMEScore`'s keys (points, not fractions);
    * scienceqa: ``acc``, ``img_acc``;
    * exact: ``acc`` and ``acc_<question_type>`` when the answers carry ``question_type``;
    * mmbench, mmbench_cn, vizwiz, seed_bench: :mod:`vtc.data.eval_score_lmm` (MMBench's
      CircularEval: ``acc``, ``acc_<category>``, ``acc_l2_<l2-category>``, ``acc_first``; VizWiz:
      ``acc``, ``acc_<answer type>``, ``unanswerable_f1``; SEED-Bench: ``acc``, ``acc_<type>``);
    * msvd_qa, msrvtt_qa, activitynet_qa, mvbench: :func:`_score_video` (answers may also be
      Video-LLaVA's ``{id, question, answer, pred}`` records; options ``normalizer``, and
      ``rule`` and ``return_prompt`` for mvbench).
    """
    if name in VIDEO_BENCHMARKS:
        return _score_video(name, answers, gt, questions, options)
    if name in LMM_BENCHMARKS:
        return score_lmm_benchmark(name, answers, gt, questions, **options)
    if name in JUDGED:
        raise ValueError(f"{name} is graded by a GPT-4 judge, not offline (vtc.data.eval_lmm.judge_note)")
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; one of {BENCHMARKS + VIDEO_BENCHMARKS}")
    answers = read_answers(answers)
    if isinstance(gt, (str, os.PathLike)):
        if name == "pope":
            gt = read_pope_gt(gt, questions)
        elif name == "scienceqa":
            gt = read_scienceqa_gt(gt, options.get("split"))
        else:
            gt = read_gt(name, gt)
    elif gt is None and name != "exact":
        raise ValueError(f"{name}: ground truth needed")

    if name == "gqa":
        pairs, missing = _match(answers, gt)
        out = _accuracy_by_type(ExactMatchAccuracy, pairs, lambda a, g: (a["text"], g["answer"]),
                                lambda a, g: g.get("answer_type"), normalizer="gqa")
    elif name == "vqav2":
        pairs, missing = _match(answers, gt)
        out = _accuracy_by_type(VQAv2Accuracy, pairs, lambda a, g: (a["text"], g["answers"]),
                                lambda a, g: g.get("answer_type"), official_gt=options.get("official_gt", True))
    elif name == "textvqa":
        index = {}
        for k, g in gt.items():
            if "image_id" in g and "question" in g:
                index.setdefault((str(g["image_id"]), str(g["question"]).lower()), k)

        def by_image_question(a):  # LLaVA's TextVQA question_id is the image id
            q = _textvqa_question(str(a.get("prompt", "")))
            return index.get((question_key(a["question_id"]), q)) if q is not None else None

        pairs, missing = _match(answers, gt, fallback=by_image_question)
        out = _accuracy_by_type(TextVQAAccuracy, pairs, lambda a, g: (a["text"], g["answers"]), lambda a, g: None)
    elif name == "pope":
        if questions is not None:
            qs = read_questions(questions) if isinstance(questions, (str, os.PathLike)) else list(questions)
            cat_of = {question_key(q["question_id"]): q.get("category") for q in qs}
            gt = {k: ({**g, "category": cat_of[k]} if not g.get("category") and cat_of.get(k) else g) for k, g in gt.items()}
        pairs, missing = _match(answers, gt)
        per_cat: dict[str, POPEMetrics] = {}
        for a, g in pairs:
            per_cat.setdefault(g.get("category") or "", POPEMetrics()).update([a["text"]], [g["label"]])
        if set(per_cat) - {""} and "" in per_cat:
            raise ValueError("POPE: some ground truths have a category and some do not")
        out = {}
        results = {c: m.compute() for c, m in sorted(per_cat.items())}
        if "" in results or not results:
            out.update(results.get("", POPEMetrics().compute()))
        else:
            for c, r in results.items():
                out.update({f"{c}/{k}": v for k, v in r.items()})
            for k in next(iter(results.values())):
                out[k] = sum(r[k] for r in results.values()) / len(results)
    elif name == "mme":
        cat_of = {}
        if questions is not None:
            qs = read_questions(questions) if isinstance(questions, (str, os.PathLike)) else list(questions)
            cat_of = {question_key(q["question_id"]): q["category"] for q in qs if q.get("category")}

        def key(a):
            qid = question_key(a["question_id"])
            category = a.get("category") or cat_of.get(qid) or qid.split("/")[0]
            if "prompt" not in a:
                raise ValueError(f"MME answer {qid!r} has no prompt: the prompt tells its two questions apart")
            return mme_key(category, qid, a["prompt"])

        pairs, missing = _match(answers, gt, key=key)
        metric = MMEScore()
        if pairs:
            metric.update([a["text"] for a, _ in pairs], [g["answer"] for _, g in pairs],
                          [g["category"] for _, g in pairs], [g["image"] for _, g in pairs])
        out = metric.compute()
    elif name == "scienceqa":
        pairs, missing = _match(answers, gt)
        metric = ScienceQAAccuracy(strict=options.get("strict", False))
        if pairs:
            metric.update([a["text"] for a, _ in pairs], [g["answer"] for _, g in pairs],
                          [g["n_choices"] for _, g in pairs], [g["has_image"] for _, g in pairs])
        out = metric.compute()
        if options.get("split") is None:
            missing = None
    else:  # exact
        missing = None
        if gt is None:
            if any("answer" not in a for a in answers):
                raise ValueError("exact: no ground truth given and some answers carry no 'answer'")
            gt = {question_key(a["question_id"]): str(a["answer"]) for a in answers}
            pairs, _ = _match(answers, gt)
        else:
            pairs, missing = _match(answers, gt)
        out = _accuracy_by_type(ExactMatchAccuracy, pairs, lambda a, g: (a["text"], g),
                                lambda a, g: a.get("question_type"), normalizer=options.get("normalizer", "vqa"))
    out["n"] = float(len(pairs))
    if missing is not None:
        out["n_missing"] = float(missing)
    return out
