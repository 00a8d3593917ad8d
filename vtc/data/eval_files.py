"""Evaluation files in LLaVA's formats, and benchmark scoring (data only: no model code).

Question files (LLaVA ``playground/data/eval/*/``): JSONL, one question a line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a ...?\\n...", "category": "adversarial"}

``image`` is relative to an image folder (:func:`image_path`); ``category`` is optional (POPE
split, MME category). A JSON list in LLaVA's conversation format (ScienceQA's
``llava_test_CQM-A.json``: ``{"id", "image"?, "conversations": [{"from": "human", "value"}, ...]}``)
is read too: ``question_id = id`` and ``text`` = the first turn without ``<image>``, as LLaVA's
``model_vqa_science.py`` builds its prompt.

Answers file (what LLaVA's ``model_vqa*.py`` write; :func:`write_answers`)::

    {"question_id": ..., "prompt": ..., "text": <generated answer>, "answer_id": <short uuid>, "model_id": ..., "metadata": {}}

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
=========== =================================================================================

:func:`score_benchmark` matches answers to ground truths and feeds the metrics of
:mod:`vtc.metrics`; answers without a ground truth and repeated answers are errors (a mismatch of
files), ground truths without an answer are counted in ``n_missing`` and not scored.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from vtc.metrics.exact_match import ExactMatchAccuracy, TextVQAAccuracy
from vtc.metrics.mme import MME_CATEGORIES, MMEScore, canonical_category
from vtc.metrics.pope import POPEMetrics, pope_label
from vtc.metrics.scienceqa import ScienceQAAccuracy
from vtc.metrics.vqav2 import VQAv2Accuracy

__all__ = [
    "BENCHMARKS",
    "image_path",
    "make_answer",
    "mme_key",
    "read_answers",
    "read_exact_gt",
    "read_gqa_gt",
    "read_gt",
    "read_mme_gt",
    "read_pope_gt",
    "read_questions",
    "read_scienceqa_gt",
    "read_textvqa_gt",
    "read_vqav2_gt",
    "score_benchmark",
    "write_answers",
    "write_questions",
]

PathLike = str | os.PathLike
BENCHMARKS = ("gqa", "vqav2", "textvqa", "pope", "mme", "scienceqa", "exact")


# -- JSON / JSONL -------------------------------------------------------------------------------
def _read_json_any(path: PathLike):
    """A ``.jsonl`` file (or any file whose text is not one JSON value) -> list of records;
    otherwise the JSON value."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass  # JSONL under another name (POPE's coco_pope_*.json)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return out


def _write_jsonl(path: PathLike, records: Iterable[Mapping], append: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if append:
        with path.open("a", encoding="utf-8") as f:
            f.write(lines)
    else:  # whole file or nothing
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(lines, encoding="utf-8")
        os.replace(tmp, path)
    return path


def _records(src) -> list[dict]:
    """A path (JSON list or JSONL), a list of paths (concatenated, e.g. LLaVA's per-chunk answer
    files) or an iterable of dicts -> list of dicts."""
    if isinstance(src, (str, os.PathLike)):
        data = _read_json_any(src)
        if not isinstance(data, list):
            raise ValueError(f"{src}: expected a JSON list or JSONL records")
        return data
    src = list(src)
    if src and all(isinstance(s, (str, os.PathLike)) for s in src):
        return [r for s in src for r in _records(s)]
    return [dict(r) for r in src]


def _qid(x) -> str:
    return str(x)


def _gt_records(gt) -> list[dict]:
    """JSON list / JSONL, or a JSON object {qid: record-or-value} -> records with question_id."""
    if isinstance(gt, (str, os.PathLike)):
        gt = _read_json_any(gt)
    if isinstance(gt, Mapping):
        return [{"question_id": k, **v} if isinstance(v, Mapping) else {"question_id": k, "answer": v} for k, v in gt.items()]
    return [dict(r) for r in gt]


# -- questions and images -----------------------------------------------------------------------
def read_questions(path: PathLike) -> list[dict]:
    """LLaVA question file -> ``[{"question_id", "image"?, "text", "category"?, ...}]`` (see the
    module docstring; the conversation-format JSON list is converted)."""
    out = []
    for r in _records(path):
        if "conversations" in r and "text" not in r:
            first = r["conversations"][0]["value"]
            q = {"question_id": r.get("question_id", r.get("id")), "text": first.replace("<image>", "").strip()}
            if r.get("image"):
                q["image"] = r["image"]
            q.update({k: v for k, v in r.items() if k not in ("id", "conversations", "question_id")})
            r = q
        if "question_id" not in r or "text" not in r:
            raise ValueError(f"{path}: question record without question_id/text: {str(r)[:200]}")
        out.append(r)
    return out


def write_questions(path: PathLike, questions: Iterable[Mapping]) -> Path:
    """Write a LLaVA question file (JSONL)."""
    return _write_jsonl(path, questions)


def image_path(question: Mapping, image_folder: PathLike) -> Path | None:
    """``image_folder / question["image"]``, or None for a text-only question."""
    image = question.get("image")
    return Path(image_folder) / image if image else None


# -- answers ------------------------------------------------------------------------------------
_SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def _short_uuid() -> str:
    """22 characters over shortuuid's 57-letter alphabet, like LLaVA's ``shortuuid.uuid()``."""
    n, out = uuid.uuid4().int, []
    for _ in range(22):
        n, r = divmod(n, len(_SHORTUUID_ALPHABET))
        out.append(_SHORTUUID_ALPHABET[r])
    return "".join(out)


def make_answer(question_id, prompt: str, text: str, model_id: str, metadata: Mapping | None = None,
                answer_id: str | None = None) -> dict:
    """One answers-file record, keys in LLaVA's order."""
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": answer_id or _short_uuid(),
        "model_id": model_id,
        "metadata": dict(metadata or {}),
    }


