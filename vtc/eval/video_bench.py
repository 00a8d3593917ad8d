"""Video benchmarks for ``eval.py`` (``benchmark=msvd_qa|msrvtt_qa|activitynet_qa|mvbench``).

Kept apart from :mod:`vtc.eval.bench` (the image benchmarks, which dispatches here) because the
question loop differs in what it reads and in what it must survive: a question names a video,
the video is decoded into frames, and a video that cannot be decoded must cost one question, not
the run. What it does, following Video-LLaVA (open-ended QA) and MVBench's notebook (see
:mod:`vtc.data.video_qa` for the file formats and the sources read):

1. questions: :func:`vtc.data.video_qa.read_video_questions` (``benchmark.questions``: Video-LLaVA's
   ``test_q.json``, or MVBench's ``json/`` folder or one task file);
2. frames: :func:`vtc.data.video_qa.video_path` finds ``<video>`` (or ``<video>.mp4/.avi/.mov/.mkv``,
   or a folder of frame images) under ``benchmark.videos``; ``benchmark.frames`` frames are taken
   with Video-LLaVA's uniform sampling (:func:`vtc.data.video_frames.sample_indices`: PyAV for a
   file, the sorted image files for a folder) over the whole video, and each frame goes through
   the model's :class:`vtc.data.image.ImageProcessor` exactly as an image does;
3. prompt: ``<video>\\n`` + ``benchmark.question_prefix`` + the question + (new line)
   ``benchmark.prompt_suffix`` as the human turn of the model's own template and system prompt;
   ``benchmark.answer_prefix`` is appended after ``ASSISTANT:`` (MVBench's ``"Best option:("``
   pre-fill) and the model continues it. Open-ended QA: the question alone, as Video-LLaVA;
   MVBench: :data:`~vtc.data.video_qa.MVBENCH_SYSTEM` in front of the question and
   ``"Only give the best option."`` after it (the notebook's ``system_llm=True`` prompt);
4. answers: LLaVA's answers file (``benchmark.answers_file``; ``prompt`` = the text as sent without
   ``<video>``, ``text`` = what the model generated after the pre-fill) and, for the open-ended
   sets with a ground truth, Video-LLaVA's judge input (``benchmark.judge_file``:
   ``{"id", "question", "answer", "pred"}`` per line, what ``eval_video_qa.py`` reads);
5. scores: :func:`vtc.data.eval_score.score_benchmark` (exact match / MVBench's ``check_ans``;
   ``benchmark.options``, e.g. ``return_prompt: "("`` for MVBench) as ``<name>/<metric>``.

A question whose video is missing or cannot be decoded (:class:`vtc.data.video_frames.VideoError`)
gets no answer in either file: it is counted as ``<name>/n_skipped`` and
``<name>/n_skipped_<reason>`` (``missing``, ``unreadable``, ``no_video_stream``, ``no_frames``)
and logged with its path; the scorer's ``n_missing`` counts it too. PyAV missing altogether is an
error (ImportError), not a skip.

Which frames (``benchmark.sampling``): ``uniform`` is Video-LLaVA's rule over the whole video
(:func:`vtc.data.video_frames.sample_indices`, the open-ended sets' default); ``segments`` is
MVBench's notebook rule, the default of ``benchmark=mvbench``: the middle frame of each of
``frames`` equal segments, inside the question's ``start``/``end`` bound where its task has one
(:func:`vtc.data.video_frames.segment_indices`; a frame folder counts from ``00001`` at 3 frames
per second, as the notebook reads TVQA's frames). ``segments`` is what produced MVBench's
published numbers; ``uniform`` there ignores the bounds (e.g. to compare with lmms-eval runs that
sample every video alike).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from vtc.data.batch import IGNORE_INDEX, ITEM_VIDEO, VIDEO_PLACEHOLDER
from vtc.data.collate import collate
from vtc.data.eval_files import question_key, write_answers
from vtc.data.eval_gt import VIDEO_BENCHMARKS, read_gt
from vtc.data.eval_score import score_benchmark
from vtc.data.templates import encode_conversation
from vtc.data.video_frames import (
    NO_FRAME_RATE,
    NO_FRAMES,
    NO_VIDEO_STREAM,
    UNREADABLE,
    VideoError,
    sample_indices,
    sample_video,
    segment_indices,
)
from vtc.data.video_qa import read_video_questions, video_path, write_video_qa_answers
from vtc.errors import ConfigError

log = logging.getLogger(__name__)

MISSING = "missing"  # no video file or frame folder for the question (Video-LLaVA skips those too)
FRAME_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SAMPLING = ("uniform", "segments")
FOLDER_FPS = 3.0  # mvbench.ipynb's read_frame: TVQA's frames_fps3_hq, 00001.jpg first
OPEN_ENDED = tuple(n for n in VIDEO_BENCHMARKS if n != "mvbench")


def check_video_spec(spec: dict) -> None:
    """The video keys of a resolved ``benchmark`` node, refused naming the key (before any model
    is built): the question file (MVBench: its json folder or a task file), the video folder,
    ``frames``, and MVBench's ``options.return_prompt`` against ``answer_prefix``."""
    name, questions = spec["name"], spec.get("questions")
    ok = bool(questions) and (os.path.isfile(questions) or (name == "mvbench" and os.path.isdir(questions)))
    if not ok:
        what = "MVBench's json folder (or one <task>.json)" if name == "mvbench" else "Video-LLaVA's test_q.json"
        raise ConfigError("benchmark.questions", f"{questions!r} is not {what} (or set benchmark.root=<the folder "
                          "holding GPT_Zero_Shot_QA/ and MVBench/>)")
    videos = spec.get("videos")
    if not videos or not os.path.isdir(videos):
        raise ConfigError("benchmark.videos", f"{videos!r} is not a folder of videos")
    frames = spec.get("frames")
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 1:
        raise ConfigError("benchmark.frames", f"frames per video must be an integer >= 1, got {frames!r}")
    if spec.get("sampling", "uniform") not in SAMPLING:
        raise ConfigError("benchmark.sampling", f"{spec.get('sampling')!r} is not a frame sampling rule; one of "
                          f"{SAMPLING} (uniform: Video-LLaVA's; segments: MVBench's, inside its start/end bounds)")
    ret = str((spec.get("options") or {}).get("return_prompt") or "")
    if ret and not str(spec.get("answer_prefix") or "").endswith(ret):
        raise ConfigError("benchmark.options.return_prompt", f"{ret!r} is put back in front of each answer before "
                          f"scoring, so benchmark.answer_prefix must end with it (got {spec.get('answer_prefix')!r})")


