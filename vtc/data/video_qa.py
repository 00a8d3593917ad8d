"""Video QA benchmark files, read and written: Video-LLaVA's zero-shot open-ended QA (MSVD-QA,
MSRVTT-QA, ActivityNet-QA) and MVBench's multiple choice (data only: no model, no frames).

Kept apart from the image benchmarks' files (:mod:`vtc.data.eval_files`) because the formats are
others: a question names a video, not an image, and the open-ended answers file is Video-LLaVA's
(what its GPT judge reads), not LLaVA's. Every reader returns, per question, the same keys:
``question_id``, ``video`` (path relative to the video folder; :func:`video_path` finds the file
or a folder of frames), ``text`` (the question as the prompt's text, without ``<video>``),
``answer`` (the reference), and for MVBench ``options``, ``answer_letter``, ``gt``, ``task``.

**Open-ended QA** follows github.com/PKU-YuanGroup/Video-LLaVA (read at commit 984e65bf):
``scripts/v1_5/eval/run_qa_{msvd,msrvtt,activitynet}.sh`` ->
``videollava/eval/video/run_inference_video_qa.py`` (``_act.py`` for ActivityNet) ->
``eval_video_qa.py`` (the GPT-3.5 judge). Under ``eval/GPT_Zero_Shot_QA/<folder>/``
(:data:`VIDEO_QA_LAYOUT`)::

    test_q.json   [{"video_name": str, "question": str, "question_id": str}, ...]
    test_a.json   [{"answer": str, "type": int, "question_id": str}, ...]   (ActivityNet-QA's own
                  format, github.com/MILVLG/activitynet-qa dataset/README.md; "type" optional)

Video-LLaVA pairs the i-th answer with the i-th question (and so misaligns them when run in
several chunks: Video-LLaVA issue #36). Here answers carrying ``question_id`` are matched by id,
others by position. The video is ``<video_dir>/<video_name><ext>`` for the first of
:data:`VIDEO_FORMATS` that exists; ActivityNet's is ``v_<video_name><ext>``. The prompt is the
question alone (``<image>`` x 8 + ``\\n`` + question in the ``llava_v1`` template).

The answers file (:func:`write_video_qa_answers`) is what run_inference writes and the judge
reads: one ``json.dumps({"id", "question", "answer", "pred"})`` per line (the chunk files
concatenated into ``merge.jsonl``). The judge parses each line with Python's ``eval``, names a
result file ``<id>.json`` and looks it up by that name as a string, so ids are written as strings
(an int id would make the judge retry it forever) and every value must be a string (JSON's
``null``/``true`` are no Python).

**MVBench** follows ``video_chat2/mvbench.ipynb`` of github.com/OpenGVLab/Ask-Anything (read at
commit 4dd8210b; data: huggingface.co/datasets/OpenGVLab/MVBench): ``json/<task>.json`` per task
(:data:`MVBENCH_TASKS`, the notebook's ``data_list``), a list of ``{"video", "question",
"candidates": [str], "answer": str, "start"?, "end"?}``; the video is
``<video root>/<task's folder>/<video>`` (a folder of frames ``00001.jpg``... for
episodic_reasoning). The question text is the notebook's ``qa_template``::

    Question: <question>
    Options:
    (A) <candidate 0>
    (B) <candidate 1> ...

and ``gt`` is ``"(X) <answer>"``, X the letter of the (last) candidate equal to the answer.
Its prompt adds :data:`MVBENCH_SYSTEM` in front, ``"\\nOnly give the best option."`` after, and
pre-fills the answer with ``"Best option:("`` (:mod:`vtc.metrics.mvbench` scores it).
MVBench has no question ids; here they are ``"<task>/<index in the task's file>"``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from vtc.data.eval_files import PathLike, write_jsonl, question_key, read_records

__all__ = [
    "ACTIVITYNET_QA_TYPES",
    "MVBENCH_ANSWER_PROMPT",
    "MVBENCH_QUESTION_PROMPT",
    "MVBENCH_RETURN_PROMPT",
    "MVBENCH_SYSTEM",
    "MVBENCH_TASKS",
    "VIDEO_FORMATS",
    "VIDEO_QA_LAYOUT",
    "read_mvbench",
    "read_mvbench_gt",
    "read_video_qa",
    "read_video_qa_answers",
    "read_video_qa_gt",
    "read_video_questions",
    "video_path",
    "write_video_qa_answers",
]

VIDEO_FORMATS = (".mp4", ".avi", ".mov", ".mkv")  # run_inference_video_qa.py's order
# name -> (folder under eval/GPT_Zero_Shot_QA, video folder in it, file-name prefix), as run_qa_*.sh
VIDEO_QA_LAYOUT = {
    "msvd_qa": ("MSVD_Zero_Shot_QA", "videos", ""),
    "msrvtt_qa": ("MSRVTT_Zero_Shot_QA", "videos/all", ""),
    "activitynet_qa": ("Activitynet_Zero_Shot_QA", "all_test", "v_"),
}
# ActivityNet-QA's "type" (dataset/README.md): question types 0-2, and 3-8 the "free" questions by answer type.
ACTIVITYNET_QA_TYPES = {0: "motion", 1: "spatial_relationship", 2: "temporal_relationship", 3: "yes_no",
                        4: "color", 5: "object", 6: "location", 7: "number", 8: "other"}

# mvbench.ipynb's data_list: json file stem -> (task name, video folder under the video root, data type, has bound)
MVBENCH_TASKS = {
    "action_sequence": ("Action Sequence", "star/Charades_v1_480/", "video", True),
    "action_prediction": ("Action Prediction", "star/Charades_v1_480/", "video", True),
    "action_antonym": ("Action Antonym", "ssv2_video/", "video", False),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos/", "video", False),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test/", "video", False),
    "object_existence": ("Object Existence", "clevrer/video_validation/", "video", False),
    "object_interaction": ("Object Interaction", "star/Charades_v1_480/", "video", True),
    "object_shuffle": ("Object Shuffle", "perception/videos/", "video", False),
    "moving_direction": ("Moving Direction", "clevrer/video_validation/", "video", False),
    "action_localization": ("Action Localization", "sta/sta_video/", "video", True),
    "scene_transition": ("Scene Transition", "scene_qa/video/", "video", False),
    "action_count": ("Action Count", "perception/videos/", "video", False),
    "moving_count": ("Moving Count", "clevrer/video_validation/", "video", False),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation/", "video", False),
    "state_change": ("State Change", "perception/videos/", "video", False),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd/", "video", False),
    "character_order": ("Character Order", "perception/videos/", "video", False),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa/", "video", False),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/frames_fps3_hq/", "frame", True),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation/", "video", False),
}
MVBENCH_SYSTEM = ("Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
                  "movement of objects, and the action and pose of persons. Based on your observations, select the "
                  "best option that accurately addresses the question.\n")
MVBENCH_QUESTION_PROMPT = "Only give the best option."  # appended after "\n"
MVBENCH_ANSWER_PROMPT = "Best option:("  # pre-filled assistant turn
MVBENCH_RETURN_PROMPT = "("  # put back in front of the generated text before check_ans


# -- open-ended: Video-LLaVA's test_q.json / test_a.json ------------------------------------------------
def _qa_files(path: PathLike) -> tuple[Path, Path | None]:
    """A GPT_Zero_Shot_QA dataset folder -> its test_q.json and test_a.json (None if absent)."""
    path = Path(path)
    if not (path / "test_q.json").is_file():
        raise ValueError(f"{path}: no test_q.json (Video-LLaVA's GPT_Zero_Shot_QA/<dataset> layout)")
    return path / "test_q.json", (path / "test_a.json" if (path / "test_a.json").is_file() else None)


def _aligned_answers(questions: list[dict], answers: list[dict], where: str) -> list[dict]:
    """One answer record per question: by question_id when every answer has one, else by position."""
    if answers and all("question_id" in a for a in answers):
        by_id = {}
        for a in answers:
            if question_key(a["question_id"]) in by_id:
                raise ValueError(f"{where}: question_id {a['question_id']!r} is answered twice")
            by_id[question_key(a["question_id"])] = a
        missing = [q["question_id"] for q in questions if question_key(q["question_id"]) not in by_id]
        if missing:
            raise ValueError(f"{where}: {len(missing)} questions have no answer, e.g. {missing[:5]}")
        return [by_id[question_key(q["question_id"])] for q in questions]
    if len(answers) != len(questions):
        raise ValueError(f"{where}: {len(answers)} answers without question_id for {len(questions)} questions "
                         "(paired by position, as Video-LLaVA does)")
    return answers


def read_video_qa(questions, answers=None, benchmark: str = "msvd_qa") -> list[dict]:
    """Video-LLaVA's question file (``questions``: test_q.json, its records, or the dataset folder,
    whose test_a.json is then read too unless ``answers`` is given) -> per question
    ``{"question_id", "video", "video_name", "text", "answer"?, "answer_type"?}`` in file order;
    ``video`` carries ActivityNet's ``v_`` prefix (``benchmark="activitynet_qa"``)."""
    if benchmark not in VIDEO_QA_LAYOUT:
        raise ValueError(f"unknown open-ended video QA benchmark {benchmark!r}; one of {tuple(VIDEO_QA_LAYOUT)}")
    if isinstance(questions, (str, os.PathLike)) and Path(questions).is_dir():
        questions, default_answers = _qa_files(questions)
        answers = default_answers if answers is None else answers
    prefix = VIDEO_QA_LAYOUT[benchmark][2]
    out = []
    for r in read_records(questions):
        if not all(k in r for k in ("video_name", "question", "question_id")):
            raise ValueError(f"video QA question needs video_name, question, question_id: {str(r)[:200]}")
        out.append({"question_id": r["question_id"], "video": f"{prefix}{r['video_name']}",
                    "video_name": r["video_name"], "text": str(r["question"])})
    if answers is not None:
        for q, a in zip(out, _aligned_answers(out, read_records(answers), "video QA answers")):
            q["answer"] = str(a["answer"])
            if a.get("type") is not None:
                q["answer_type"] = int(a["type"])
    return out