def write_answers(path: PathLike, answers: Iterable[Mapping], model_id: str | None = None, append: bool = False) -> Path:
    """Write answers in LLaVA's answer-file format. Each input needs ``question_id`` and ``text``;
    ``prompt`` defaults to "", ``answer_id`` is generated when absent, ``model_id`` is the record's
    or the argument, ``metadata`` defaults to {}; other keys go into ``metadata``. Without
    ``append`` the file is replaced in one step."""
    std = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    out = []
    for a in answers:
        if "question_id" not in a or "text" not in a:
            raise ValueError(f"an answer needs question_id and text: {str(dict(a))[:200]}")
        meta = {**dict(a.get("metadata") or {}), **{k: v for k, v in a.items() if k not in std}}
        out.append(make_answer(a["question_id"], a.get("prompt", ""), a["text"], a.get("model_id", model_id),
                               meta, a.get("answer_id")))
    return _write_jsonl(path, out, append=append)


def read_answers(src) -> list[dict]:
    """Answers file(s) (a path or a list of paths, concatenated) or records -> list of dicts."""
    out = _records(src)
    for r in out:
        if "question_id" not in r or "text" not in r:
            raise ValueError(f"answer record without question_id/text: {str(r)[:200]}")
    return out


# -- ground truths ------------------------------------------------------------------------------
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
        out[_qid(r["question_id"])] = rec
    return out


def _answer_strings(answers) -> list[str]:
    return [str(a["answer"]) if isinstance(a, Mapping) else str(a) for a in answers]


def read_vqav2_gt(path) -> dict[str, dict]:
    """VQAv2 annotations -> ``{qid: {"answers": [10 str], "answer_type"?, "question_type"?}}``."""
    data = _read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(data, Mapping) and "annotations" in data:
        data = data["annotations"]
    out = {}
    for r in _gt_records(data):
        rec = {"answers": _answer_strings(r["answers"])}
        for k in ("answer_type", "question_type"):
            if r.get(k) is not None:
                rec[k] = r[k]
        out[_qid(r["question_id"])] = rec
    return out


def read_textvqa_gt(path) -> dict[str, dict]:
    """TextVQA annotations -> ``{qid: {"answers": [10 str], "image_id"?, "question"?}}``."""
    data = _read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(data, Mapping) and "data" in data:
        data = data["data"]
    out = {}
    for r in _gt_records(data):
        rec = {"answers": _answer_strings(r["answers"])}
        for k in ("image_id", "question"):
            if r.get(k) is not None:
                rec[k] = r[k]
        out[_qid(r["question_id"])] = rec
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
            labels = [r["label"] for r in _records(f)]
            cat_qs = [q for q in qs if q.get("category") == category]
            if len(cat_qs) != len(labels):
                raise ValueError(f"{f.name}: {len(labels)} labels but {len(cat_qs)} questions of category {category!r}")
            for q, lab in zip(cat_qs, labels):
                out[_qid(q["question_id"])] = {"label": "yes" if pope_label(lab) else "no", "category": category}
        return out
    cat_of = {_qid(q["question_id"]): q.get("category") for q in qs}
    for r in _gt_records(path):
        qid = _qid(r["question_id"])
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
    data = _read_json_any(path) if isinstance(path, (str, os.PathLike)) else path
    out = {}
    for r in _gt_records(data):
        if split is not None and r.get("split") != split:
            continue
        out[_qid(r["question_id"])] = {
            "answer": int(r["answer"]),
            "n_choices": len(r["choices"]),
            "has_image": r.get("image") is not None,
            **({"split": r["split"]} if "split" in r else {}),
        }
    return out


