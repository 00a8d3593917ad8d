"""Question and answer files of LLaVA's evaluation, read and written (data only: no model code).

Separate from the ground truths (:mod:`vtc.data.eval_gt`) and the scoring
(:mod:`vtc.data.eval_score`): generating answers (:mod:`vtc.eval.bench`) needs only these two
formats, and both other modules build on the JSON / JSONL readers here.

Question files (LLaVA ``playground/data/eval/*/``): JSONL, one question a line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a ...?\\n...", "category": "adversarial"}

``image`` is relative to an image folder (:func:`image_path`); ``category`` is optional (POPE
split, MME category). A JSON list in LLaVA's conversation format (ScienceQA's
``llava_test_CQM-A.json``: ``{"id", "image"?, "conversations": [{"from": "human", "value"}, ...]}``)
is read too: ``question_id = id`` and ``text`` = the first turn without ``<image>``, as LLaVA's
``model_vqa_science.py`` builds its prompt.

Answers file (what LLaVA's ``model_vqa*.py`` write; :func:`write_answers`)::

    {"question_id": ..., "prompt": ..., "text": <generated answer>, "answer_id": <short uuid>, "model_id": ..., "metadata": {}}
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "image_path",
    "make_answer",
    "read_answers",
    "read_questions",
    "write_answers",
    "write_questions",
]

PathLike = str | os.PathLike


# -- JSON / JSONL -------------------------------------------------------------------------------
def read_json_any(path: PathLike):
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


def write_jsonl(path: PathLike, records: Iterable[Mapping], append: bool = False) -> Path:
    """``json.dumps(record)`` per line (LLaVA's and Video-LLaVA's answer files); without ``append``
    the file is replaced in one step."""
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


def read_records(src) -> list[dict]:
    """A path (JSON list or JSONL), a list of paths (concatenated, e.g. LLaVA's per-chunk answer
    files) or an iterable of dicts -> list of dicts."""
    if isinstance(src, (str, os.PathLike)):
        data = read_json_any(src)
        if not isinstance(data, list):
            raise ValueError(f"{src}: expected a JSON list or JSONL records")
        return data
    src = list(src)
    if src and all(isinstance(s, (str, os.PathLike)) for s in src):
        return [r for s in src for r in read_records(s)]
    return [dict(r) for r in src]


def question_key(x) -> str:
    """What answers and ground truths are matched by: the question id as a string (files hold
    ints or strings)."""
    return str(x)


# -- questions and images -----------------------------------------------------------------------
def read_questions(path: PathLike) -> list[dict]:
    """LLaVA question file -> ``[{"question_id", "image"?, "text", "category"?, ...}]`` (see the
    module docstring; the conversation-format JSON list is converted)."""
    out = []
    for r in read_records(path):
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
    return write_jsonl(path, questions)


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
    return write_jsonl(path, out, append=append)


def read_answers(src) -> list[dict]:
    """Answers file(s) (a path or a list of paths, concatenated) or records -> list of dicts."""
    out = read_records(src)
    for r in out:
        if "question_id" not in r or "text" not in r:
            raise ValueError(f"answer record without question_id/text: {str(r)[:200]}")
    return out
