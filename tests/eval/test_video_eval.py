"""eval.py on the video benchmarks (conf/benchmark/{msvd_qa,msrvtt_qa,activitynet_qa,mvbench}.yaml,
vtc/eval/video_bench.py), end to end in-process on the tiny released Llava of
tests/interop/llava_dirs.py (``dirs``; 4x4 patches per frame).

The fixture videos are real mp4 files written here with PyAV (solid colours, as
tests/data/test_convert_video.py writes them), a folder of frame images (MVBench's
episodic_reasoning layout), an undecodable file and a missing one, in Video-LLaVA's
GPT_Zero_Shot_QA layout and MVBench's json/ + video/ layout. Expected scores are computed here from
the written answers files with this file's own exact match and MVBench check, not with vtc's scorer.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import ROOT
from tests.interop.llava_dirs import dirs  # noqa: F401  (fixture: the tiny Llava directories)
from vtc.data.video_qa import MVBENCH_SYSTEM
from vtc.errors import ConfigError

av = pytest.importorskip("av")
log = logging.getLogger(__name__)

FRAMES, PATCHES = 4, 16  # benchmark.frames in these tests; the tiny tower's 4x4 patches per frame
ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
MSVD = "GPT_Zero_Shot_QA/MSVD_Zero_Shot_QA"
# (question_id, video_name, question, answer): the tiny tokenizer's words; "broken" does not decode,
# "gone" does not exist.
MSVD_QA = [("q0", "red", "what is in the picture ?", "cat"),
           ("q1", "blue", "is the car red ?", "red"),
           ("q2", "broken", "what is the dog ?", "dog"),
           ("q3", "red", "two blue tree ?", "two"),
           ("q4", "gone", "one red car ?", "one")]


def _codec() -> str | None:
    """libx264, else mpeg4, else None (an FFmpeg build without either encoder)."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except ValueError:  # UnknownCodecError
            log.info("no %s encoder in this PyAV", name)
            continue
        return name
    return None


pytestmark = pytest.mark.skipif(_codec() is None, reason="this PyAV has neither libx264 nor mpeg4")


