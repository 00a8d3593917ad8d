"""Benchmarks in LLaVA's evaluation formats for ``eval.py`` (``benchmark=gqa|vqav2|textvqa|pope|mme|scienceqa``,
``mmbench|mmbench_cn|vizwiz|seed_bench|mmvet|llavabench``; the video ones,
``msvd_qa|msrvtt_qa|activitynet_qa|mvbench``, run through :mod:`vtc.eval.video_bench`).

What LLaVA-1.5 does (``llava/eval/model_vqa_loader.py``, ``model_vqa_science.py``), and so this:

1. read the question file (JSONL ``{question_id, image, text, category?}``, or ScienceQA's
   conversation-format JSON list; :func:`vtc.data.eval_files.read_questions`);
2. prompt = ``<image>\\n`` + the question text in the conversation template the model was trained
   with (``vicuna_v1``: ``SYSTEM USER: <image>\\n{text} ASSISTANT:``), via
   :func:`vtc.data.templates.encode_conversation`. The answer-format instruction ("Answer the
   question using a single word or phrase." for GQA / VQAv2 / TextVQA / POPE / MME, "Answer with
   the option's letter from the given choices directly." for ScienceQA, which LLaVA adds with
   ``--single-pred-prompt``) is ``benchmark.prompt_suffix``: appended on a new line unless the
   text already ends with it -- LLaVA's own VQA question files carry it, ScienceQA's does not;
3. images: ``benchmark.images / question["image"]`` through the model's
   :class:`vtc.data.image.ImageProcessor` (LLaVA's expand2square + CLIP preprocessing);
4. greedy decoding (``LMM.generate``, KV cache), batched with right padding
   (``eval_batch_size``); answers decoded without special tokens and stripped;
5. the answers file in LLaVA's format (:func:`vtc.data.eval_files.write_answers`:
   ``question_id, prompt, text, answer_id, model_id, metadata``), in question-file order; the
   ``prompt`` is the question text as sent (LLaVA's ``cur_prompt``; ScienceQA's starts with
   ``<image>\\n`` when it has an image, as LLaVA writes it);
6. scored by :func:`vtc.data.eval_score.score_benchmark` against ``benchmark.gt`` and logged as
   ``<benchmark>/<metric>`` (``gqa/acc``, ``pope/adversarial/f1``, ``mme/perception``, ...).

``benchmark.gt: null`` writes the answers only (VQAv2 test-dev is scored by the EvalAI server).

The default file locations follow LLaVA's ``playground/data/eval`` layout under
``benchmark.root`` (``${paths.data_dir}/eval``); point ``benchmark.root`` at a LLaVA playground,
or set ``benchmark.questions`` / ``images`` / ``gt`` one by one.

The LMM benchmarks (:mod:`vtc.data.eval_lmm`) differ in three places. Questions: MMBench's come
from its TSV, images inlined as base64, each asked once per circular shift of its options
(``benchmark.all_rounds``; :mod:`vtc.data.mmbench`), and its answers file keeps LLaVA's
``round_id``, ``options``, ``option_char``; SEED-Bench keeps its image questions. Files: beside
the answers, what LLaVA's converter makes for the server or judge (MMBench's prediction table,
VizWiz's and VQAv2's EvalAI JSON when ``gt`` is null, SEED's upload lines, MM-Vet's
``{"v1_<id>": answer}``; :func:`vtc.data.eval_lmm.write_submission`), logged as an artifact.
Length: ``benchmark.max_new_tokens`` (MM-Vet, LLaVA-Bench: 1024, LLaVA's ``model_vqa.py``)
unless eval.py's ``max_new_tokens`` is set. MM-Vet and LLaVA-Bench are judged by GPT-4: answers
only, with a log line naming the script that scores them.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from vtc.cost.meter import CostMeter
from vtc.data.batch import IGNORE_INDEX
from vtc.data.collate import collate, visual_items
from vtc.data.eval_files import image_path, write_answers
from vtc.data.eval_gt import BENCHMARKS, JUDGED, VIDEO_BENCHMARKS
from vtc.data.eval_lmm import MMBENCH, judge_note, load_benchmark_questions, submission_path, write_submission
from vtc.data.eval_score import score_benchmark
from vtc.data.mmbench import load_base64_image, mmbench_answer, tsv_columns, write_mmbench_answers
from vtc.data.templates import encode_conversation
from vtc.errors import ConfigError
from vtc.eval.video_bench import check_video_spec, evaluate_video_benchmark
from vtc.runs.tracking import mlflow_logger

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
# The headline number of each benchmark (what eval.py returns to a sweeper).
PRIMARY = {"mme": "total"}


def benchmark_name(cfg: DictConfig) -> str:
    return str((cfg.get("benchmark") or {}).get("name") or SYNTHETIC)


def benchmark_spec(cfg: DictConfig) -> dict | None:
    """The resolved ``benchmark`` node, its files checked; None for ``synthetic`` (the
    checkpoint's own test split)."""

    name = benchmark_name(cfg)
    if name == SYNTHETIC:
        return None
    known = BENCHMARKS + JUDGED + VIDEO_BENCHMARKS
    if name not in known:
        raise ConfigError("benchmark.name", f"{name!r} is not a benchmark vtc.eval knows; one of {known}")
    spec = OmegaConf.to_container(cfg.benchmark, resolve=True)
    questions = spec.get("questions")
    if name in VIDEO_BENCHMARKS:
        check_video_spec(spec)  # question file / json folder, videos folder, frames
    elif not questions or not os.path.isfile(questions):
        raise ConfigError("benchmark.questions", f"{questions!r} is not a file: give LLaVA's question file "
                          f"(or benchmark.root=<LLaVA's playground/data/eval>)")
    elif name not in MMBENCH and (not spec.get("images") or not os.path.isdir(spec["images"])):
        raise ConfigError("benchmark.images", f"{spec.get('images')!r} is not a folder of images")  # MMBench: in the TSV
    gt = spec.get("gt")
    if gt is not None and not os.path.exists(gt):
        raise ConfigError("benchmark.gt", f"{gt!r} does not exist (null: write the answers without scoring)")
    if name in MMBENCH and gt is not None and "answer" not in tsv_columns(gt):
        raise ConfigError("benchmark.gt", f"{gt!r} has no 'answer' column (a test split: the MMBench server scores "
                          f"it; set benchmark.gt=null to write the answers and the submission table)")
    if spec.get("limit") is not None and int(spec["limit"]) < 1:
        raise ConfigError("benchmark.limit", f"must be >= 1 or null, got {spec['limit']}")
    if spec.get("all_rounds") not in (None, True, False):
        raise ConfigError("benchmark.all_rounds", f"true, false or null (rotate when the TSV holds no circular "
                          f"copies), got {spec['all_rounds']!r}")
    if spec.get("max_new_tokens") is not None and int(spec["max_new_tokens"]) < 1:
        raise ConfigError("benchmark.max_new_tokens", f"must be >= 1 or null, got {spec['max_new_tokens']}")
    return spec


def build_prompt(question: dict, suffix: str | None) -> str:
    """The question text with the answer-format instruction on a new line, unless already there."""
    text = str(question["text"])
    if suffix and not text.rstrip().endswith(suffix):
        text = f"{text}\n{suffix}"
    return text


class QuestionDataset(torch.utils.data.Dataset):
    """LLaVA questions -> samples for :func:`vtc.data.collate.collate` (generation keys)."""

    def __init__(self, questions: list[dict], images: str, tokenizer, template: str, max_length: int | None,
                 processor, suffix: str | None, system_prompt: str | None = None):
        self.questions, self.images = questions, images
        self.system_prompt = system_prompt
        self.tokenizer, self.template, self.max_length = tokenizer, template, max_length
        self.processor, self.suffix = processor, suffix

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> dict:
        q = self.questions[i]
        text = build_prompt(q, self.suffix)
        pixel_values = None
        path = image_path(q, self.images)
        if q.get("image_base64"):  # MMBench: the image is in the TSV row
            pixel_values = self.processor(load_base64_image(q["image_base64"]))
        elif path is not None:
            with Image.open(path) as img:
                img.load()
                pixel_values = self.processor(img)
        conv = [{"from": "human", "value": text}, {"from": "gpt", "value": ""}]
        enc = encode_conversation(self.tokenizer, conv, self.template, self.max_length,
                                  has_image=pixel_values is not None, system=self.system_prompt)
        ids = enc["gen_input_ids"]
        return {"id": str(q["question_id"]), "index": i, "prompt": text, "input_ids": ids,
                "labels": [IGNORE_INDEX] * len(ids), "gen_input_ids": ids, "answer": "",
                "pixel_values": pixel_values}


def _collate(samples: list[dict], pad_id: int, image_size: int) -> dict:
    batch = collate(samples, pad_id=pad_id, image_size=image_size, generation=True)
    batch["index"] = [s["index"] for s in samples]
    batch["prompts"] = [s["prompt"] for s in samples]
    return batch


def placement(trainer_cfg, module) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """Device and precision from eval's ``trainer`` node (accelerator, precision), applied to the
    module: ``*-true`` casts the weights, ``*-mixed`` autocasts, 32 stays float32."""
    acc = str(trainer_cfg.get("accelerator", "cpu"))
    cuda = acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    prec = str(trainer_cfg.get("precision", "32-true"))
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(prec.split("-")[0])
    module.to(device)
    ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    if dtype is not None and prec.endswith("-true"):
        module.to(dtype)
    elif dtype is not None:
        ctx = torch.autocast(device.type, dtype=dtype)
    return device, ctx


@torch.no_grad()
def generate_answers(module, loader, device, ctx, max_new_tokens: int | None = None) -> list[tuple[int, str, str]]:
    """(question index, prompt, answer text) for every question the loader yields, at most
    ``max_new_tokens`` (default: the module's) each."""
    model = module.model
    dtype = next(model.encoder.parameters()).dtype
    out = []
    for batch in loader:
        with ctx:
            tokens, _ = model.generate(
                batch["gen_input_ids"].to(device),
                batch["gen_attention_mask"].to(device),
                batch["pixel_values"].to(device, dtype),
                visual_items(batch),
                max_new_tokens=max_new_tokens or module.max_new_tokens,
            )
        out += list(zip(batch["index"], batch["prompts"], module.decode(tokens)))
    return out


def evaluate_benchmark(spec: dict, cfg: DictConfig, module, datamodule, model_id: str) -> tuple[dict, str]:
    """Run benchmark ``spec`` (from :func:`benchmark_spec`): answers file + ``<name>/<metric>``."""
    from functools import partial

    name = spec["name"]
    if name in VIDEO_BENCHMARKS:
        module.eval()
        device, ctx = placement(cfg.trainer, module)
        return evaluate_video_benchmark(spec, cfg, module, datamodule, model_id, device, ctx)
    questions = load_benchmark_questions(spec)  # MMBench: its passes, benchmark.limit counting questions
    if spec.get("limit") and name not in MMBENCH:
        questions = questions[: int(spec["limit"])]
    tokenizer = module.tokenizer  # the model's own (the one evaluate() built it with)
    dataset = QuestionDataset(questions, spec["images"], tokenizer, datamodule.template,
                              datamodule.max_length, datamodule.processor, spec.get("prompt_suffix"),
                              datamodule.system_prompt)
    workers = int(spec.get("num_workers") or 0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=datamodule.eval_batch_size, shuffle=False, num_workers=workers,
        collate_fn=partial(_collate, pad_id=int(tokenizer.pad_token_id), image_size=datamodule.image_size))
    module.eval()
    device, ctx = placement(cfg.trainer, module)
    log.info("%s: %d questions from %s, batches of %d on %s", name, len(questions), spec["questions"],
             datamodule.eval_batch_size, device)
    # eval.py's max_new_tokens, when given, is already the module's; else the benchmark's own
    max_new = None if cfg.get("max_new_tokens") else spec.get("max_new_tokens")
    answers = []
    for i, prompt, text in generate_answers(module, loader, device, ctx, max_new):
        q = questions[i]
        if name == "scienceqa" and q.get("image"):
            prompt = "<image>\n" + prompt  # what LLaVA's model_vqa_science.py records
        answers.append(mmbench_answer(q, text, model_id) if name in MMBENCH
                       else {"question_id": q["question_id"], "prompt": prompt, "text": text})
    path = spec.get("answers_file") or os.path.join(cfg.paths.output_dir, "answers", f"{name}.jsonl")
    if name in MMBENCH:
        write_mmbench_answers(path, answers)
    else:
        write_answers(path, answers, model_id=model_id)
    extra = write_submission(spec, path, questions)
    note = judge_note(spec, path, extra)
    if note:
        log.info(note)
    if name in JUDGED:  # a GPT-4 judge scores them (the note above says how)
        return {}, str(path)
    if spec.get("gt") is None:
        log.warning("%s: benchmark.gt is null; wrote %s without scoring", name, path)
        return {}, str(path)
    scores = score_benchmark(name, str(path), spec["gt"], questions=spec["questions"], **(spec.get("options") or {}))
    return {f"{name}/{k}": float(v) for k, v in scores.items()}, str(path)


def primary_metric(name: str, metrics: dict) -> float | None:
    key = f"{name}/{PRIMARY.get(name, 'acc')}"
    return metrics.get(key)


def model_id_of(source: str) -> str:
    """``<run dir name>`` for ``<run dir>/checkpoints/x.ckpt``, a model directory's name
    (``model.init_from``: ``llava-1.5-7b-hf``, whose dots are no suffix), else the checkpoint's stem."""
    p = Path(source).resolve()
    if p.is_dir():
        return p.name
    return p.parent.parent.name if p.parent.name == "checkpoints" else p.stem


# -- eval.py glue (called from vtc.eval.task.evaluate) ---------------------------------------------
class _NoMeter(contextlib.nullcontext):
    def summary(self, prefix: str = "cost") -> dict:
        return {}


def cost_meter(cfg: DictConfig, model):
    """A :class:`vtc.cost.meter.CostMeter` on ``model`` when ``cost.measure`` (the default)."""
    cost = cfg.get("cost") or {}
    if not cost.get("measure", True):
        return _NoMeter()

    return CostMeter(model, warmup=int(cost.get("warmup", 1)), decode_probe=int(cost.get("decode_probe", 0) or 0))


def log_metrics(loggers, metrics: dict) -> None:
    logger = mlflow_logger(loggers)
    if logger is None or not metrics:
        return
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), 500):
        logger.experiment.log_batch(logger.run_id, metrics=items[i:i + 500])