def read_video_qa_gt(path, questions=None, benchmark: str = "msvd_qa") -> dict[str, dict]:
    """Ground truths ``{str(question_id): {"answer", "answer_type"?, "question"?, "video"?}}`` from
    the dataset folder, or test_a.json (with ``questions`` = test_q.json when its answers carry no
    question_id), or records."""
    if isinstance(path, (str, os.PathLike)) and Path(path).is_dir():
        qs = read_video_qa(path, benchmark=benchmark)
    elif questions is not None:
        qs = read_video_qa(questions, path, benchmark=benchmark)
    else:
        answers = read_records(path)
        if not all("question_id" in a for a in answers):
            raise ValueError("video QA answers without question_id: give the question file too")
        return {question_key(a["question_id"]): {"answer": str(a["answer"]),
                                                 **({"answer_type": int(a["type"])} if a.get("type") is not None else {})}
                for a in answers}
    if any("answer" not in q for q in qs):
        raise ValueError(f"{path}: no answers (test_a.json) for the questions")
    out = {}
    for q in qs:
        out[question_key(q["question_id"])] = {"answer": q["answer"], "question": q["text"], "video": q["video"],
                                               **({"answer_type": q["answer_type"]} if "answer_type" in q else {})}
    return out


def write_video_qa_answers(path: PathLike, answers: Iterable[Mapping], append: bool = False) -> Path:
    """Video-LLaVA's answers file (see the module docstring): per input, ``id`` (or
    ``question_id``), ``question`` (or ``text``), ``answer`` and ``pred`` (or ``text`` when
    ``question`` is given), written as ``{"id", "question", "answer", "pred"}`` lines with
    string values. Without ``append`` the file is replaced in one step."""
    out = []
    for a in answers:
        rid = a["id"] if "id" in a else a.get("question_id")
        question = a["question"] if "question" in a else a.get("text")
        pred = a["pred"] if "pred" in a else (a.get("text") if "question" in a else None)
        rec = {"id": rid, "question": question, "answer": a.get("answer"), "pred": pred}
        bad = [k for k, v in rec.items() if v is None or isinstance(v, bool) or not isinstance(v, (str, int))]
        if bad:
            raise ValueError(f"a video QA answer needs {bad} (strings): {str(dict(a))[:200]}")
        out.append({k: str(v) for k, v in rec.items()})
    return write_jsonl(path, out, append=append)


