"""Issue 24's commands end to end on a tiny video set: ``train.py data=synthetic_video
schedule=llavolta`` lands in MLflow with accuracy per question type, and ``eval.py -m ckpt_path=...
compressor=pool,temporal`` sweeps test-time compression on the video test split."""
import glob
import os

import pytest

pytestmark = pytest.mark.slow

FRAMES, PATCHES = 4, 64  # 4-frame clips; the tiny tower's 8x8 patches a frame
VIDEO = ["data=synthetic_video", f"data.generate.frames={FRAMES}", "data.generate.encoder_frames=192",
         "data.batch_size=4", "data.eval_batch_size=8"]
TYPES = ("frame_cell", "count_times", "last", "direction")


@pytest.fixture(scope="module")
def video_run(workspace):
    proc = workspace.run("train.py", *VIDEO, "schedule=llavolta", "task_name=video_e2e")
    runs = workspace.runs("video_e2e")  # its own MLflow experiment: the shared store holds other tests' runs
    assert len(runs) == 1, proc.stdout[-2000:]
    ckpts = glob.glob(os.path.join(runs[0].data.params["paths.output_dir"], "checkpoints", "last.ckpt"))
    assert ckpts
    return runs[0], ckpts[0]


def test_llavolta_on_video_trains_to_the_end_with_accuracy_per_question_type(workspace, video_run):
    run, _ = video_run
    m = run.data.metrics
    for split in ("val", "test"):
        assert 0.0 <= m[f"{split}/acc"] <= 1.0
        for t in TYPES:
            assert 0.0 <= m[f"{split}/acc_{t}"] <= 1.0, (split, t)
    # 4 steps, LLaVolta's four stages one step each; the last stage and test time are uncompressed
    stages = [h.value for h in workspace.client().get_metric_history(run.info.run_id, "curriculum/stage")]
    assert sorted(set(stages)) == [0, 1, 2, 3], stages  # stage index, 0-based
    assert m["test/visual_tokens"] == FRAMES * PATCHES and m["test/equiv_visual_tokens"] == FRAMES * PATCHES


def test_eval_sweeps_test_time_compression_on_video(workspace, video_run):
    _, ckpt = video_run
    before = {r.info.run_id for r in workspace.runs("eval")}
    workspace.run("eval.py", "-m", f"ckpt_path={ckpt}", "compressor=pool,temporal", "eval_batch_size=8",
                  tiny=False)
    new = [r for r in workspace.runs("eval") if r.info.run_id not in before]
    children = {r.data.tags["mlflow.runName"]: r for r in new if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {"compressor=pool", "compressor=temporal"}
    # pool 2x2 per frame: 4 frames x 16; temporal stride 2: 2 frames x 64
    assert children["compressor=pool"].data.metrics["test/visual_tokens"] == FRAMES * PATCHES // 4
    assert children["compressor=temporal"].data.metrics["test/visual_tokens"] == FRAMES // 2 * PATCHES
    for r in children.values():
        assert all(f"test/acc_{t}" in r.data.metrics for t in TYPES)