def log_cost(cfg: DictConfig, meter, loggers) -> dict:
    metrics = meter.summary()
    log_metrics(loggers, metrics)
    if metrics:
        log.info("cost: %s", {k: round(v, 6) for k, v in metrics.items()})
    return metrics


def log_benchmark_params(cfg: DictConfig, loggers, spec: dict | None = None) -> None:
    """The benchmark as params of the eval run (so reports keep benchmarks apart), its files as tags."""
    logger = mlflow_logger(loggers)
    if logger is None:
        return
    client, run_id = logger.experiment, logger.run_id
    params = {"benchmark.name": benchmark_name(cfg)}
    if spec is not None:
        params["benchmark.prompt_suffix"] = str(spec.get("prompt_suffix"))
        params["benchmark.limit"] = str(spec.get("limit"))
        if spec["name"] in VIDEO_BENCHMARKS:
            params["benchmark.frames"] = str(spec.get("frames"))
            params["benchmark.sampling"] = str(spec.get("sampling") or "uniform")
        for k in ("questions", "images", "gt") + (("videos",) if spec["name"] in VIDEO_BENCHMARKS else ()):
            client.set_tag(run_id, f"vtc.benchmark.{k}", str(spec.get(k)))
    already = client.get_run(run_id).data.params
    for k, v in params.items():
        if k not in already:
            client.log_param(run_id, k, v)