def check_context(model, frames: int) -> None:
    """Refuse, before any video is read, a frame count whose visual tokens alone fill the LLM's
    positions (LLaVA-1.5 at 336 px: 576 tokens a frame, so 8 frames are 4,608 of 4,096)."""
    per_frame = model.pipeline.tokens_in_llm(model.encoder.info.num_patches)
    limit = getattr(model.llm.config, "max_position_embeddings", None)
    if limit and frames * per_frame >= int(limit):
        fit = max(1, (int(limit) - 1) // max(per_frame, 1) // 2)
        raise ConfigError("benchmark.frames", f"{frames} frames x {per_frame} visual tokens = {frames * per_frame}, "
                          f"at least the LLM's {limit} positions before any text; use fewer frames "
                          f"(e.g. benchmark.frames={fit}) or a compressor (compressor=pool_temporal)")


def question_text(question: dict, prefix: str | None, suffix: str | None) -> str:
    """``prefix`` + the question + ``suffix`` on a new line (unless the question ends with it)."""
    text = str(question["text"])
    if suffix and not text.rstrip().endswith(suffix):
        text = f"{text}\n{suffix}"
    return f"{prefix or ''}{text}"


def load_frames(path: Path, n: int, sampling: str = "uniform", bound=None) -> list[Image.Image]:
    """``n`` RGB frames of a video file (PyAV) or of a folder of frame images (sorted by name),
    at ``sampling``'s indices (module docstring; ``bound``: the question's ``[start, end]`` seconds,
    used by ``segments``); :class:`VideoError` when it gives none."""
    segments = sampling == "segments"
    if not path.is_dir():
        if not segments:
            return sample_video(path, n).frames
        return sample_video(path, n, pick=lambda count, fps: segment_indices(n, fps, count - 1, bound)).frames
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTS)
    if not files:
        raise VideoError(NO_FRAMES, f"{path}: no frame images ({', '.join(FRAME_EXTS)})")
    # segments: the notebook's 1-based frame numbers (max_frame = the file count), file k-1 for number k
    picks = ([i - 1 for i in segment_indices(n, FOLDER_FPS, len(files), bound, first_idx=1)] if segments
             else sample_indices(len(files), n))
    out: dict[int, Image.Image] = {}
    for i in picks:
        if i not in out:
            try:
                with Image.open(files[i]) as img:
                    out[i] = img.convert("RGB")
            except (OSError, UnidentifiedImageError) as e:
                raise VideoError(UNREADABLE, f"{files[i]}: {e}") from e
    return [out[i] for i in picks]