def read_video_qa_answers(src) -> list[dict]:
    """Video-LLaVA answers (``{"id", "question", "answer", "pred"}``) or LLaVA ones
    (``{"question_id", "text", ...}``) -> ``[{"question_id", "text", "answer"?, "question"?}]``."""
    out = []
    for r in read_records(src):
        if "pred" in r and "id" in r:
            rec = {"question_id": r["id"], "text": str(r["pred"])}
            rec.update({k: str(r[k]) for k in ("answer", "question") if r.get(k) is not None})
        elif "question_id" in r and "text" in r:
            rec = dict(r)
        else:
            raise ValueError(f"answer record needs id/pred (Video-LLaVA) or question_id/text (LLaVA): {str(r)[:200]}")
        out.append(rec)
    return out


# -- multiple choice: MVBench ----------------------------------------------------------------------------
def _qa_template(data: Mapping) -> tuple[str, str, int]:
    """mvbench.ipynb's ``qa_template``: (question text, ``"(X) answer"``, answer index)."""
    question = f"Question: {data['question']}\nOptions:\n"
    answer_idx = -1
    for idx, c in enumerate(data["candidates"]):
        question += f"({chr(ord('A') + idx)}) {c}\n"
        if c == data["answer"]:
            answer_idx = idx
    if answer_idx < 0:
        raise ValueError(f"MVBench answer {data['answer']!r} is none of the candidates {data['candidates']}")
    return question.rstrip(), f"({chr(ord('A') + answer_idx)}) {data['answer']}", answer_idx


