"""MMBench / MMBench-CN files: the TSV release, LLaVA's prompts and answers, the submission table.

The TSV (``mmbench_dev_20230712.tsv``, ``mmbench_dev_cn_20231003.tsv``; one row per question,
tab-separated, double-quoted where needed): ``index``, ``question``, ``hint``, ``A`` .. ``D``,
``answer`` (dev only), ``category``, ``l2-category``, ``source``, ``comment``, ``image`` (base64).
The released TSVs already hold CircularEval's shifted copies as rows ``index + k * 1_000_000``
(MMBench's maintainers, open-compass/MMBench issues #8 and #12; VLMEvalKit groups them by
``index % 1e6``, :func:`group_index`). VLMEvalKit's own TSVs store a copy's ``image`` as the index of
the row that holds it (``ImageBaseDataset.prepare_tsv``: a value of at most 64 characters); that is
resolved on reading.

Read as LLaVA reads it (``llava/eval/model_vqa_mmbench.py``, ``pd.read_table``): an empty cell and
pandas' default NA strings ("NA", "N/A", "null", "None", "nan", ...; pandas ``read_csv``
``na_values`` documentation) are missing, and so is anything LLaVA's ``is_none`` calls missing
("nan"/"none" in any case). The options are ``A``, ``B``, ... up to the first missing one
(``get_options``), so a question may have 2 to 4.

Prompt (``eval_model``): ``hint + "\\n" + question`` (the hint only when present), then one line
``"\\n<letter>. <option>"`` per option; ``<image>\\n`` in front and the answer-format line
(``--single-pred-prompt``: "Answer with the option's letter from the given choices directly.",
with ``--lang cn`` "请直接回答选项字母。") after it, which eval.py adds from
``benchmark.prompt_suffix``. With ``--all-rounds`` the question is asked once per option, the
options rotated left by one each round and lettered A, B, ... again (:func:`mmbench_questions`).

Answers file: LLaVA's record ``{question_id: index, round_id, prompt, text, options, option_char,
answer_id, model_id, metadata}``; ``prompt`` is the text without the answer-format line,
``options`` the options in the order shown, ``option_char`` their letters in the *file* (so the
right letter of a round is the position of the row's ``answer`` in ``option_char``).

Submission (``scripts/convert_mmbench_for_submission.py``): the TSV without ``hint``, ``category``,
``source``, ``image``, ``comment``, ``l2-category``, with a ``prediction`` column inserted as the
7th, holding each row's answer text. LLaVA writes it as ``.xlsx`` (pandas + openpyxl, which vtc
does not depend on); :func:`write_mmbench_submission` writes the same table as a TSV: open it and
save as .xlsx for the server. Where a row was asked in several rounds, its round-0 answer (the
options as in the file) is the prediction; LLaVA's converter keeps the last round's, whose letter
refers to rotated options.
"""
from __future__ import annotations

import base64
import csv
import io
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from PIL import Image

from vtc.data.eval_files import make_answer, question_key, write_jsonl

__all__ = [
    "CIRCULAR_OFFSET",
    "group_index",
    "has_circular_copies",
    "is_missing",
    "load_base64_image",
    "mmbench_answer",
    "mmbench_questions",
    "read_mmbench_gt",
    "read_mmbench_tsv",
    "row_options",
    "tsv_columns",
    "write_mmbench_answers",
    "write_mmbench_submission",
]

CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit: g_index = index % 1e6
LETTERS = ("A", "B", "C", "D")  # LLaVA's all_options
# pandas' default NA strings (read_csv na_values), which LLaVA's pd.read_table turns into NaN.
_PANDAS_NA = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                        "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})
_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")  # convert_mmbench_for_submission
_PREDICTION_AT = 6


def is_missing(value) -> bool:
    """pandas' NA on reading, or LLaVA's ``is_none`` ("nan"/"none", any case)."""
    return value is None or str(value) in _PANDAS_NA or str(value).lower() in ("nan", "none")


def read_mmbench_tsv(path) -> list[dict]:
    """The TSV's rows as dicts of strings, ``index`` as int; checks the columns eval needs."""
    # a base64 image is far longer than csv's default field limit (128 KiB)
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in ("index", "question", "A", "B") if c not in header]
        if missing:
            raise ValueError(f"{path}: not an MMBench TSV, no column(s) {missing} (header: {header[:12]})")
        rows = []
        for n, row in enumerate(reader, 2):
            try:
                row["index"] = int(row["index"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}:{n}: index {row['index']!r} is not an integer") from None
            rows.append(row)
    by_index = {r["index"]: r for r in rows}
    for r in rows:  # VLMEvalKit's TSVs store a copy's image as its source row's index (prepare_tsv)
        ref = r.get("image") or ""
        if 0 < len(ref) <= 64:
            src = by_index.get(int(ref)) if ref.strip().isdigit() else None
            if src is None or len(src.get("image") or "") <= 64:
                raise ValueError(f"{path}: row {r['index']}'s image {ref!r} is neither base64 nor a row index")
            r["image"] = src["image"]
    return rows


def tsv_columns(path) -> list[str]:
    """The TSV's header (its first line), read without the rest of the file."""
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader([f.readline()], delimiter="\t"), [])


