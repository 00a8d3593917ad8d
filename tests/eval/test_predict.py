"""``vtc.load(path).generate(...)`` and ``vtc predict`` (vtc/eval/predict.py) against eval.py.

Two sources: a tiny vtc checkpoint trained by train.py (its synthetic test split is what eval.py
evaluates it on), and the tiny transformers-Llava directory of tests/interop/llava_dirs.py
(eval.py reads it with ``model.init_from``; the GQA files are tests/eval/test_zero_shot_eval.py's).
The reference each time is eval.py's own task run in this process (``vtc.eval.task.evaluate``, on
its default trainer: the CPU, so the models here are loaded with ``device="cpu"`` too): its answers
file / predictions.jsonl, and for the checkpoint its logged ``cost/*`` metrics.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import vtc
from tests.conftest import ROOT
from tests.eval.test_zero_shot_eval import IMAGES, MAX_NEW, QUESTIONS, eval_cfg, write_gqa
from tests.interop.llava_dirs import N, dirs  # noqa: F401  (fixture: the tiny Llava directories)
from vtc.errors import ConfigError

slow = pytest.mark.slow
GRID = 64  # the tiny world's 8x8 patch grid (112 px / 14 px)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


@pytest.fixture(scope="module")
def gqa_root(tmp_path_factory):
    return write_gqa(tmp_path_factory.mktemp("predict_gqa"))


def split_samples(ckpt: Path) -> list[tuple[str, Image.Image, str]]:
    """(id, image, question) of every sample of the checkpoint's synthetic test split, from its shards."""
    import torch
    from omegaconf import OmegaConf

    stored = OmegaConf.create(torch.load(ckpt, map_location="cpu", weights_only=True)["vtc"]["config"])
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted((Path(stored.data.root) / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.rsplit(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(key, Image.open(io.BytesIO(files["jpg"])), json.loads(files["json"])["conversations"][0]["value"])
            for key, files in sorted(members.items())]


def mlflow_eval_cfg(out: Path, uri: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.output_dir={out}", f"logger.mlflow.tracking_uri={uri}", *overrides])


def _metrics(uri: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("eval")
    [run] = client.search_runs([exp.experiment_id])
    return run.data.metrics


# -- a trained checkpoint ---------------------------------------------------------------------------
@slow
def test_checkpoint_answers_and_cost_equal_eval_py_under_test_time_pooling(ckpt, tmp_path):
    """eval.py ckpt_path=... compressor=pool compressor.stride=2 on one batch (16) of the test split."""
    from vtc.eval.task import evaluate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    evaluate(mlflow_eval_cfg(tmp_path / "eval", uri, f"ckpt_path={ckpt}", "compressor=pool", "compressor.stride=2",
                             "trainer.limit_test_batches=1", "cost.warmup=0", "cost.decode_probe=0"))
    theirs = {r["question_id"]: r["text"] for r in map(json.loads, (tmp_path / "eval/predictions.jsonl").open())}
    cost = _metrics(uri)

    samples = [s for s in split_samples(ckpt) if s[0] in theirs]
    assert len(samples) == len(theirs) == 16  # TINY's data.eval_batch_size
    model = vtc.load(ckpt, device="cpu")
    answers = model.generate([im for _, im, _ in samples], [q for _, _, q in samples],
                             compressor={"name": "pool", "stride": 2})
    assert {k: a.text for (k, _, _), a in zip(samples, answers)} == theirs
    assert len(set(theirs.values())) > 1  # the answers follow the inputs: the comparison sees them
    assert {a.visual_tokens for a in answers} == {GRID // 4} == {cost["cost/visual_tokens"]}
    mean_flops = sum(a.prefill_flops for a in answers) / len(answers)
    assert mean_flops / 1e12 == pytest.approx(cost["cost/prefill_tflops"], rel=1e-9)


@slow
def test_checkpoint_batches_and_compression(ckpt, tmp_path):
    samples = split_samples(ckpt)[:3]
    images, prompts = [im for _, im, _ in samples], [q for _, _, q in samples]
    paths = []
    for i, im in enumerate(images):  # paths work as PIL images do
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    model = vtc.load(str(ckpt), device="cpu")
    own = model.generate(paths, prompts)  # the checkpoint's own compressor: none
    assert model.generate(images, prompts) == own  # a path (PNG, lossless) reads as the PIL image it holds
    pooled = {s: model.generate(images, prompts, compressor={"name": "pool", "stride": s}) for s in (2, 4)}
    assert [a.visual_tokens for a in own] == [GRID] * 3
    assert [a.visual_tokens for a in pooled[2]] == [GRID // 4] * 3 and [a.visual_tokens for a in pooled[4]] == [4] * 3
    for a, b, c in zip(own, pooled[2], pooled[4]):
        assert a.prefill_flops > b.prefill_flops > c.prefill_flops > 0
    alone = [model.generate([im], [q], compressor="pool")[0] for im, q in zip(images[:2], prompts[:2])]
    assert model.generate(images[:2], prompts[:2], compressor="pool", batch_size=2) == alone == pooled[2][:2]
    # An in-LLM compressor keeps the tokens entering the LLM and lowers the layer average
    [fastv] = model.generate(images[:1], prompts[:1], compressor={"name": "fastv", "layer": 1, "ratio": 0.5})
    assert fastv.visual_tokens == GRID and fastv.equiv_visual_tokens < GRID
    assert fastv.prefill_flops < own[0].prefill_flops


# -- a released LLaVA directory -----------------------------------------------------------------------
@pytest.mark.parametrize("pool", [False, True])
def test_llava_directory_answers_equal_eval_py(dirs, gqa_root, tmp_path, pool):  # noqa: F811
    from vtc.eval.task import evaluate

    images = [gqa_root / f"gqa/data/images/{im}.jpg" for _, im, _, _ in QUESTIONS]
    prompts = [f"{text}\nAnswer the question using a single word or phrase." for _, _, text, _ in QUESTIONS]
    compressor, overrides, tokens = (None, [], N)
    if pool:
        compressor, overrides, tokens = {"name": "pool", "stride": 2}, ["compressor=pool"], N // 4
    evaluate(eval_cfg(tmp_path, f"model.init_from={dirs['hf']}", *overrides, "benchmark=gqa",
                      f"benchmark.root={gqa_root}", "benchmark.num_workers=0", "eval_batch_size=2",
                      f"max_new_tokens={MAX_NEW}", "cost.measure=false"))
    theirs = [json.loads(line)["text"] for line in (tmp_path / "answers/gqa.jsonl").open()]
    hf = vtc.load(dirs["hf"], device="cpu")
    ours = hf.generate(images, prompts, compressor=compressor, max_new_tokens=MAX_NEW)
    assert [a.text for a in ours] == theirs
    assert sum(len(t.split()) >= 2 for t in theirs) >= 2  # real answers, not all empty
    assert {a.visual_tokens for a in ours} == {tokens}
    if pool:  # the same weights in the original-LLaVA layout (its LM head lacks <image>: other FLOPs)
        again = vtc.load(dirs["orig"], vision_tower=dirs["vision"], device="cpu").generate(
            images, prompts, compressor=compressor, max_new_tokens=MAX_NEW)
        assert [(a.text, a.visual_tokens) for a in again] == [(a.text, a.visual_tokens) for a in ours]
    else:  # each prompt alone = in one batch (right padding; images of three shapes)
        alone = [hf.generate([im], [q], max_new_tokens=MAX_NEW)[0] for im, q in zip(images, prompts)]
        assert hf.generate(images, prompts, max_new_tokens=MAX_NEW, batch_size=len(images)) == alone
        assert len(IMAGES) == 3 and len({a.prefill_flops for a in alone}) > 1  # prompts of several lengths


def test_bad_compressor_is_the_config_error_eval_raises(dirs, gqa_root, tmp_path):  # noqa: F811
    from vtc.eval.task import evaluate

    model = vtc.load(dirs["hf"], device="cpu")
    img, prompt = [gqa_root / "gqa/data/images/n1.jpg"], ["what is in the picture ?"]
    with pytest.raises(ConfigError) as ours:
        model.generate(img, prompt, compressor={"name": "pool", "stride": 3})  # the 4x4 grid
    with pytest.raises(ConfigError) as theirs:
        evaluate(eval_cfg(tmp_path, f"model.init_from={dirs['hf']}", "compressor=pool", "compressor.stride=3",
                          "benchmark=gqa", f"benchmark.root={gqa_root}"))
    assert ours.value.key == "compressor.stride" and str(ours.value) == str(theirs.value)
    with pytest.raises(ConfigError, match=r"^compressor.llm.strid: not a knob of compressor 'stf_vcc'"):
        model.generate(img, prompt, compressor={"name": "stf_vcc", "llm": {"strid": 2}})
    with pytest.raises(ConfigError, match=r"^compressor: 'poll' is not a compressor config"):
        model.generate(img, prompt, compressor="poll")
    with pytest.raises(ConfigError, match=r"^compressor: \{'stride': 2\}: give a config name"):
        model.generate(img, prompt, compressor={"stride": 2})
    with pytest.raises(ConfigError, match=r"^compressor: .*SpatialTokenFusion has parameters"):
        model.generate(img, prompt, compressor="stf")  # a released model has none of STF's weights
    with pytest.raises(FileNotFoundError, match=r"^images\[0\]: '/nope.jpg' is not a file"):
        model.generate(["/nope.jpg"], prompt)
    with pytest.raises(ValueError, match="one image per prompt"):
        model.generate(img * 2, prompt)
    with pytest.raises(ConfigError, match=r"^path: '/nope/last.ckpt' does not exist"):
        vtc.load("/nope/last.ckpt")


# -- the command ---------------------------------------------------------------------------------------
def _vtc(capsys, *args: str) -> tuple[int, str, str]:
    from vtc.cli import main

    with pytest.raises(SystemExit) as e:
        main(["predict", *args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_prints_the_answer_tokens_and_flops(dirs, gqa_root, capsys):  # noqa: F811
    img, question = str(gqa_root / "gqa/data/images/n2.jpg"), "is the car red ?"
    code, out, err = _vtc(capsys, "--ckpt", dirs["hf"], "--image", img, "--question", question,
                          "--compressor", "pool", "--set", "stride=2", "--max-new-tokens", "5", "--device", "cpu")
    assert code == 0, err
    model = vtc.load(dirs["hf"], device="cpu")
    [a] = model.generate([img], [question], compressor={"name": "pool", "stride": 2}, max_new_tokens=5)
    assert out.splitlines() == [f"answer: {a.text}", f"visual tokens: {N // 4}",
                                f"prefill FLOPs: {a.prefill_flops:.4g}"]
    code, _, err = _vtc(capsys, "--ckpt", dirs["hf"], "--image", "/nope.jpg", "--question", question)
    assert code == 2 and "--image /nope.jpg: no such file" in err
    code, _, err = _vtc(capsys, "--ckpt", "/nope/last.ckpt", "--image", img, "--question", question)
    assert code == 2 and "--ckpt /nope/last.ckpt: no such file or directory" in err
    code, _, err = _vtc(capsys, "--ckpt", dirs["hf"], "--image", img, "--question", question,
                        "--compressor", "pool", "--set", "stride=3")
    assert code == 2 and "vtc predict: compressor.stride: 3 does not divide the 4x4 patch grid" in err


def test_import_vtc_stays_light():
    code = "import sys, vtc; print(callable(vtc.load), sorted(m for m in ('torch', 'hydra') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "True []", r.stderr
