"""Zero-shot evaluation of a released LLaVA directory: ``eval.py model.init_from=DIR`` with no vtc
checkpoint (LLaVolta's Figure 1 experiment), and ``python -m vtc.cli.flops model.init_from=DIR``.

The tiny transformers-Llava directory is tests/interop/llava_dirs.py's (``dirs`` fixture); the GQA
files follow LLaVA's playground layout (tests/eval/test_eval_benchmarks.py's writers). The reference
answers come from transformers' ``LlavaForConditionalGeneration`` on inputs this file builds
itself, the way LLaVA does: the ``conv_vicuna_v1`` prompt tokenised in one piece with ``<s>`` in
front and ``<image>`` expanded to the patch count, and pixels from LLaVA's ``expand2square`` +
transformers' own CLIP image processor.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT
from tests.eval.test_eval_benchmarks import SHORT, _img, _json, _jsonl
from tests.interop.llava_dirs import N, dirs, reference  # noqa: F401  (fixtures: the tiny Llava and transformers' copy)
from vtc.errors import ConfigError

# Questions in the tiny tokenizer's words (others would all be <unk>), images of several shapes so
# that padding to a square matters.
QUESTIONS = [("q1", "n1", "what is in the picture ?", "cat"),
             ("q2", "n2", "is the car red ?", "red"),
             ("q3", "n3", "two blue tree ?", "two"),
             ("q4", "n1", "what is the dog ?", "dog"),
             ("q5", "n2", "one red car ?", "one")]
IMAGES = {"n1": ((40, 30), (200, 30, 30)), "n2": ((30, 50), (20, 180, 60)), "n3": ((56, 56), (10, 10, 220))}
MAX_NEW = 6


def write_gqa(root: Path) -> Path:
    _jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl",
           [{"question_id": q, "image": f"{im}.jpg", "text": f"{t}\n{SHORT}", "category": "default"}
            for q, im, t, _ in QUESTIONS])
    for im, (size, colour) in IMAGES.items():
        _img(root / f"gqa/data/images/{im}.jpg", size, colour=colour)
    _json(root / "gqa/data/testdev_balanced_questions.json",
          {q: {"question": t, "imageId": im, "answer": a, "fullAnswer": a, "isBalanced": True,
               "types": {"structural": "query", "semantic": "attr", "detailed": "x"}} for q, im, t, a in QUESTIONS})
    return root


@pytest.fixture(scope="module")
def gqa_root(tmp_path_factory):
    return write_gqa(tmp_path_factory.mktemp("llava_eval"))


@pytest.fixture(scope="module")
def sweep(workspace, dirs, gqa_root):  # noqa: F811
    """One eval.py sweep over compressor none / pool (stride 2) of the released directory."""
    workspace.run("eval.py", "-m", f"model.init_from={dirs['hf']}", "compressor=none,pool", "benchmark=gqa",
                  f"benchmark.root={gqa_root}", "benchmark.num_workers=0", "eval_batch_size=2",
                  f"max_new_tokens={MAX_NEW}", tiny=False)
    runs = [r for r in workspace.runs("eval") if r.data.tags.get("vtc.init_from") == dirs["hf"]]
    by = {r.data.params["compressor._target_"].rsplit(".", 1)[-1]: r for r in runs}
    assert len(runs) == 2 and set(by) == {"NoCompression", "AvgPool2d"}, [r.data.params.get("compressor._target_")
                                                                          for r in runs]
    return by


def answers(workspace, run, tmp_path) -> list[dict]:
    local = workspace.client().download_artifacts(run.info.run_id, "answers/gqa.jsonl", str(tmp_path))
    return [json.loads(line) for line in Path(local).read_text().splitlines()]


def test_eval_of_a_released_directory_is_logged_with_scores_and_visual_tokens(workspace, dirs, sweep, tmp_path):  # noqa: F811
    for name, visual in (("NoCompression", N), ("AvgPool2d", N // 4)):  # 4x4 patches; pool 2 -> 2x2
        run = sweep[name]
        assert run.info.status == "FINISHED"
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        assert m["cost/visual_tokens"] == visual
        assert m["gqa/n"] == len(QUESTIONS) and 0.0 <= m["gqa/acc"] <= 1.0
        assert m["cost/prefill_ms"] > 0 and m["cost/kv_bytes"] > 0
        assert p["model.init_from"] == dirs["hf"] and p["benchmark.name"] == "gqa"
        assert p["encoder.config.hidden_size"] == "32" and p["llm.config.hidden_size"] == "48"  # the directory's model
        assert t["vtc.source"] == dirs["hf"] and "vtc.ckpt_path" not in t
        rows = answers(workspace, run, tmp_path / name)
        assert [r["question_id"] for r in rows] == [q for q, *_ in QUESTIONS]
        assert all(r["model_id"] == "hf" for r in rows)  # the directory's name
    assert sweep["AvgPool2d"].data.metrics["cost/kv_bytes"] < sweep["NoCompression"].data.metrics["cost/kv_bytes"]


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA's llava/mm_utils.py expand2square."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, 0) if w < h else (0, (side - h) // 2))
    return out


def test_answers_without_compression_equal_transformers_greedy(workspace, dirs, reference, sweep, gqa_root,  # noqa: F811
                                                               tmp_path):
    from transformers import AutoImageProcessor, AutoTokenizer

    from vtc.data.templates import VICUNA_SYSTEM

    tok = AutoTokenizer.from_pretrained(dirs["hf"], local_files_only=True)
    proc = AutoImageProcessor.from_pretrained(dirs["hf"], local_files_only=True)
    image_id = reference.config.image_token_index
    ours = {r["question_id"]: r["text"] for r in answers(workspace, sweep["NoCompression"], tmp_path)}
    theirs = {}
    for q, im, text, _ in QUESTIONS:
        prompt = f"{VICUNA_SYSTEM} USER: <image>\n{text}\n{SHORT} ASSISTANT:"  # LLaVA's conv_vicuna_v1
        ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        assert ids.count(image_id) == 1
        k = ids.index(image_id)
        ids = torch.tensor([ids[:k] + [image_id] * N + ids[k + 1:]])
        with Image.open(gqa_root / f"gqa/data/images/{im}.jpg") as img:
            img = expand2square(img.convert("RGB"), tuple(int(x * 255) for x in proc.image_mean))
            pixels = proc(images=img, return_tensors="pt")["pixel_values"]
        out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                 max_new_tokens=MAX_NEW, do_sample=False, suppress_tokens=[image_id],
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        theirs[q] = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert ours == theirs
    assert sum(len(a.split()) >= 2 for a in ours.values()) >= 2  # real answers, not all empty
    pooled = {r["question_id"]: r["text"] for r in answers(workspace, sweep["AvgPool2d"], tmp_path / "pool")}
    assert pooled != ours  # the visual tokens steer these answers, so the images are part of the comparison


def write_llava_shards(root: Path) -> Path:
    """Four LLaVA-format test samples converted to a webdataset shard (vtc.data.convert)."""
    from vtc.data.convert import convert

    rows = []
    for i, (im, (size, colour)) in enumerate(IMAGES.items()):
        _img(root / "images" / f"{im}.jpg", size, colour=colour)
        rows.append({"id": f"s{i}", "image": f"{im}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture ?"}, {"from": "gpt", "value": "a cat"}]})
    _json(root / "test.json", rows)
    convert(root / "test.json", root / "images", root / "shards", progress=False, summary=False)
    return next((root / "shards").glob("*.tar"))


def test_data_override_gives_a_test_split_with_test_metrics(workspace, dirs, tmp_path):  # noqa: F811
    """Without a LLaVA benchmark, +override.data.test_shards=<LLaVA shards> is the test split:
    test/* metrics (visual tokens a quarter under pool 2) and predictions.jsonl, in-process."""
    from vtc.eval.task import evaluate

    shard = write_llava_shards(tmp_path / "data")
    out = tmp_path / "out"
    cfg = eval_cfg(out, f"model.init_from={dirs['hf']}", f"+override.data.test_shards={shard}", "compressor=pool",
                   "logger=mlflow", f"logger.mlflow.tracking_uri={workspace.env['MLFLOW_TRACKING_URI']}",
                   "logger.mlflow.run_name=zero-shot-shards", "cost.measure=false")
    evaluate(cfg)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(IMAGES)
    run = next(r for r in workspace.runs("eval") if r.data.tags.get("mlflow.runName") == "zero-shot-shards")
    m = run.data.metrics
    assert m["test/visual_tokens"] == N // 4 and 0.0 <= m["test/acc"] <= 1.0
    assert run.data.tags["vtc.init_from"] == dirs["hf"] and run.data.params["data.test_shards"] == str(shard)


# -- refused before anything is built -------------------------------------------------------------
def eval_cfg(tmp_path, *overrides):
    from hydra import compose, initialize_config_dir

    import vtc.config  # noqa: F401  (resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.output_dir={tmp_path}", "logger=csv", *overrides])


@pytest.mark.parametrize("keys", [[], ["ckpt_path=/x/last.ckpt", "model.init_from=/x/llava"]])
def test_neither_or_both_sources_is_an_error_naming_the_keys(tmp_path, keys):
    from vtc.eval.task import evaluate

    with pytest.raises(ConfigError, match=r"^ckpt_path / model.init_from: (nothing to evaluate|give one, not both)"):
        evaluate(eval_cfg(tmp_path, *keys))


def test_what_zero_shot_cannot_do_is_refused_naming_the_key(tmp_path, dirs, gqa_root):  # noqa: F811
    from vtc.eval.task import evaluate

    hf = f"model.init_from={dirs['hf']}"
    with pytest.raises(ConfigError, match="^benchmark: .*synthetic benchmark"):  # the default benchmark
        evaluate(eval_cfg(tmp_path, hf))
    with pytest.raises(ConfigError, match="^compressor: .*SpatialTokenFusion has parameters"):
        evaluate(eval_cfg(tmp_path, hf, "compressor=stf", "benchmark=gqa", f"benchmark.root={gqa_root}"))
    with pytest.raises(ConfigError, match="^compressor.stride"):  # checked against the directory's 4x4 grid
        evaluate(eval_cfg(tmp_path, hf, "compressor=pool", "compressor.stride=3", "benchmark=gqa",
                          f"benchmark.root={gqa_root}"))


def test_original_llava_directory_config_with_its_vision_tower(tmp_path, dirs):  # noqa: F811
    from vtc.eval.init_from import init_from_config

    cfg = eval_cfg(tmp_path, f"model.init_from={dirs['orig']}", f"model.vision_tower_path={dirs['vision']}",
                   "compressor=pool", "eval_batch_size=3", "max_new_tokens=5")
    run = init_from_config(cfg)
    assert run.model.init_from == dirs["orig"] and run.model.vision_tower_path == dirs["vision"]
    assert run.encoder.config.hidden_size == 32 and run.llm.tokenizer_path == dirs["orig"]
    assert run.compressor._target_.endswith("AvgPool2d") and run.data.eval_batch_size == 3
    assert run.generation.max_new_tokens == 5 and run.paths.output_dir == str(tmp_path)
    from vtc.eval.bench import model_id_of

    assert model_id_of(str(tmp_path)) == tmp_path.name  # a directory keeps its dots (llava-1.5-7b-hf)


def test_flops_cli_reads_a_released_directory(dirs, capsys):  # noqa: F811
    from vtc.cli.flops import main

    main([f"model.init_from={dirs['hf']}", "compressors=none,pool"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows["none"][1] == str(N) and rows["pool"][1] == str(N // 4)