class VideoQuestionDataset(torch.utils.data.Dataset):
    """Video questions -> samples with one video item for :func:`vtc.data.collate.collate`; a
    question whose video gives no frames -> ``{"index", "skip": reason, "detail"}``."""

    def __init__(self, questions: list[dict], spec: dict, tokenizer, settings):
        self.questions, self.videos, self.frames = questions, spec["videos"], int(spec["frames"])
        self.sampling = spec.get("sampling") or "uniform"
        self.prefix, self.suffix = spec.get("question_prefix"), spec.get("prompt_suffix")
        self.tokenizer, self.settings = tokenizer, settings  # template, max_length, processor, system_prompt
        answer_prefix = spec.get("answer_prefix") or ""
        self.prefill = list(tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]) if answer_prefix else []

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict:
        q = self.questions[i]
        text = question_text(q, self.prefix, self.suffix)
        path = video_path(q, self.videos)
        if path is None:
            return {"index": i, "skip": MISSING, "detail": str(Path(self.videos) / str(q["video"]))}
        try:
            frames = load_frames(path, self.frames, self.sampling, q.get("bound"))
        except FileNotFoundError:
            return {"index": i, "skip": MISSING, "detail": str(path)}
        except VideoError as e:
            return {"index": i, "skip": e.reason, "detail": f"{path}: {e.detail}"}
        s = self.settings
        pixels = torch.stack([s.processor(f) for f in frames])
        conv = [{"from": "human", "value": f"{VIDEO_PLACEHOLDER}\n{text}"}, {"from": "gpt", "value": ""}]
        enc = encode_conversation(self.tokenizer, conv, s.template, s.max_length, system=s.system_prompt,
                                  visual_items=1)
        ids = enc["gen_input_ids"] + self.prefill
        return {"id": str(q["question_id"]), "index": i, "prompt": text, "input_ids": ids,
                "labels": [IGNORE_INDEX] * len(ids), "gen_input_ids": ids, "answer": "",
                "visual": [(ITEM_VIDEO, pixels)]}


def collate_video(samples: list[dict], pad_id: int, image_size: int) -> dict:
    """``{"batch": collated samples or None, "skipped": [(index, reason, detail)]}``."""
    keep = [s for s in samples if "skip" not in s]
    batch = None
    if keep:
        batch = collate(keep, pad_id=pad_id, image_size=image_size, generation=True)
        batch["index"] = [s["index"] for s in keep]
        batch["prompts"] = [s["prompt"] for s in keep]
    return {"batch": batch, "skipped": [(s["index"], s["skip"], s["detail"]) for s in samples if "skip" in s]}


@torch.no_grad()
def generate_video_answers(module, loader, device, ctx) -> tuple[list[tuple[int, str, str]], list[tuple]]:
    """``([(question index, prompt, answer text)], [(question index, reason, detail)])``."""
    model = module.model
    dtype = next(model.encoder.parameters()).dtype
    out, skipped = [], []
    for item in loader:
        skipped += item["skipped"]
        batch = item["batch"]
        if batch is None:
            continue
        with ctx:
            tokens, _ = model.generate(
                batch["gen_input_ids"].to(device),
                batch["gen_attention_mask"].to(device),
                batch["pixel_values"].to(device, dtype),
                batch["visual_items"].to(device),
                max_new_tokens=module.max_new_tokens,
            )
        out += list(zip(batch["index"], batch["prompts"], module.decode(tokens)))
    return out, skipped