def run_benchmark(spec: dict, cfg: DictConfig, module, datamodule, loggers, meter) -> float | None:
    """eval.py with ``benchmark=<LLaVA benchmark>``: answers file (an artifact), ``<name>/*`` and
    ``cost/*`` metrics, the run closed; returns the benchmark's headline number."""
    name = spec["name"]
    source = cfg.get("ckpt_path") or OmegaConf.select(cfg, "model.init_from")
    model_id = spec.get("model_id") or model_id_of(source)
    with meter:
        metrics, path = evaluate_benchmark(spec, cfg, module, datamodule, model_id)
    log_metrics(loggers, metrics)
    metrics.update(log_cost(cfg, meter, loggers))
    log_benchmark_params(cfg, loggers, spec)
    logger = mlflow_logger(loggers)
    if logger is not None:
        extra = submission_path(spec, path) if name in BENCHMARKS + JUDGED else None  # server / judge file
        for p in (path, spec.get("judge_file"), extra):  # judge_file: Video-LLaVA's judge input (open-ended video QA)
            if p and os.path.isfile(p):
                logger.experiment.log_artifact(logger.run_id, p, artifact_path="answers")
        logger.finalize("success")
    log.info("%s metrics: %s", name, {k: round(v, 4) for k, v in sorted(metrics.items())})
    return primary_metric(name, metrics)
