"""eval.py on LLaVA benchmarks (conf/benchmark/*.yaml) and the measured generation cost.

Fixture files are written in the real formats and LLaVA's playground/data/eval layout (tiny images
of several sizes and PIL modes); a tiny model is trained once for the module. One eval.py sweep runs
every benchmark plus the synthetic test split; each child's logged metrics must equal
score_benchmark recomputed from the answers file it wrote."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, TINY

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]


# -- fixture files in LLaVA's formats -----------------------------------------------------------------
def _img(path: Path, size=(40, 30), mode="RGB", colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    for x in range(0, size[0], 7):  # some structure, so images differ
        for y in range(0, size[1], 5):
            img.putpixel((x, y), (x * 5 % 256, y * 9 % 256, 90))
    if mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_llava_eval(root: Path) -> dict:
    """LLaVA's playground/data/eval layout with a few questions per benchmark; returns what the
    tests need to know about it."""
    # GQA: question file with the suffix (as LLaVA ships it), official balanced-questions gt.
    gqa = [("201307251", "n1", "Is it overcast?", "no", "verify"),
           ("201640614", "n2", "Who is wearing the shirt?", "girl", "query"),
           ("202225914", "n3", "What color is the grid?", "red", "query"),
           ("20515540", "n1", "Is the 3 left of the 7?", "yes", "logical")]
    _jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": f"{im}.jpg", "text": f"{t}\n{SHORT}", "category": "default"} for q, im, t, _, _ in gqa])
    for im, size in (("n1", (40, 30)), ("n2", (30, 50)), ("n3", (112, 112))):
        _img(root / f"gqa/data/images/{im}.jpg", size)
    gt = {q: {"question": t, "imageId": im, "answer": a, "fullAnswer": a, "isBalanced": True,
              "types": {"structural": s, "semantic": "attr", "detailed": "x"}} for q, im, t, a, s in gqa}
    gt["999"] = {"question": "unbalanced", "imageId": "n1", "answer": "no", "isBalanced": False,
                 "types": {"structural": "verify"}}
    _json(root / "gqa/data/testdev_balanced_questions.json", gt)

    # VQAv2: LLaVA's test-dev question file (gt null in conf: answers only).
    _jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
           [{"question_id": 100 + i, "image": f"COCO_test2015_{i:012d}.jpg", "text": f"How many digits are there?\n{SHORT}",
             "category": "default"} for i in range(3)])
    for i in range(3):
        _img(root / f"vqav2/test2015/COCO_test2015_{i:012d}.jpg", (20 + 10 * i, 30), "L")
    # A val-style annotation file for a scored VQAv2 run.
    _json(root / "vqav2/v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 100 + i, "answer_type": "number", "question_type": "how many",
         "answers": [{"answer": str(k % 3), "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)]}
        for i in range(3)]})

    # TextVQA: question id + OCR-token prompt, official annotation file.
    tv = [(34602, "003a8ae2ef43b901", "what is the brand of this camera?", ["dakota"] * 8 + ["nikon"] * 2),
          (34603, "0046b5fb1a5f1f33", "what digit is in row 1, column 2?", ["7"] * 10)]
    _jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": q, "image": f"{im}.jpg", "text": f"{t}\nReference OCR token: dakota, digital\n{SHORT}",
             "category": "default"} for q, im, t, _ in tv])
    _json(root / "textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": [
        {"question_id": q, "image_id": im, "question": t, "answers": a} for q, im, t, a in tv]})
    for _, im, _, _ in tv:
        _img(root / f"textvqa/train_images/{im}.jpg", (64, 48))

    # POPE: question text without the suffix (eval.py appends it), labels per category folder.
    pope = []
    for cat in ("adversarial", "popular", "random"):
        for k, (obj, label) in enumerate((("person", "yes"), ("snowboard", "no"))):
            pope.append((len(pope) + 1, cat, f"Is there a {obj} in the image?", label, k))
    _jsonl(root / "pope/llava_pope_test.jsonl",
           [{"question_id": q, "image": f"COCO_val2014_{k:012d}.jpg", "text": t, "category": c} for q, c, t, _, k in pope])
    for cat in ("adversarial", "popular", "random"):
        _jsonl(root / f"pope/coco/coco_pope_{cat}.json",
               [{"question_id": q, "image": f"COCO_val2014_{k:012d}.jpg", "text": t, "label": lab}
                for q, c, t, lab, k in pope if c == cat])
    for k in range(2):
        _img(root / f"pope/val2014/COCO_val2014_{k:012d}.jpg", (48, 36), "CMYK" if k else "RGB")

    # MME: two questions per image, release folder as the gt (two folder layouts).
    mme_root = root / "MME/MME_Benchmark_release_version"
    mme_q = []
    for cat, rel, txt_dir in (("artwork", "artwork/images/10002.jpg", "artwork/questions_answers_YN"),
                              ("existence", "existence/000000006040.png", "existence")):
        stem = Path(rel).stem
        pair = [(f"Is there a {cat} in this image? Please answer yes or no.", "Yes"),
                (f"Is there no {cat} in this image? Please answer yes or no.", "No")]
        (mme_root / txt_dir).mkdir(parents=True, exist_ok=True)
        (mme_root / txt_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pair))
        _img(mme_root / rel, (50, 40), "RGBA" if rel.endswith(".png") else "RGB")
        mme_q += [{"question_id": rel, "image": rel, "text": f"{q}\n{SHORT}", "category": cat} for q, _ in pair]
    _jsonl(root / "MME/llava_mme.jsonl", mme_q)

    # ScienceQA: conversation-format question list (one text-only), problems.json with splits.
    sqa = [("4", True, ["West Virginia", "Louisiana", "Arizona"], 0),
           ("5", False, ["yes", "no"], 1),
           ("7", True, ["3", "7"], 1)]
    qs = []
    for pid, img, choices, _ in sqa:
        opts = " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
        value = f"Context: a grid.\nQuestion: Which is it?\nOptions: {opts}"
        rec = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if img else "") + value},
                                            {"from": "gpt", "value": "A"}]}
        if img:
            rec["image"] = f"{pid}/image.png"
            _img(root / f"scienceqa/images/test/{pid}/image.png", (60, 20), "P")
        qs.append(rec)
    _json(root / "scienceqa/llava_test_CQM-A.json", qs)
    problems = {pid: {"question": "Which is it?", "choices": ch, "answer": a, "image": "image.png" if img else None,
                      "split": "test"} for pid, img, ch, a in sqa}
    problems["8"] = {"question": "val only", "choices": ["a", "b"], "answer": 0, "image": None, "split": "val"}
    _json(root / "scienceqa/problems.json", problems)
    return {"n_questions": {"gqa": 4, "vqav2": 3, "textvqa": 2, "pope": 6, "mme": 4, "scienceqa": 3}}


# -- the trained checkpoint and the sweep --------------------------------------------------------------
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def bench_ws(workspace, tmp_path_factory):
    """A tiny model trained in the session workspace's data (shared cache) but with its own log
    folder and MLflow store, so the other e2e tests' run counts and checkpoint globs are unaffected."""
    root = tmp_path_factory.mktemp("bench")
    env = {**workspace.env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    paths = [f"paths.data_dir={workspace.root / 'data'}", f"paths.log_dir={root / 'outputs'}"]

    def run(script, *overrides, tiny=True):
        flags = [o for o in overrides if o.startswith("-")]
        rest = [o for o in overrides if not o.startswith("-")]
        args = [sys.executable, str(ROOT / script), *flags, *paths, *(TINY if tiny else []), *rest]
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    run("train.py", "seed=11", "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false")
    ckpt = next((root / "outputs" / "runs").glob("*/checkpoints/last.ckpt"))
    eval_root = root / "llava_eval"
    info = write_llava_eval(eval_root)

    from mlflow.tracking import MlflowClient

    return {"root": root, "ckpt": ckpt, "eval_root": eval_root, "run": run, "info": info, "uri": env["MLFLOW_TRACKING_URI"],
            "client": MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])}