def read_mvbench(path, tasks: Iterable[str] | None = None) -> list[dict]:
    """MVBench's ``json/`` folder (the tasks of :data:`MVBENCH_TASKS` found there, or ``tasks``,
    all required) or one ``<task>.json`` -> per question ``{"question_id": "<task>/<i>", "task",
    "task_type", "video", "data_type", "bound", "text", "options", "answer", "answer_letter",
    "gt"}``; ``bound`` is ``[start, end]`` in seconds for the tasks that use it, else None."""
    path = Path(path)
    if path.is_dir():
        stems = list(tasks) if tasks is not None else [t for t in MVBENCH_TASKS if (path / f"{t}.json").is_file()]
        files = [path / f"{t}.json" for t in stems]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f}: no such MVBench task file")
        if not files:
            raise ValueError(f"{path}: none of MVBench's task files ({', '.join(MVBENCH_TASKS)}.json)")
    else:
        files = [path]
    out = []
    for f in files:
        task = f.stem
        if task not in MVBENCH_TASKS:
            raise ValueError(f"{f}: unknown MVBench task {task!r}; one of {tuple(MVBENCH_TASKS)}")
        name, folder, data_type, bound = MVBENCH_TASKS[task]
        data = json.loads(f.read_text(encoding="utf-8"))
        for i, d in enumerate(data):
            text, gt, idx = _qa_template(d)
            out.append({"question_id": f"{task}/{i}", "task": task, "task_type": name, "video": folder + str(d["video"]),
                        "data_type": data_type, "bound": [d["start"], d["end"]] if bound else None, "text": text,
                        "options": [str(c) for c in d["candidates"]], "answer": str(d["answer"]),
                        "answer_letter": chr(ord("A") + idx), "gt": gt})
    return out


def read_mvbench_gt(path) -> dict[str, dict]:
    """``{question_id: {"gt", "answer_letter", "task", "task_type"}}`` from MVBench's json folder
    or task file, or from :func:`read_mvbench`'s records."""
    qs = read_mvbench(path) if isinstance(path, (str, os.PathLike)) else list(path)
    return {question_key(q["question_id"]): {k: q[k] for k in ("gt", "answer_letter", "task", "task_type")} for q in qs}


# -- both ---------------------------------------------------------------------------------------------
def read_video_questions(name: str, questions, answers=None) -> list[dict]:
    """The questions of video benchmark ``name`` (msvd_qa, msrvtt_qa, activitynet_qa, mvbench)."""
    if name == "mvbench":
        return read_mvbench(questions)
    return read_video_qa(questions, answers, benchmark=name)


def video_path(question: Mapping, video_folder: PathLike) -> Path | None:
    """Where ``question["video"]`` is under ``video_folder``: the file itself if it exists, else the
    first ``<video><ext>`` of :data:`VIDEO_FORMATS` (Video-LLaVA's search), else a folder of
    frames named ``<video>``; None if none exists (Video-LLaVA skips such a question)."""
    base = Path(video_folder) / str(question["video"])
    if base.is_file():
        return base
    for ext in VIDEO_FORMATS:
        p = base.with_name(base.name + ext)
        if p.is_file():
            return p
    return base if base.is_dir() else None
