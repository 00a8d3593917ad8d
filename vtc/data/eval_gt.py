"""Ground truths of the LLaVA benchmarks, read from their official (or simpler) formats.

Separate from the question / answer files (:mod:`vtc.data.eval_files`) and from the scoring
(:mod:`vtc.data.eval_score`): each reader knows one benchmark's release format and nothing of
metrics; :data:`BENCHMARKS` names the benchmarks that have one.

Ground truths (readers return dicts keyed by ``str(question_id)`` unless said otherwise):

=========== =================================================================================
gqa         official ``testdev_balanced_questions.json`` ``{qid: {"answer", "types", "isBalanced", ...}}``
            (questions with ``isBalanced: false`` are dropped, as GQA's eval.py scores only
            balanced ones), or JSONL/JSON list ``{question_id, answer}``
vqav2       official annotations ``{"annotations": [{"question_id", "answers": [{"answer", ...}] x10,
            "answer_type", "question_type", ...}]}``, or JSONL/JSON list
            ``{question_id, answers: [str] x10, answer_type?}``
textvqa     official ``TextVQA_0.5.1_val.json`` ``{"data": [{"question_id", "image_id", "question",
            "answers": [str] x10, ...}]}``, or JSONL/JSON list ``{question_id, answers}``
pope        JSONL ``{question_id, label: "yes"|"no", category?}``; or the folder of POPE's
            ``coco_pope_<category>.json`` label files (JSONL despite the name) together with the
            question file: LLaVA's eval_pope.py pairs the i-th label of a category with the i-th
            question of that category, and so does :func:`read_pope_gt`
mme         the MME release folder (``<category>/questions_answers_YN/<image>.txt`` or
            ``<category>/<image>.txt``, lines ``question<TAB>Yes|No``), or JSONL
            ``{question_id, image?, text, category?, answer: "Yes"|"No"}``; keyed by
            ``(category, image stem, question)`` because LLaVA's MME question_id is the image
            path, shared by the image's two questions
scienceqa   official ``problems.json`` ``{pid: {"choices", "answer": index, "image", "split", ...}}``
exact       JSONL/JSON list ``{question_id, answer}`` or JSON ``{qid: answer}``; or none, when the
            answers records carry ``"answer"`` themselves (``LMMModule``'s predictions.jsonl)
mmbench,    the dev TSV itself (its ``answer``, ``category``, ``l2-category`` columns;
mmbench_cn  :func:`vtc.data.mmbench.read_mmbench_gt`)
vizwiz      VizWiz's ``val.json``, keyed by image (:func:`vtc.data.eval_lmm.read_vizwiz_gt`)
seed_bench  ``SEED-Bench.json`` (:func:`vtc.data.eval_lmm.read_seed_gt`)
=========== =================================================================================

:data:`JUDGED` (``mmvet``, ``llavabench``) have no offline score: a GPT-4 judge grades them, and
``eval.py`` writes the files it reads (:mod:`vtc.data.eval_lmm`).

Video benchmarks (:data:`VIDEO_BENCHMARKS`; formats in :mod:`vtc.data.video_qa`). Scored by
:func:`vtc.data.eval_score.score_benchmark` too; kept out of :data:`BENCHMARKS` (the image ones)
because ``eval.py benchmark=...`` runs them with another question loop (:mod:`vtc.eval.video_bench`:
videos, not images); ``eval.py`` accepts ``BENCHMARKS + VIDEO_BENCHMARKS``.

============== ==============================================================================
msvd_qa,       Video-LLaVA's ``GPT_Zero_Shot_QA/<dataset>`` folder (``test_q.json`` +
msrvtt_qa,     ``test_a.json``), or ``test_a.json`` (with the question file when its answers carry
activitynet_qa no ``question_id``); or none, when the answers carry ``"answer"`` (Video-LLaVA's
               answers file does)
mvbench        MVBench's ``json/`` folder (one ``<task>.json`` per task) or one task's file
============== ==============================================================================
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from vtc.data.eval_files import question_key, read_json_any, read_questions, read_records
from vtc.data.eval_lmm import JUDGED, LMM_BENCHMARKS, read_seed_gt, read_vizwiz_gt
from vtc.data.mmbench import read_mmbench_gt
from vtc.data.video_qa import read_mvbench_gt, read_video_qa_gt
from vtc.metrics.mme import MME_CATEGORIES, canonical_category
from vtc.metrics.pope import pope_label

__all__ = [
    "BENCHMARKS",
    "JUDGED",
    "VIDEO_BENCHMARKS",
    "mme_key",
    "read_exact_gt",
    "read_gqa_gt",
    "read_gt",
    "read_mme_gt",
    "read_pope_gt",
    "read_scienceqa_gt",
    "read_textvqa_gt",
    "read_vqav2_gt",
]

BENCHMARKS = ("gqa", "vqav2", "textvqa", "pope", "mme", "scienceqa", "exact", *LMM_BENCHMARKS)
VIDEO_BENCHMARKS = ("msvd_qa", "msrvtt_qa", "activitynet_qa", "mvbench")


def _gt_records(gt) -> list[dict]:
    """JSON list / JSONL, or a JSON object {qid: record-or-value} -> records with question_id."""
    if isinstance(gt, (str, os.PathLike)):
        gt = read_json_any(gt)
    if isinstance(gt, Mapping):
        return [{"question_id": k, **v} if isinstance(v, Mapping) else {"question_id": k, "answer": v} for k, v in gt.items()]
    return [dict(r) for r in gt]


def read_gqa_gt(path) -> dict[str, dict]:
    """GQA questions -> ``{qid: {"answer", "answer_type"?}}``; answer_type is "open" when
    ``types.structural == "query"`` else "binary" (GQA eval.py)."""
    out = {}
    for r in _gt_records(path):
        if r.get("isBalanced") is False:
            continue
        rec = {"answer": str(r["answer"])}
        structural = (r.get("types") or {}).get("structural")
        if structural is not None:
            rec["answer_type"] = "open" if structural == "query" else "binary"
        elif r.get("answer_type"):
            rec["answer_type"] = r["answer_type"]
        out[question_key(r["question_id"])] = rec
    return out


def _answer_strings(answers) -> list[str]:
    return [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in answers]


def read_vqav2_gt(path) -> dict[str, dict]:
    """VQAv2 annotations -> ``{qid: {"answers": [10 str], "answer_type"?, "question_type"?}}``."""
    data = read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(data, Mapping) and "annotations" in data:
        data = data["annotations"]
    out = {}
    for r in _gt_records(data):
        rec = {"answers": _answer_strings(r["answers"])}
        for k in ("answer_type", "question_type"):
            if r.get(k) is not None:
                rec[k] = r[k]
        out[question_key(r["question_id"])] = rec
    return out


def read_textvqa_gt(path) -> dict[str, dict]:
    """TextVQA annotations -> ``{qid: {"answers": [10 str], "image_id"?, "question"?}}``."""
    data = read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(data, Mapping) and "data" in data:
        data = data["data"]
    out = {}
    for r in _gt_records(data):
        rec = {"answers": _answer_strings(r["answers"])}
        for k in ("image_id", "question"):
            if r.get(k) is not None:
                rec[k] = r[k]
        out[question_key(r["question_id"])] = rec
    return out


def read_pope_gt(path, questions=None) -> dict[str, dict]:
    """POPE labels -> ``{qid: {"label": "yes"|"no", "category"?}}``. ``path``: a JSONL of
    ``{question_id, label, category?}``, or the folder of ``coco_pope_<category>.json`` files (then
    ``questions``, the LLaVA question file, is required: labels pair with the questions of their
    category by position, as in LLaVA's eval_pope.py). ``questions`` also fills in a missing
    category."""
    qs = read_questions(questions) if isinstance(questions, (str, os.PathLike)) else (list(questions) if questions else [])
    out: dict[str, dict] = {}
    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        if not qs:
            raise ValueError("reading POPE's coco_pope_<category>.json folder needs the question file")
        files = sorted(Path(path).glob("coco_pope_*.json"))
        if not files:
            raise ValueError(f"{path}: no coco_pope_<category>.json files")
        for f in files:
            category = f.name[len("coco_pope_"):-len(".json")]
            labels = [r["label"] for r in read_records(f)]
            cat_qs = [q for q in qs if q.get("category") == category]
            if len(cat_qs) != len(labels):
                raise ValueError(f"{f.name}: {len(labels)} labels but {len(cat_qs)} questions of category {category!r}")
            for q, lab in zip(cat_qs, labels):
                out[question_key(q["question_id"])] = {"label": "yes" if pope_label(lab) else "no", "category": category}
        return out
    cat_of = {question_key(q["question_id"]): q.get("category") for q in qs}
    for r in _gt_records(path):
        qid = question_key(r["question_id"])
        rec = {"label": "yes" if pope_label(r["label"]) else "no"}
        category = r.get("category") or cat_of.get(qid)
        if category:
            rec["category"] = category
        out[qid] = rec
    return out


_MME_SUFFIXES = ("Answer the question using a single word or phrase.", "Please answer yes or no.")


def _mme_question(text: str) -> str:
    """The question without LLaVA's / MME's answer-format suffixes, single-spaced (LLaVA's
    convert_answer_to_mme.py swaps one suffix for the other and tries two spacings)."""
    for s in _MME_SUFFIXES:
        text = text.replace(s, " ")
    return " ".join(text.split())


def _image_stem(name: str) -> str:
    return str(name).replace("\\", "/").split("/")[-1].split(".")[0]


def mme_key(category: str, image: str, question: str) -> tuple[str, str, str]:
    """``(category, image file stem, question without suffixes)``: how MME answers meet their
    ground truths."""
    return canonical_category(category), _image_stem(image), _mme_question(str(question))


def read_mme_gt(path) -> dict[tuple[str, str, str], dict]:
    """MME ground truths -> ``{mme_key: {"answer": "yes"|"no", "category", "image"}}`` from the
    release folder or a JSONL (module docstring)."""
    out: dict[tuple[str, str, str], dict] = {}

    def add(category, image, question, answer, where):
        answer = str(answer).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"{where}: MME answer must be Yes or No, got {answer!r}")
        key = mme_key(category, image, question)
        if key in out:
            raise ValueError(f"{where}: repeated MME question {key}")
        out[key] = {"answer": answer, "category": key[0], "image": f"{key[0]}/{key[1]}"}

    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        lower = {c.lower() for c in MME_CATEGORIES}
        for cat_dir in sorted(p for p in Path(path).iterdir() if p.is_dir() and p.name.lower() in lower):
            qa_dir = cat_dir / "questions_answers_YN" if (cat_dir / "images").is_dir() else cat_dir
            for txt in sorted(qa_dir.glob("*.txt")):
                for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip():
                        question, answer = line.strip().split("\t")
                        add(cat_dir.name, txt.stem, question, answer, f"{txt}:{n}")
        if not out:
            raise ValueError(f"{path}: no MME category folders with question files")
        return out
    for r in _gt_records(path):
        qid = str(r.get("question_id", ""))
        category = r.get("category") or qid.split("/")[0]
        question = r.get("text", r.get("question", r.get("prompt")))
        answer = r.get("answer", r.get("gt_answer", r.get("label")))
        add(category, r.get("image") or qid, question, answer, f"MME record {qid}")
    return out


def read_scienceqa_gt(path, split: str | None = None) -> dict[str, dict]:
    """ScienceQA problems.json -> ``{pid: {"answer": index, "n_choices", "has_image", "split"?}}``,
    only ``split``'s problems when given ("test" for the reported numbers)."""
    data = read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    out = {}
    for r in _gt_records(data):
        if split is not None and r.get("split") != split:
            continue
        out[question_key(r["question_id"])] = {
            "answer": int(r["answer"]),
            "n_choices": len(r["choices"]),
            "has_image": r.get("image") is not None,
            **({"split": r["split"]} if "split" in r else {}),
        }
    return out


def read_exact_gt(path) -> dict[str, str]:
    """``{qid: answer}`` from JSONL/JSON list ``{question_id, answer}`` or a JSON object."""
    return {question_key(r["question_id"]): str(r["answer"]) for r in _gt_records(path)}


_READERS = {
    "gqa": read_gqa_gt,
    "vqav2": read_vqav2_gt,
    "textvqa": read_textvqa_gt,
    "pope": read_pope_gt,
    "mme": read_mme_gt,
    "scienceqa": read_scienceqa_gt,
    "exact": read_exact_gt,
    "mmbench": read_mmbench_gt,
    "mmbench_cn": read_mmbench_gt,
    "vizwiz": read_vizwiz_gt,
    "seed_bench": read_seed_gt,
    "msvd_qa": lambda path, questions=None: read_video_qa_gt(path, questions, "msvd_qa"),
    "msrvtt_qa": lambda path, questions=None: read_video_qa_gt(path, questions, "msrvtt_qa"),
    "activitynet_qa": lambda path, questions=None: read_video_qa_gt(path, questions, "activitynet_qa"),
    "mvbench": read_mvbench_gt,
}


def read_gt(name: str, path, **kwargs):
    """The reader of benchmark ``name`` (``BENCHMARKS`` or ``VIDEO_BENCHMARKS``) applied to ``path``."""
    if name not in _READERS:
        raise ValueError(f"unknown benchmark {name!r}; one of {BENCHMARKS + VIDEO_BENCHMARKS}")
    return _READERS[name](path, **kwargs)