@pytest.fixture(scope="module")
def bench_sweep(bench_ws):
    ws = bench_ws
    ws["run"]("eval.py", "-m", f"ckpt_path={ws['ckpt']}", "benchmark=synthetic,gqa,vqav2,textvqa,pope,mme,scienceqa",
              f"benchmark.root={ws['eval_root']}", "benchmark.num_workers=0", "eval_batch_size=4", tiny=False)
    client = ws["client"]
    exp = client.get_experiment_by_name("eval")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("vtc.kind") == "sweep"]
    assert len(parents) == 1
    children = {r.data.params["benchmark.name"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return children


def _answers(client, run, name, tmp_path) -> Path:
    local = client.download_artifacts(run.info.run_id, f"answers/{name}.jsonl", str(tmp_path))
    return Path(local)


@slow
@pytest.mark.parametrize("name", ["gqa", "textvqa", "pope", "mme", "scienceqa"])
def test_benchmark_answers_file_and_logged_scores(bench_ws, bench_sweep, name, tmp_path):
    from vtc.data.eval_files import read_questions
    from vtc.data.eval_score import score_benchmark

    run = bench_sweep[name]
    assert run.info.status == "FINISHED"
    spec = {"gqa": ("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/testdev_balanced_questions.json", {}, SHORT),
            "textvqa": ("textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/TextVQA_0.5.1_val.json", {}, SHORT),
            "pope": ("pope/llava_pope_test.jsonl", "pope/coco", {}, SHORT),
            "mme": ("MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version", {}, SHORT),
            "scienceqa": ("scienceqa/llava_test_CQM-A.json", "scienceqa/problems.json", {"split": "test"}, LETTER)}[name]
    qfile, gt, options, suffix = (bench_ws["eval_root"] / spec[0], bench_ws["eval_root"] / spec[1], spec[2], spec[3])
    questions = read_questions(qfile)

    path = _answers(bench_ws["client"], run, name, tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # LLaVA's answers format: keys in order, one line per question in file order, ids unchanged.
    assert len(rows) == len(questions) == bench_ws["info"]["n_questions"][name]
    model_id = bench_ws["ckpt"].parent.parent.name
    for q, a in zip(questions, rows):
        assert list(a) == ANSWER_KEYS
        assert a["question_id"] == q["question_id"] and type(a["question_id"]) is type(q["question_id"])
        text = q["text"] if q["text"].endswith(suffix) else f"{q['text']}\n{suffix}"
        if name == "scienceqa" and q.get("image"):
            text = "<image>\n" + text
        assert a["prompt"] == text
        assert isinstance(a["text"], str) and a["text"] == a["text"].strip()
        assert len(a["answer_id"]) == 22 and a["model_id"] == model_id and a["metadata"] == {}
    assert len({a["answer_id"] for a in rows}) == len(rows)

    # Logged <bench>/<metric> == score_benchmark recomputed from the answers file alone.
    expected = score_benchmark(name, str(path), str(gt), questions=str(qfile), **options)
    logged = {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(f"{name}/")}
    assert set(logged) == set(expected)
    for k, v in expected.items():
        assert logged[k] == pytest.approx(v, abs=1e-9), k
    assert expected["n"] == len(questions)
    # Generation cost next to it.
    m = run.data.metrics
    for k in ("cost/prefill_ms", "cost/decode_tok_s", "cost/kv_bytes", "cost/prefill_tflops"):
        assert m[k] > 0, k
    assert m["cost/batch_size"] == min(4, len(questions))


@slow
def test_vqav2_without_ground_truth_writes_answers_only(bench_ws, bench_sweep, tmp_path):
    run = bench_sweep["vqav2"]
    rows = [json.loads(x) for x in _answers(bench_ws["client"], run, "vqav2", tmp_path).read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [100, 101, 102]
    assert not [k for k in run.data.metrics if k.startswith("vqav2/")]
    assert run.data.metrics["cost/kv_bytes"] > 0


@slow
def test_synthetic_benchmark_keeps_test_metrics_and_adds_cost(bench_sweep):
    m = bench_sweep["synthetic"].data.metrics
    assert 0.0 <= m["test/acc"] <= 1.0 and m["test/visual_tokens"] == 64
    assert m["cost/batch_size"] == 4 and m["cost/batches"] == 8  # 32 test samples
    assert m["cost/visual_tokens"] == 64 and m["cost/prefill_ms"] > 0 and m["cost/decode_tok_s"] > 0


@slow
def test_report_over_the_benchmark_sweep(bench_ws, bench_sweep, tmp_path):
    """python -m vtc.runs.report on the eval sweep: one row per benchmark, numbers straight from MLflow,
    files logged on the sweep's parent."""
    from vtc.runs.report import make_report

    client = bench_ws["client"]
    parent = bench_sweep["gqa"].data.tags["mlflow.parentRunId"]
    data = make_report("eval", parent=parent, out=str(tmp_path / "rep"), tracking_uri=bench_ws["uri"], metric="test/acc")
    labels = {c["label"]: c for c in data["configurations"]}
    assert len(labels) == 7 and all(len(c["run_ids"]) == 1 for c in labels.values())
    gqa = next(c for k, c in labels.items() if "benchmark.name=gqa" in k)
    assert gqa["stats"]["gqa/acc"]["mean"] == pytest.approx(bench_sweep["gqa"].data.metrics["gqa/acc"])
    assert gqa["stats"]["cost/prefill_ms"]["mean"] == pytest.approx(bench_sweep["gqa"].data.metrics["cost/prefill_ms"])
    assert {"gqa/acc", "pope/f1", "mme/perception", "scienceqa/img_acc", "test/acc", "cost/kv_bytes"} <= set(data["columns"])
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert "report/report.md" in arts and "report/acc_vs_tflops.png" in arts


@slow
def test_runs_are_told_apart_by_benchmark_and_keep_the_checkpoint_config(bench_sweep):
    assert set(bench_sweep) == {"synthetic", "gqa", "vqav2", "textvqa", "pope", "mme", "scienceqa"}
    for name, run in bench_sweep.items():
        assert run.data.params["data.eval_batch_size"] == "4"
        assert run.data.params["llm.config.hidden_size"] == "32"
        if name != "synthetic":  # the files it read, as tags
            assert Path(run.data.tags["vtc.benchmark.questions"]).is_file()
            assert run.data.params["benchmark.prompt_suffix"] in (SHORT, LETTER)


def test_benchmark_files_are_checked_naming_the_key(tmp_path):
    """conf/benchmark composes; a missing question file or image folder is a ConfigError naming the
    key (evaluate() checks before building anything)."""
    from hydra import compose, initialize_config_dir

    import vtc.config  # noqa: F401  (resolvers)
    from vtc.errors import ConfigError
    from vtc.eval.bench import benchmark_spec

    def cfg(*overrides):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return compose("eval", overrides=["ckpt_path=x", f"paths.output_dir={tmp_path}", *overrides])

    assert benchmark_spec(cfg()) is None  # synthetic: the checkpoint's own test split
    with pytest.raises(ConfigError, match="benchmark.questions"):
        benchmark_spec(cfg("benchmark=gqa", f"benchmark.root={tmp_path}"))
    write_llava_eval(tmp_path)
    spec = benchmark_spec(cfg("benchmark=scienceqa", f"benchmark.root={tmp_path}"))
    assert spec["questions"] == str(tmp_path / "scienceqa/llava_test_CQM-A.json") and spec["prompt_suffix"] == LETTER
    assert spec["options"] == {"split": "test"} and spec["answers_file"] == str(tmp_path / "answers/scienceqa.jsonl")
    with pytest.raises(ConfigError, match="benchmark.images"):
        benchmark_spec(cfg("benchmark=pope", f"benchmark.root={tmp_path}", "benchmark.images=/nonexistent"))
    assert benchmark_spec(cfg("benchmark=vqav2", f"benchmark.root={tmp_path}"))["gt"] is None


@slow
def test_vqav2_scored_in_process_with_val_annotations(bench_ws, tmp_path):
    """evaluate_benchmark directly (no subprocess): VQAv2 with a ground truth, and a test-time
    compressor changes the measured KV cache but not the answer file's shape."""
    from omegaconf import OmegaConf

    from vtc.data.eval_score import score_benchmark
    from vtc.data.tokenizer import load_tokenizer
    from vtc.eval.bench import evaluate_benchmark
    from vtc.cost.meter import CostMeter
    from vtc.assembly.checkpoint import load_checkpoint, load_weights
    from vtc.eval.task import eval_config
    from vtc.assembly.build import build_datamodule
    from vtc.train.task import build_module

    root = bench_ws["eval_root"]
    ckpt = load_checkpoint(str(bench_ws["ckpt"]))
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "precision": "32-true"},
                            "paths": {"output_dir": str(tmp_path)}, "ckpt_path": str(bench_ws["ckpt"])})
    spec = {"name": "vqav2", "questions": str(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"),
            "images": str(root / "vqav2/test2015"), "gt": str(root / "vqav2/v2_mscoco_val2014_annotations.json"),
            "prompt_suffix": SHORT, "options": {}, "limit": 2, "num_workers": 0,
            "answers_file": str(tmp_path / "vqav2.jsonl")}
    kv = {}
    for comp in (None, {"_target_": "vtc.compressors.AvgPool2d", "stride": 2}):
        run_cfg = eval_config(OmegaConf.create({"compressor": comp} if comp else {}), ckpt)
        OmegaConf.set_struct(run_cfg, False)
        run_cfg.data.eval_batch_size = 2
        tok = load_tokenizer(run_cfg.llm.tokenizer_path)
        module = build_module(run_cfg, tok)
        load_weights(module, ckpt["state_dict"], compressor_changed=comp is not None)
        with CostMeter(module.model, warmup=0) as meter:
            metrics, path = evaluate_benchmark(spec, cfg, module, build_datamodule(run_cfg), "m")
        expected = score_benchmark("vqav2", path, spec["gt"])
        assert metrics == {f"vqav2/{k}": v for k, v in expected.items()}
        assert metrics["vqav2/n"] == 2 and metrics["vqav2/n_missing"] == 1 and "vqav2/acc_number" in metrics
        kv[comp is None] = meter.summary()
    # Pooling 8x8 -> 4x4 leaves 48 fewer tokens in every layer's cache.
    full, pooled = kv[True], kv[False]
    assert full["cost/visual_tokens"] == 64 and pooled["cost/visual_tokens"] == 16
    assert full["cost/kv_bytes"] > pooled["cost/kv_bytes"]
    assert full["cost/prefill_tflops"] > pooled["cost/prefill_tflops"]


# -- fast: the cost meter and the prompt, on tests.tiny's tiny models ---------------------------------
def _args(batch):
    return batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_index"]


def test_cost_meter_leaves_generation_unchanged_and_unhooks():
    from vtc.cost.meter import CostMeter
    from tests.tiny import tiny_lmm, toy_batch

    model, batch = tiny_lmm(), toy_batch()
    ref = model.generate(*_args(batch), max_new_tokens=5, eos_token_id=-1)
    with CostMeter(model, warmup=1, decode_probe=3) as meter:
        out = model.generate(*_args(batch), max_new_tokens=5, eos_token_id=-1)
        out2 = model.generate(*_args(batch), max_new_tokens=5, eos_token_id=-1)
    assert out[0] == ref[0] == out2[0] and torch.equal(out[1], ref[1])
    assert "generate" not in vars(model) and "next_token" not in vars(model) and "run_layers" not in vars(model.llm)
    assert len(meter.batches) == 2  # warm-up and probe calls are not batches
    b = meter.batches[0]
    assert b.batch_size == 3 and b.decode_tokens == 3 * 4 and b.prefill_s > 0 and b.decode_s > 0
    assert meter.probe.decode_tokens == 3 * 3
    s = meter.summary()
    assert s["cost/decode_probe_tokens"] == 9
    assert s["cost/decode_tok_s"] == pytest.approx(9 / meter.probe.decode_s)
    assert s["cost/prefill_ms"] == pytest.approx(1e3 * (meter.batches[0].prefill_s + meter.batches[1].prefill_s) / 2)


def _kv_expected(model, lengths_per_layer: list[int], batch: int) -> int:
    cfg = model.llm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return sum(2 * batch * cfg.num_key_value_heads * t * head_dim * 4 for t in lengths_per_layer)


def test_kv_bytes_and_prefill_flops_follow_the_compressor():
    """Toy batch: the longest sample has 6 text tokens + 16 patches (4x4 grid); the cache is
    padded to the longest sequence of each layer segment."""
    from vtc.cost.accounting import batch_flops, model_shape
    from vtc.compressors import AvgPool2d
    from vtc.compressors.vcc import VisualContextCompressor
    from vtc.cost.meter import CostMeter
    from tests.tiny import tiny_lmm, toy_batch

    batch = toy_batch()
    cases = {
        "none": (None, [22, 22, 22]),
        "pool": (AvgPool2d(stride=2), [10, 10, 10]),  # 16 -> 4 patches before the LLM
        "vcc": (VisualContextCompressor(layer=1, stride=4), [22, 10, 10]),  # layer 0 full, then 16 -> 4
    }
    for name, (comp, per_layer) in cases.items():
        model = tiny_lmm(comp)
        with CostMeter(model, warmup=0) as meter:
            _, seen = model.generate(*_args(batch), max_new_tokens=2)
        rec = meter.batches[0]
        assert rec.kv_bytes == _kv_expected(model, per_layer, 3), name
        state = model.build_sequence(*_args(batch)[:2], None, *_args(batch)[2:])
        expected = batch_flops(model_shape(model), state.lengths, state.visual_counts(), seen, None, trainable=None,
                               extra_per_image=model.compressor.own_flops(model.encoder.info.num_patches))
        assert rec.prefill_flops == pytest.approx(expected), name
        assert meter.summary()["cost/prefill_tflops"] == pytest.approx(expected / 3 / 1e12)


def test_prompt_suffix_is_added_once():
    from vtc.eval.bench import build_prompt

    assert build_prompt({"text": "Is it red?"}, SHORT) == f"Is it red?\n{SHORT}"
    assert build_prompt({"text": f"Is it red?\n{SHORT}"}, SHORT) == f"Is it red?\n{SHORT}"
    assert build_prompt({"text": "Q\nOptions: (A) x"}, None) == "Q\nOptions: (A) x"


def test_benchmark_prompt_uses_the_trained_system_prompt(tmp_path):
    """A benchmark question is encoded with the system prompt the model was trained with
    (data.system_prompt), the same ids as the conversation template gives."""
    from vtc.data.templates import encode_conversation
    from vtc.data.tokenizer import build_tiny_tokenizer, load_tokenizer
    from vtc.eval.bench import QuestionDataset
    from vtc.eval.init_from import prompt_settings

    build_tiny_tokenizer(["Is it red?", SHORT], tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    q = [{"question_id": 7, "text": "Is it red?"}]
    conv = [{"from": "human", "value": f"Is it red?\n{SHORT}"}, {"from": "gpt", "value": ""}]
    ids = {}
    for system in (None, ""):
        item = QuestionDataset(q, str(tmp_path), tok, "vicuna_v1", None, None, SHORT, system)[0]
        assert item["input_ids"] == encode_conversation(tok, conv, "vicuna_v1", None, False, system)["gen_input_ids"]
        ids[system] = item["input_ids"]
    assert len(ids[None]) > len(ids[""]) and ids[None][-len(ids[""]) + 1:] == ids[""][1:]
    from omegaconf import OmegaConf
    data = {"template": "vicuna_v1", "image_size": 28, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "batch_size": 2, "max_length": 64}
    assert prompt_settings(OmegaConf.create({"data": data})).system_prompt is None
    assert prompt_settings(OmegaConf.create({"data": {**data, "system_prompt": ""}})).system_prompt == ""