def write_video(path: Path, colours: list[tuple[int, int, int]], size=(48, 32)) -> Path:
    """An mp4 whose frame i is solid ``colours[i]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(_codec(), rate=10)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for c in colours:
            rgb = np.empty((size[1], size[0], 3), np.uint8)
            rgb[:] = c
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_msvd(root: Path) -> Path:
    d = root / MSVD
    _json(d / "test_q.json", [{"video_name": v, "question": t, "question_id": q} for q, v, t, _ in MSVD_QA])
    _json(d / "test_a.json", [{"answer": a, "type": 0, "question_id": q} for q, _, _, a in MSVD_QA])
    write_video(d / "videos/red.mp4", [(230, 20, 20)] * 12)
    write_video(d / "videos/blue.mp4", [(20, 20, 230), (20, 230, 20)] * 3)  # 6 frames, fewer frames is fine
    (d / "videos/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video at all" * 4)
    return root


def write_mvbench(root: Path) -> Path:
    """Two tasks: videos (action_antonym) and a frame folder (episodic_reasoning, with bounds)."""
    d = root / "MVBench"
    _json(d / "json/action_antonym.json", [
        {"video": "v1.mp4", "question": "what is in the picture ?", "candidates": ["cat", "dog", "car"], "answer": "dog"},
        {"video": "v2.mp4", "question": "is the car red ?", "candidates": ["red", "blue"], "answer": "red"}])
    _json(d / "json/episodic_reasoning.json", [
        {"video": "clip1", "question": "what is the dog ?", "candidates": ["one", "two"], "answer": "two",
         "start": 0.0, "end": 2.0}])
    write_video(d / "video/ssv2_video/v1.mp4", [(200, 200, 20)] * 9)
    write_video(d / "video/ssv2_video/v2.mp4", [(20, 200, 200)] * 9)
    for i in range(6):
        frame = d / f"video/tvqa/frames_fps3_hq/clip1/{i + 1:05d}.jpg"
        frame.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (40 * i, 255 - 40 * i, 90)).save(frame)
    return root


# -- independent scoring ------------------------------------------------------------------------
def normalise(text: str) -> str:
    """The VQA normalisation for this vocabulary: lower-case, punctuation off, articles off,
    number words as digits."""
    words = re.sub(r"[?.:,!]", " ", text.lower()).split()
    numbers = {"one": "1", "two": "2", "three": "3"}
    return " ".join(numbers.get(w, w) for w in words if w not in ("a", "an", "the"))


def mvbench_right(text: str, gt: str) -> bool:
    """MVBench's check on "(" + the first line: the first word, periods removed, inside "(x)",
    or "(x)" inside it."""
    pred = ("(" + text.strip().split("\n")[0]).lower().split(" ")[0]
    want = gt.lower().split(" ")[0]
    return pred.replace(".", "") in want or want in pred


# -- running eval --------------------------------------------------------------------------------
def eval_cfg(out: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    import vtc.config  # noqa: F401  (resolvers)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("eval", overrides=[f"paths.output_dir={out}", *overrides])


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow store for the module (creating one takes a second or two)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def run_eval(uri: str, out: Path, hf: str, *overrides: str):
    """evaluate() logging to MLflow at ``uri``; returns (client, the eval run)."""
    from mlflow.tracking import MlflowClient

    from vtc.eval.task import evaluate

    evaluate(eval_cfg(out, f"model.init_from={hf}", f"benchmark.frames={FRAMES}", "benchmark.num_workers=0",
                      "eval_batch_size=2", "max_new_tokens=3", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}",
                      f"logger.mlflow.run_name={out.name}", "cost.warmup=0", "cost.decode_probe=0", *overrides))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("eval").experiment_id],
                              filter_string=f"tags.mlflow.runName = '{out.name}'")
    assert len(runs) == 1
    return client, runs[0]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _logged(run, name: str) -> dict:
    return {k.split("/", 1)[1]: v for k, v in run.data.metrics.items() if k.startswith(f"{name}/")}


def test_msvd_qa_end_to_end(tmp_path, dirs, mlflow_uri):  # noqa: F811
    root = write_msvd(tmp_path / "eval")
    client, run = run_eval(mlflow_uri, tmp_path / "msvd", dirs["hf"], "benchmark=msvd_qa", f"benchmark.root={root}")
    assert run.info.status == "FINISHED"
    answers_dir = Path(client.download_artifacts(run.info.run_id, "answers", str(tmp_path / "dl")))
    llava, judge = _rows(answers_dir / "msvd_qa.jsonl"), _rows(answers_dir / "msvd_qa_videollava.jsonl")

    # The undecodable and the missing video are unanswered; the rest in question-file order.
    answered = [q for q in MSVD_QA if q[1] not in ("broken", "gone")]
    assert [a["question_id"] for a in llava] == [q for q, *_ in answered]
    for a, (q, _, text, _) in zip(llava, answered):
        assert list(a) == ANSWER_KEYS and a["prompt"] == text  # Video-LLaVA: the question alone
        assert a["model_id"] == "hf" and a["text"] == a["text"].strip()
    # Video-LLaVA's judge input: {"id", "question", "answer", "pred"}, all strings, pred = our answer.
    assert [list(r) for r in judge] == [["id", "question", "answer", "pred"]] * len(answered)
    assert [(r["id"], r["question"], r["answer"], r["pred"]) for r in judge] == [
        (q, t, ans, a["text"]) for (q, _, t, ans), a in zip(answered, llava)]

    m = _logged(run, "msvd_qa")
    ref = {q: ans for q, _, _, ans in MSVD_QA}
    right = [normalise(a["text"]) == normalise(ref[a["question_id"]]) for a in llava]
    assert m["acc"] == pytest.approx(sum(right) / len(right))
    assert m["n"] == 3 and m["n_missing"] == 2
    assert m["n_skipped"] == 2 and m["n_skipped_unreadable"] == 1 and m["n_skipped_missing"] == 1
    assert m["n_skipped_no_frames"] == 0
    # Every frame went through the tower: 4 frames x 16 patches per question.
    assert run.data.metrics["cost/visual_tokens"] == FRAMES * PATCHES
    p, t = run.data.params, run.data.tags
    assert p["benchmark.name"] == "msvd_qa" and p["benchmark.frames"] == str(FRAMES)
    assert t["vtc.benchmark.videos"] == str(root / MSVD / "videos")

    # Again with q0's reference set to the answer it got (greedy decoding repeats it): a hit that the
    # logged score must show.
    ref["q0"] = llava[0]["text"] or "the"  # an empty answer normalises like an article
    _json(root / MSVD / "test_a.json", [{"answer": ref[q], "question_id": q} for q, *_ in MSVD_QA])
    client, run = run_eval(mlflow_uri, tmp_path / "msvd_again", dirs["hf"], "benchmark=msvd_qa",
                           f"benchmark.root={root}")
    again = _rows(Path(client.download_artifacts(run.info.run_id, "answers/msvd_qa.jsonl", str(tmp_path / "dl2"))))
    right = [normalise(a["text"]) == normalise(ref[a["question_id"]]) for a in again]
    assert right[0] and _logged(run, "msvd_qa")["acc"] == pytest.approx(sum(right) / 3)


def test_mvbench_end_to_end(tmp_path, dirs, mlflow_uri):  # noqa: F811
    root = write_mvbench(tmp_path / "eval")
    client, run = run_eval(mlflow_uri, tmp_path / "mvbench", dirs["hf"], "benchmark=mvbench", f"benchmark.root={root}")
    answers = Path(client.download_artifacts(run.info.run_id, "answers/mvbench.jsonl", str(tmp_path / "dl")))
    rows = _rows(answers)
    gts = {"action_antonym/0": "(B) dog", "action_antonym/1": "(A) red", "episodic_reasoning/0": "(B) two"}
    assert [r["question_id"] for r in rows] == list(gts)  # task files in MVBENCH_TASKS order
    assert rows[0]["prompt"] == (f"{MVBENCH_SYSTEM}Question: what is in the picture ?\nOptions:\n(A) cat\n(B) dog\n"
                                 "(C) car\nOnly give the best option.")
    m = _logged(run, "mvbench")
    right = {q: mvbench_right(r["text"], gts[q]) for q, r in zip(gts, rows)}
    assert m["acc"] == pytest.approx(sum(right.values()) / 3)
    assert m["acc_action_antonym"] == pytest.approx((right["action_antonym/0"] + right["action_antonym/1"]) / 2)
    assert m["acc_episodic_reasoning"] == float(right["episodic_reasoning/0"])
    assert m["n"] == 3 and m["n_skipped"] == 0
    assert not [a.path for a in client.list_artifacts(run.info.run_id, "answers") if "videollava" in a.path]


def test_frames_prompt_and_prefill_of_a_sample(tmp_path, dirs):  # noqa: F811
    """A video's frames are the processor's tensors of Video-LLaVA's indices (frame folder: files 0,
    1, 3, 5 of 6 for 4 frames); the prompt holds one placeholder and ends with MVBench's pre-fill."""
    from omegaconf import OmegaConf

    from vtc.data.batch import ITEM_VIDEO
    from vtc.data.tokenizer import load_tokenizer
    from vtc.data.video_frames import sample_video, segment_indices
    from vtc.data.video_qa import read_mvbench
    from vtc.eval.bench import benchmark_spec
    from vtc.eval.init_from import prompt_settings
    from vtc.eval.video_bench import VideoQuestionDataset, collate_video

    root = write_mvbench(tmp_path / "eval")
    spec = benchmark_spec(eval_cfg(tmp_path, "benchmark=mvbench", f"benchmark.root={root}", f"benchmark.frames={FRAMES}"))
    tok = load_tokenizer(dirs["hf"])
    data = {"template": "vicuna_v1", "image_size": 56, "image_mean": [0.5] * 3, "image_std": [0.25] * 3,
            "batch_size": 2, "max_length": 512}
    settings = prompt_settings(OmegaConf.create({"data": data}))
    ds = VideoQuestionDataset(read_mvbench(spec["questions"]), spec, tok, settings)
    video, folder = ds[0], ds[2]
    (kind, pixels), = video["visual"]
    assert kind == ITEM_VIDEO and pixels.shape == (FRAMES, 3, 56, 56)
    frames = sample_video(root / "MVBench/video/ssv2_video/v1.mp4", FRAMES, pick=lambda count, fps: segment_indices(
        FRAMES, fps, count - 1)).frames
    assert torch.equal(pixels, torch.stack([settings.processor(f) for f in frames]))
    files = sorted((root / "MVBench/video/tvqa/frames_fps3_hq/clip1").iterdir())
    # MVBench's segments inside the question's [0, 2] s bound at 3 fps, frames numbered from 1:
    # numbers 1, 2, 3, 5 (worked in tests/data/test_convert_video.py), files 0, 1, 2, 4
    want = [settings.processor(Image.open(files[i]).convert("RGB")) for i in (0, 1, 2, 4)]
    assert spec["sampling"] == "segments" and torch.equal(folder["visual"][0][1], torch.stack(want))
    uniform = VideoQuestionDataset(read_mvbench(spec["questions"]), {**spec, "sampling": "uniform"}, tok, settings)
    want = [settings.processor(Image.open(files[i]).convert("RGB")) for i in (0, 1, 3, 5)]  # Video-LLaVA's linspace
    assert torch.equal(uniform[2]["visual"][0][1], torch.stack(want))
    image_id = tok.convert_tokens_to_ids("<image>")
    prefill = tok("Best option:(", add_special_tokens=False)["input_ids"]
    assert video["gen_input_ids"].count(image_id) == 1 and video["gen_input_ids"][-len(prefill):] == prefill
    batch = collate_video([video, {"index": 1, "skip": "unreadable", "detail": "x"}, folder], tok.pad_token_id, 56)
    assert batch["skipped"] == [(1, "unreadable", "x")] and batch["batch"]["index"] == [0, 2]
    assert batch["batch"]["visual_items"].tolist() == [[0, 0, FRAMES, ITEM_VIDEO], [1, FRAMES, FRAMES, ITEM_VIDEO]]


