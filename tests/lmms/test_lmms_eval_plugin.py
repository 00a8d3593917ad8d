"""vtc as an lmms-eval model (vtc/lmms): a local task over tiny-world images, evaluated offline
through lmms-eval's own evaluator and CLI; batch size 8 gives the answers of batch size 1, which
are vtc.load(...).generate's. Skipped only where the optional lmms extra is not installed (make
setup installs it, so CI runs this)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

lmms_eval = pytest.importorskip("lmms_eval")

import vtc  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.eval.test_predict import split_samples  # noqa: E402

pytestmark = pytest.mark.slow
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
N = 12
SUFFIX = "Answer the question using a single word or phrase."


def write_task(root: Path, ckpt: Path) -> list[dict]:
    """An lmms-eval task (yaml + utils.py) over a local json file of N samples of the checkpoint's
    test split, their images as files; returns the docs."""
    docs = []
    (root / "images").mkdir(parents=True)
    for key, image, text in split_samples(ckpt)[:N]:
        path = root / "images" / f"{key}.png"
        image.save(path)
        question = text.replace("<image>", "").strip()
        docs.append({"id": key, "image": str(path), "question": question})
    answers = {d["id"]: a for d, a in zip(docs, reference(ckpt, docs, compressor=None))}
    for d in docs:  # the task's "truth": the uncompressed model's answer (exercises the scoring path)
        d["answer"] = answers[d["id"]]
    (root / "docs.json").write_text(json.dumps(docs))
    (root / "utils.py").write_text(textwrap.dedent(f'''
        from PIL import Image

        def doc_to_visual(doc):
            return [Image.open(doc["image"]).convert("RGB")]

        def doc_to_text(doc, lmms_eval_specific_kwargs=None):
            return doc["question"] + "\\n{SUFFIX}"

        def process_results(doc, results):
            return {{"agree": float(results[0].strip() == doc["answer"])}}
        '''))
    (root / "vtc_tiny.yaml").write_text(textwrap.dedent(f"""
        task: vtc_tiny
        dataset_path: json
        dataset_kwargs:
          data_files: {{test: {root / 'docs.json'}}}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        process_results: !function utils.process_results
        generation_kwargs: {{max_new_tokens: 4, temperature: 0, do_sample: false, until: ["\\n"]}}
        metric_list:
          - {{metric: agree, aggregation: mean, higher_is_better: true}}
        """))
    return docs


def reference(ckpt: Path, docs: list[dict], compressor) -> list[str]:
    model = vtc.load(ckpt, device="cpu")
    answers = model.generate([d["image"] for d in docs], [f"{d['question']}\n{SUFFIX}" for d in docs],
                             compressor=compressor, max_new_tokens=4, batch_size=1)
    return [a.text.split("\n")[0] for a in answers]


@pytest.fixture(scope="module")
def task(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_task")
    return root, write_task(root, tiny_ckpt)


def responses(samples: list[dict]) -> dict[str, str]:
    return {s["doc"]["id"]: s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0] for s in samples}


def test_batch_8_answers_as_batch_1_and_as_vtc_load(tiny_ckpt, task, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    root, docs = task
    args = f"ckpt_path={tiny_ckpt},compressor=pool,stride=2"  # device: simple_evaluate passes it
    runs = {}
    for bs in (1, 8):
        out = simple_evaluate(model="vtc", model_args=args, tasks=["vtc_tiny"], batch_size=bs, device="cpu",
                              task_manager=TaskManager(include_path=str(root), include_defaults=False),
                              log_samples=True)
        runs[bs] = out
    by_bs = {bs: responses(out["samples"]["vtc_tiny"]) for bs, out in runs.items()}
    assert by_bs[1] == by_bs[8]
    ours = dict(zip((d["id"] for d in docs), reference(tiny_ckpt, docs, {"name": "pool", "stride": 2})))
    assert by_bs[8] == ours
    agree = sum(ours[d["id"]] == d["answer"] for d in docs) / len(docs)
    assert runs[8]["results"]["vtc_tiny"]["agree,none"] == pytest.approx(agree)


def test_the_cli_finds_the_plugin_and_evaluates_offline(tiny_ckpt, task, tmp_path):
    root, docs = task
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtc", "--model_args",
           f"ckpt_path={tiny_ckpt},compressor=pool,stride=2,device=cpu", "--tasks", "vtc_tiny", "--include_path",
           str(root), "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (results,) = [p for p in (tmp_path / "out").rglob("*results*.json")]
    got = json.loads(results.read_text())["results"]["vtc_tiny"]["agree,none"]
    ours = reference(tiny_ckpt, docs, {"name": "pool", "stride": 2})
    assert got == pytest.approx(sum(a == d["answer"] for a, d in zip(ours, docs)) / len(docs))


def test_bad_model_args_are_refused_with_the_key(tiny_ckpt):
    from vtc.errors import ConfigError
    from vtc.lmms.model import VtcLMM

    with pytest.raises(ValueError, match="exactly one of ckpt_path"):
        VtcLMM()
    with pytest.raises(ValueError, match="no compressor"):
        VtcLMM(ckpt_path=str(tiny_ckpt), stride=2)
    with pytest.raises(ConfigError, match="compressor.strid"):
        VtcLMM(ckpt_path=str(tiny_ckpt), compressor="pool", strid=2, device="cpu")
