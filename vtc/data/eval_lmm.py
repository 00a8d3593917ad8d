"""Files of the LMM benchmarks LLaVA-1.5 reports beyond the VQA sets: questions, ground truths,
answers and the files their servers or judges take (data only: no model code).

=============== ===================================================================================
mmbench,        the TSV (:mod:`vtc.data.mmbench`): questions, images (base64) and, for dev, the
mmbench_cn      answers in one file; submission: the prediction table of LLaVA's
                ``convert_mmbench_for_submission.py`` (as TSV)
vizwiz          LLaVA's ``vizwiz/llava_test.jsonl`` (or VizWiz's own ``val.json`` /
                ``test.json``: :func:`read_vizwiz_questions`); gt: VizWiz's ``val.json``
                ``[{image, question, answers: [{answer, answer_confidence}] x10, answer_type,
                answerable}]``, matched by image; submission: ``[{"image", "answer"}]``
                (``convert_vizwiz_for_submission.py``)
seed_bench      LLaVA's ``llava-seed-bench.jsonl``; gt: ``SEED-Bench.json`` ``{"question_type":
                {name: id}, "questions": [{question_id, answer, question_type_id, data_type}]}``;
                upload file: ``{"question_id", "prediction"}`` per line
                (``convert_seed_for_submission.py``)
vqav2           test-dev submission for EvalAI: ``[{"question_id", "answer"}]``
                (``convert_vqav2_for_submission.py``)
mmvet           ``{"v1_<question_id>": answer}`` (``convert_mmvet_for_eval.py``), what MM-Vet's
                GPT-4 grader reads
llavabench      the answers file itself: ``llava/eval/eval_gpt_review_bench.py --answer-list``
=============== ===================================================================================

LLaVA's scripts are read at github.com/haotian-liu/LLaVA commit c121f04 (``scripts/`` and
``scripts/v1_5/eval/*.sh``). Answers for the servers go through EvalAI's answer processor, as
LLaVA's converters do (:func:`vtc.metrics.normalize.normalize_answer_evalai`).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from vtc.data.eval_files import question_key, read_answers, read_json_any, read_questions, read_records
from vtc.data.mmbench import mmbench_questions, write_mmbench_submission
from vtc.metrics.normalize import normalize_answer_evalai

log = logging.getLogger(__name__)

__all__ = [
    "JUDGED",
    "LMM_BENCHMARKS",
    "MMBENCH",
    "judge_note",
    "load_benchmark_questions",
    "read_seed_gt",
    "read_vizwiz_gt",
    "read_vizwiz_questions",
    "submission_path",
    "write_submission",
]

MMBENCH = ("mmbench", "mmbench_cn")
LMM_BENCHMARKS = (*MMBENCH, "vizwiz", "seed_bench")  # scored offline
JUDGED = ("mmvet", "llavabench")  # scored by a GPT-4 judge: answers only
SEED_VIDEO_FRAMES = "SEED-Bench-video-image"  # LLaVA's folder of SEED's video middle frames
VQAV2_TEST = "llava_vqav2_mscoco_test2015.jsonl"  # the question list LLaVA's converter iterates
_SUBMISSION_SUFFIX = {"mmbench": "_submission.tsv", "mmbench_cn": "_submission.tsv", "vizwiz": "_submission.json",
                      "vqav2": "_submission.json", "seed_bench": "_submission.jsonl", "mmvet": "_results.json"}


def _image_name(image) -> str:
    return str(image).replace("\\", "/").split("/")[-1]


# -- questions and ground truths ------------------------------------------------------------------
def read_vizwiz_questions(path) -> list[dict]:
    """LLaVA's VizWiz question file, or VizWiz's ``val.json`` / ``test.json`` (records with
    ``question`` but no ``text``: ``question_id`` = the image's stem, ``text`` = the question)."""
    records = read_records(path)
    if records and "text" not in records[0] and "question" in records[0]:
        return [{"question_id": _image_name(r["image"]).rsplit(".", 1)[0], "image": r["image"], "text": r["question"]}
                for r in records]
    return read_questions(path)


def read_vizwiz_gt(path) -> dict[str, dict]:
    """VizWiz annotations -> ``{image file name: {"answers": [str], "answer_type"?, "answerable"?}}``;
    records without ``image`` are keyed by ``question_id`` instead."""
    out = {}
    for r in read_records(path) if isinstance(path, (str, os.PathLike)) else list(path):
        if "answers" not in r:
            raise ValueError(f"{path}: VizWiz record without 'answers' (val.json has them; test.json does not)")
        rec = {"answers": [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in r["answers"]]}
        for k in ("answer_type", "answerable"):
            if r.get(k) is not None:
                rec[k] = r[k]
        out[_image_name(r["image"]) if r.get("image") else question_key(r["question_id"])] = rec
    return out


def read_seed_gt(path, data_type: str | None = "image") -> dict[str, dict]:
    """``SEED-Bench.json`` -> ``{qid: {"answer", "question_type", "data_type"}}``, only
    ``data_type``'s questions (None: all), ``question_type`` the type's name."""
    data = read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(data, Mapping) or "questions" not in data:
        raise ValueError(f"{path}: not SEED-Bench.json (a JSON object with 'questions' and 'question_type')")
    names = {int(v): k for k, v in (data.get("question_type") or {}).items()}
    out = {}
    for q in data["questions"]:
        if data_type is not None and q.get("data_type") != data_type:
            continue
        t = q.get("question_type_id")
        out[question_key(q["question_id"])] = {"answer": str(q["answer"]), "data_type": q.get("data_type"),
                                               "question_type": names.get(int(t), f"type_{t}") if t is not None else None}
    return out


def load_benchmark_questions(spec: Mapping) -> list[dict]:
    """What eval.py asks for benchmark ``spec``: MMBench's passes (``spec["all_rounds"]``; every
    pass of the first ``spec["limit"]`` questions),
    VizWiz's questions in either format, SEED-Bench's ``options.data_type`` questions only (by
    the ground truth, or without one by the image folder: LLaVA keeps video frames in
    ``SEED-Bench-video-image/``); otherwise the LLaVA question file."""
    name, path = spec["name"], spec["questions"]
    if name in MMBENCH:
        return mmbench_questions(path, spec.get("all_rounds"), limit=spec.get("limit"))
    if name == "vizwiz":
        return read_vizwiz_questions(path)
    questions = read_questions(path)
    if name == "seed_bench":
        data_type = (spec.get("options") or {}).get("data_type", "image")
        if spec.get("gt") is not None:
            keep = read_seed_gt(spec["gt"], data_type)
            questions = [q for q in questions if question_key(q["question_id"]) in keep]
        elif data_type == "image":
            questions = [q for q in questions if not str(q.get("image", "")).startswith(SEED_VIDEO_FRAMES + "/")]
        if not questions:
            raise ValueError(f"{path}: no SEED-Bench questions of data_type {data_type!r}")
    return questions


# -- files for the servers and judges -------------------------------------------------------------
def submission_path(spec: Mapping, answers_path) -> Path | None:
    """Where the benchmark's upload / judge file goes: beside the answers file, ``<stem>_submission.*``
    (``<stem>_results.json`` for MM-Vet); None for benchmarks without one."""
    suffix = _SUBMISSION_SUFFIX.get(spec["name"])
    if suffix is None:
        return None
    p = Path(answers_path)
    return p.with_name(p.stem + suffix)


def _dump_json(path: Path, obj, indent=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _vqav2_ids(spec: Mapping, questions: list[dict]) -> list:
    """The question ids EvalAI's VQAv2 file must list: LLaVA's converter iterates the whole
    test2015 list (``benchmark.submission_questions``, default ``llava_vqav2_mscoco_test2015.jsonl``
    beside the question file), answering "" where test-dev asked nothing."""
    src = spec.get("submission_questions") or Path(spec["questions"]).parent / VQAV2_TEST
    if os.path.isfile(src):
        return [q["question_id"] for q in read_records(src)]
    log.warning("vqav2: %s not found; the submission lists only the %d asked questions (EvalAI's VQAv2 "
                "phases expect every test2015 question: give benchmark.submission_questions)", src, len(questions))
    return [q["question_id"] for q in questions]


def write_submission(spec: Mapping, answers_path, questions: list[dict]) -> Path | None:
    """Write the file LLaVA's converter makes from ``answers_path`` (module docstring); returns its
    path, or None where the benchmark has none (or a scored VizWiz / VQAv2 run: the servers take
    test answers only)."""
    name, path = spec["name"], submission_path(spec, answers_path)
    if path is None or (name in ("vizwiz", "vqav2") and spec.get("gt") is not None):
        return None
    answers = read_answers(answers_path)
    if name in MMBENCH:
        return write_mmbench_submission(path, spec["questions"], answers)
    text = {question_key(a["question_id"]): str(a["text"]) for a in answers}
    if name == "mmvet":  # convert_mmvet_for_eval.py: {"v1_<qid>": text}, indent 2
        return _dump_json(path, {f"v1_{a['question_id']}": a["text"] for a in answers}, indent=2)
    if name == "vqav2":
        ids = _vqav2_ids(spec, questions)
        return _dump_json(path, [{"question_id": i, "answer": normalize_answer_evalai(text[question_key(i)])
                                  if question_key(i) in text else ""} for i in ids])
    if name == "vizwiz":
        asked = [q for q in questions if question_key(q["question_id"]) in text]
        if len(asked) < len(questions):
            log.warning("vizwiz: %d questions unanswered (benchmark.limit?); the server wants all of them",
                        len(questions) - len(asked))
        return _dump_json(path, [{"image": q["image"], "answer": normalize_answer_evalai(text[question_key(q["question_id"])])}
                                 for q in asked])
    # seed_bench: {"question_id", "prediction"} per line, in the ground truth's order when given
    if spec.get("gt") is not None:
        order = list(read_seed_gt(spec["gt"], None))
    else:
        order = [question_key(q["question_id"]) for q in questions]
    ids = {question_key(q["question_id"]): q["question_id"] for q in questions}  # the id as the file spells it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": ids.get(k, k), "prediction": text[k]}) + "\n"
                            for k in order if k in text), encoding="utf-8")
    return path


def judge_note(spec: Mapping, answers_path, extra: Path | None) -> str | None:
    """The log line saying what scores a benchmark that eval.py leaves unscored."""
    name = spec["name"]
    if name == "mmvet":
        return (f"mmvet: answers for MM-Vet's GPT-4 grader in {extra} (github.com/yuweihao/MM-Vet, "
                f"mm-vet_evaluator.py; LLaVA's results/<model>.json)")
    if name == "llavabench":
        return (f"llavabench: score with LLaVA's llava/eval/eval_gpt_review_bench.py --question <questions.jsonl> "
                f"--context <context.jsonl> --rule llava/eval/table/rule.json --answer-list <answers_gpt4.jsonl> "
                f"{answers_path} --output <review.jsonl>, then summarize_gpt_review.py (GPT-4 judge; it pairs the "
                f"files line by line, so every question must be answered, in order)")
    if name in MMBENCH:
        return f"{name}: submission table {extra} (save as .xlsx for the MMBench server)"
    if name in ("vizwiz", "vqav2") and extra is not None:
        return f"{name}: EvalAI submission {extra}"
    if name == "seed_bench" and extra is not None:
        return f"seed_bench: upload file {extra}"
    return None