def test_video_benchmarks_compose_and_missing_files_are_refused_naming_the_key(tmp_path, dirs):  # noqa: F811
    from vtc.data.video_qa import VIDEO_QA_LAYOUT
    from vtc.eval.bench import benchmark_spec
    from vtc.eval.task import evaluate

    root = tmp_path / "eval"
    for name, (folder, videos, _) in VIDEO_QA_LAYOUT.items():
        base = root / "GPT_Zero_Shot_QA" / folder
        _json(base / "test_q.json", [])
        _json(base / "test_a.json", [])
        (base / videos).mkdir(parents=True)
        spec = benchmark_spec(eval_cfg(tmp_path, f"benchmark={name}", f"benchmark.root={root}"))
        assert spec["questions"] == str(base / "test_q.json") and spec["gt"] == str(base / "test_a.json")
        assert spec["videos"] == str(base / videos) and spec["frames"] == 8 and spec["prompt_suffix"] is None
    write_mvbench(root)
    spec = benchmark_spec(eval_cfg(tmp_path, "benchmark=mvbench", f"benchmark.root={root}"))
    assert spec["gt"] == spec["questions"] == str(root / "MVBench/json") and spec["question_prefix"] == MVBENCH_SYSTEM
    assert spec["answer_prefix"] == "Best option:(" and spec["options"]["return_prompt"] == "("

    with pytest.raises(ConfigError, match="^benchmark.videos: '/nonexistent'"):
        benchmark_spec(eval_cfg(tmp_path, "benchmark=msvd_qa", f"benchmark.root={root}", "benchmark.videos=/nonexistent"))
    with pytest.raises(ConfigError, match="^benchmark.questions"):
        benchmark_spec(eval_cfg(tmp_path, "benchmark=msrvtt_qa", f"benchmark.root={tmp_path / 'none'}"))
    with pytest.raises(ConfigError, match="^benchmark.frames"):
        benchmark_spec(eval_cfg(tmp_path, "benchmark=mvbench", f"benchmark.root={root}", "benchmark.frames=0"))
    with pytest.raises(ConfigError, match="^benchmark.sampling: 'middle' is not a frame sampling rule"):
        benchmark_spec(eval_cfg(tmp_path, "benchmark=mvbench", f"benchmark.root={root}", "benchmark.sampling=middle"))
    with pytest.raises(ConfigError, match="^benchmark.options.return_prompt"):
        benchmark_spec(eval_cfg(tmp_path, "benchmark=mvbench", f"benchmark.root={root}", "benchmark.answer_prefix=null"))
    # eval.py refuses before building anything (no model is read from the bogus directory).
    (root / "MVBench/video").rename(root / "MVBench/moved")
    with pytest.raises(ConfigError, match="^benchmark.videos"):
        evaluate(eval_cfg(tmp_path, f"model.init_from={dirs['hf']}", "benchmark=mvbench", f"benchmark.root={root}",
                          "logger=csv"))


def test_frames_that_fill_the_llm_positions_are_refused_before_reading_videos():
    from vtc.errors import ConfigError
    from vtc.eval.video_bench import check_context

    from tests.tiny import tiny_lmm

    model = tiny_lmm()  # 16 visual tokens a frame, 512 positions
    check_context(model, 8)  # 128 tokens: fine
    with pytest.raises(ConfigError) as e:
        check_context(model, 32)  # 512 tokens: nothing left for the text
    assert e.value.key == "benchmark.frames" and "512" in e.value.message