def skip_metrics(name: str, skipped: list[tuple]) -> dict[str, float]:
    """``<name>/n_skipped`` and ``<name>/n_skipped_<reason>`` (every reason, 0 when none)."""
    counts = Counter(reason for _, reason, _ in skipped)
    out = {f"{name}/n_skipped": float(len(skipped))}
    for reason in (MISSING, UNREADABLE, NO_VIDEO_STREAM, NO_FRAMES, NO_FRAME_RATE, *sorted(counts)):
        out[f"{name}/n_skipped_{reason}"] = float(counts.get(reason, 0))
    return out


def write_judge_file(spec: dict, questions: list[dict], answered: list[tuple[int, str, str]]) -> str | None:
    """Video-LLaVA's judge input for an open-ended set with a ground truth; its path, else None."""
    path = spec.get("judge_file")
    if spec["name"] not in OPEN_ENDED or spec.get("gt") is None or not path:
        return None
    ref = read_gt(spec["name"], spec["gt"], questions=spec["questions"])
    rows = [{"id": questions[i]["question_id"], "question": questions[i]["text"],
             "answer": ref[question_key(questions[i]["question_id"])]["answer"], "pred": text}
            for i, _, text in answered]
    return str(write_video_qa_answers(path, rows))


def evaluate_video_benchmark(spec: dict, cfg, module, settings, model_id: str, device, ctx) -> tuple[dict, str]:
    """Run video benchmark ``spec`` (see the module docstring) with ``module`` already placed on
    ``device`` (``ctx``: its autocast, if any); ``settings``: the prompt / image settings (the
    datamodule, or :func:`vtc.eval.init_from.prompt_settings`). Returns ``(metrics, answers path)``."""
    name = spec["name"]
    check_context(module.model, int(spec["frames"]))
    questions = read_video_questions(name, spec["questions"])
    if spec.get("limit"):
        questions = questions[: int(spec["limit"])]
    tokenizer = module.tokenizer
    dataset = VideoQuestionDataset(questions, spec, tokenizer, settings)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=settings.eval_batch_size, shuffle=False, num_workers=int(spec.get("num_workers") or 0),
        collate_fn=partial(collate_video, pad_id=int(tokenizer.pad_token_id), image_size=settings.image_size))
    log.info("%s: %d questions from %s, %d frames per video (%s sampling) from %s, batches of %d on %s", name,
             len(questions), spec["questions"], dataset.frames, dataset.sampling, spec["videos"],
             settings.eval_batch_size, device)
    answered, skipped = generate_video_answers(module, loader, device, ctx)
    answered.sort(key=lambda r: r[0])
    skipped.sort(key=lambda r: r[0])
    if skipped:
        by_reason = Counter(reason for _, reason, _ in skipped)
        log.warning("%s: %d of %d questions skipped, unanswered (their video gave no frames): %s; e.g. %s", name,
                    len(skipped), len(questions), dict(by_reason), "; ".join(f"{r}: {d}" for _, r, d in skipped[:5]))
    answers = [{"question_id": questions[i]["question_id"], "prompt": prompt, "text": text}
               for i, prompt, text in answered]
    path = spec.get("answers_file") or os.path.join(cfg.paths.output_dir, "answers", f"{name}.jsonl")
    write_answers(path, answers, model_id=model_id)
    judge = write_judge_file(spec, questions, answered)
    if judge:
        log.info("%s: Video-LLaVA judge input (eval_video_qa.py --pred_path) in %s", name, judge)
    metrics = skip_metrics(name, skipped)
    if spec.get("gt") is None:
        log.warning("%s: benchmark.gt is null; wrote %s without scoring", name, path)
        return metrics, str(path)
    scores = score_benchmark(name, str(path), spec["gt"], questions=spec["questions"], **(spec.get("options") or {}))
    metrics.update({f"{name}/{k}": float(v) for k, v in scores.items()})
    return metrics, str(path)