def read_exact_gt(path) -> dict[str, str]:
    """``{qid: answer}`` from JSONL/JSON list ``{question_id, answer}`` or a JSON object."""
    return {_qid(r["question_id"]): str(r["answer"]) for r in _gt_records(path)}


_READERS = {
    "gqa": read_gqa_gt,
    "vqav2": read_vqav2_gt,
    "textvqa": read_textvqa_gt,
    "pope": read_pope_gt,
    "mme": read_mme_gt,
    "scienceqa": read_scienceqa_gt,
    "exact": read_exact_gt,
}


def read_gt(name: str, path, **kwargs):
    """The reader of benchmark ``name`` (``BENCHMARKS``) applied to ``path``."""
    if name not in _READERS:
        raise ValueError(f"unknown benchmark {name!r}; one of {BENCHMARKS}")
    return _READERS[name](path, **kwargs)


# -- scoring ------------------------------------------------------------------------------------
def _type_key(t: str) -> str:
    return "acc_" + re.sub(r"[^0-9A-Za-z]+", "_", str(t)).strip("_")


def _match(answers: list[dict], gt: Mapping, key=lambda a: _qid(a["question_id"]), fallback=None):
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


def _accuracy_by_type(metric_cls, pairs, pred_target, type_of, **metric_kwargs) -> dict[str, float]:
    """``acc`` over all pairs and ``acc_<type>`` per type (one batched update per group)."""
    groups: dict[str | None, tuple[list, list]] = {None: ([], [])}
    for a, g in pairs:
        p, t = pred_target(a, g)
        typ = type_of(a, g)
        for key in (None, typ) if typ else (None,):
            preds, targets = groups.setdefault(key, ([], []))
            preds.append(p)
            targets.append(t)
    out = {}
    for typ, (preds, targets) in groups.items():
        metric = metric_cls(**metric_kwargs)
        if preds:
            metric.update(preds, targets)
        out["acc" if typ is None else _type_key(typ)] = float(metric.compute()) if preds else 0.0
    return {"acc": out.pop("acc"), **dict(sorted(out.items()))}


def score_benchmark(name: str, answers, gt=None, *, questions=None, **options) -> dict[str, float]:
    """Score LLaVA-format answers on benchmark ``name`` (one of ``BENCHMARKS``).

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
    * exact: ``acc`` and ``acc_<question_type>`` when the answers carry ``question_type``.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; one of {BENCHMARKS}")
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
            return index.get((_qid(a["question_id"]), q)) if q is not None else None

        pairs, missing = _match(answers, gt, fallback=by_image_question)
        out = _accuracy_by_type(TextVQAAccuracy, pairs, lambda a, g: (a["text"], g["answers"]), lambda a, g: None)
    elif name == "pope":
        if questions is not None:
            qs = read_questions(questions) if isinstance(questions, (str, os.PathLike)) else list(questions)
            cat_of = {_qid(q["question_id"]): q.get("category") for q in qs}
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
            cat_of = {_qid(q["question_id"]): q["category"] for q in qs if q.get("category")}

        def key(a):
            qid = _qid(a["question_id"])
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
            gt = {_qid(a["question_id"]): str(a["answer"]) for a in answers}
            pairs, _ = _match(answers, gt)
        else:
            pairs, missing = _match(answers, gt)
        out = _accuracy_by_type(ExactMatchAccuracy, pairs, lambda a, g: (a["text"], g),
                                lambda a, g: a.get("question_type"), normalizer=options.get("normalizer", "vqa"))
    out["n"] = float(len(pairs))
    if missing is not None:
        out["n_missing"] = float(missing)
    return out