def row_options(row: Mapping) -> list[str]:
    """LLaVA's ``get_options``: the option texts A, B, ... up to the first missing one."""
    out = []
    for letter in LETTERS:
        if is_missing(row.get(letter)):
            break
        out.append(str(row[letter]))
    return out


def group_index(index) -> int:
    """The question a TSV row (or a circular copy of it) belongs to: ``index % 1e6``."""
    return int(index) % CIRCULAR_OFFSET


def has_circular_copies(rows: Iterable[Mapping]) -> bool:
    """Whether the TSV already holds CircularEval's shifted copies (rows with index >= 1e6)."""
    return any(int(r["index"]) >= CIRCULAR_OFFSET for r in rows)


def _prompt(row: Mapping, options: list[str]) -> str:
    question = str(row["question"])
    hint = row.get("hint")
    if not is_missing(hint):
        question = f"{hint}\n{question}"
    for letter, option in zip(LETTERS, options):
        question += f"\n{letter}. {option}"
    return question


def mmbench_questions(path, all_rounds: bool | None = None, rows: list[dict] | None = None,
                      limit: int | None = None) -> list[dict]:
    """The passes eval.py asks: one per row, or with ``all_rounds`` one per rotation of the row's
    options (LLaVA's ``--all-rounds``). ``all_rounds=None`` rotates only when the TSV holds no
    circular copies, so that each question gets every shift once either way.

    Each pass: ``{"question_id": index, "round_id", "text": prompt without the answer-format line,
    "options", "option_char", "image_base64", "category"?}``. ``limit``: only the rows of the
    first ``limit`` questions (groups, in file order), so each keeps all its passes."""
    rows = read_mmbench_tsv(path) if rows is None else rows
    if all_rounds is None:
        all_rounds = not has_circular_copies(rows)
    if limit:
        first = list(dict.fromkeys(group_index(r["index"]) for r in rows))[: int(limit)]
        rows = [r for r in rows if group_index(r["index"]) in set(first)]
    out = []
    for row in rows:
        options = row_options(row)
        if not options:
            raise ValueError(f"{path}: question {row['index']} has no options")
        chars = list(LETTERS[: len(options)])
        for round_id in range(len(options) if all_rounds else 1):
            q = {"question_id": row["index"], "round_id": round_id, "text": _prompt(row, options),
                 "options": list(options), "option_char": list(chars), "image_base64": row.get("image")}
            if not is_missing(row.get("category")):
                q["category"] = row["category"]
            out.append(q)
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]  # rotate, as LLaVA
    return out


def load_base64_image(data: str) -> Image.Image:
    """LLaVA's ``load_image_from_base64``: the decoded image, loaded."""
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


def mmbench_answer(question: Mapping, text: str, model_id: str) -> dict:
    """One answers-file record in LLaVA's ``model_vqa_mmbench.py`` key order."""
    rec = make_answer(question["question_id"], question["text"], text, model_id)
    return {"question_id": rec["question_id"], "round_id": question.get("round_id", 0), "prompt": rec["prompt"],
            "text": text, "options": list(question["options"]), "option_char": list(question["option_char"]),
            "answer_id": rec["answer_id"], "model_id": model_id, "metadata": {}}


def read_mmbench_gt(path) -> dict[str, dict]:
    """TSV rows -> ``{str(index): {"answer", "options", "group", "category"?, "l2_category"?}}``."""
    rows = read_mmbench_tsv(path)
    if not rows or "answer" not in rows[0]:
        raise ValueError(f"{path}: no 'answer' column (a test split is scored by the MMBench server; "
                         f"set benchmark.gt=null to write the answers and the submission table only)")
    out = {}
    for r in rows:
        if is_missing(r.get("answer")):
            raise ValueError(f"{path}: question {r['index']} has no answer")
        rec = {"answer": str(r["answer"]).strip(), "options": row_options(r), "group": group_index(r["index"])}
        for key, col in (("category", "category"), ("l2_category", "l2-category")):
            if not is_missing(r.get(col)):
                rec[key] = r[col]
        out[question_key(r["index"])] = rec
    return out


def write_mmbench_submission(path, tsv, answers: Iterable[Mapping]) -> Path:
    """The table of ``convert_mmbench_for_submission.py`` as a TSV (module docstring): every TSV
    row, its round-0 answer as ``prediction`` ("" where unanswered)."""
    pred = {}
    for a in answers:
        if int(a.get("round_id", 0) or 0) == 0:
            pred[question_key(a["question_id"])] = str(a["text"])
    rows = read_mmbench_tsv(tsv)
    cols = [c for c in rows[0] if c not in _DROPPED] if rows else []
    cols.insert(min(_PREDICTION_AT, len(cols)), "prediction")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for r in rows:
            r = {**r, "prediction": pred.get(question_key(r["index"]), "")}
            w.writerow(["" if is_missing(r.get(c)) and c != "prediction" else r.get(c) for c in cols])
    os.replace(tmp, path)
    return path


def write_mmbench_answers(path, answers: Iterable[Mapping]) -> Path:
    """The answers file (records from :func:`mmbench_answer`), replaced in one step."""
    return write_jsonl(path, answers)
