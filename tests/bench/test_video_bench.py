"""``python -m vtc.bench.video`` at tiny sizes: token counts, FLOPs order, report and files
(timings are machine noise here and are never asserted)."""
from __future__ import annotations

import json
import re

import pytest

from vtc.bench import video as V


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("video") / "video_quick"
    res = V.main(["--quick", "--skip-loader", "--out", str(out)])
    return res, out


def test_visual_tokens_per_arm(quick):
    res, _ = quick
    s, T = V.QUICK, V.FRAMES
    N, P = s.llm_layers, s.num_patches
    by = {r["arm"]: r for r in res["rows"]}
    assert list(by) == ["none", "llavolta stage 1", "temporal stride 2", "temporal stride 4"]
    for r in by.values():
        assert r["frames"] == [T] * s.batch  # the tower runs on every frame in every arm
    assert by["none"]["visual_in"] == T * P and by["none"]["seen"] == [T * P] * N
    assert by["temporal stride 2"]["visual_in"] == T * P // 2 and by["temporal stride 2"]["seen"] == [T * P // 2] * N
    assert by["temporal stride 4"]["visual_in"] == T * P // 4
    # LLaVolta stage 1 (K=2, S=8 for 32 layers): K = round(2·N/32), the whole video span pooled by 8 from layer K
    K, S = by["llavolta stage 1"]["knobs"]["layer"], by["llavolta stage 1"]["knobs"]["stride"]
    assert (K, S) == (round(2 * N / 32), 8)
    assert by["llavolta stage 1"]["visual_in"] == T * P
    assert by["llavolta stage 1"]["seen"] == [T * P] * K + [T * P // S] * (N - K)


def test_flops_order_and_frames(quick):
    res, _ = quick
    by = {r["arm"]: r for r in res["rows"]}
    F = {a: r["flops"] for a, r in by.items()}
    assert F["none"] > F["temporal stride 2"] > F["temporal stride 4"]
    assert F["none"] > F["llavolta stage 1"]
    assert by["none"]["flops_ratio"] == 1.0 and by["temporal stride 2"]["flops_ratio"] > 1
    # every arm pays the tower on all T frames of every sample (LLaVolta stage 1 and none differ in the LLM only)
    assert res["encoder_flops"] > 0 and all(r["frames"] == [V.FRAMES] * V.QUICK.batch for r in by.values())
    for r in by.values():
        assert r["step_ms"] > 0 and r["efficiency"] > 0


def test_report_and_files(quick):
    res, out = quick
    md = out.with_suffix(".md").read_text()
    assert "## Verdicts" in md
    for arm in ("llavolta stage 1", "temporal stride 2", "temporal stride 4"):
        assert re.search(rf"- {arm}: speed-up [\d.]+x vs FLOPs ratio [\d.]+x: .*\*\*(PASS|FAIL)\*\*", md), arm
    js = json.loads(out.with_suffix(".json").read_text())
    assert js["benchmark"] == "video" and len(js["rows"]) == 4 and set(js["verdict"]["passed"]) == {
        "llavolta stage 1", "temporal stride 2", "temporal stride 4"}
    w = {"batch_size": 16, "frames_per_batch": 128.0, "num_workers": 1, "steps": 3, "share": 0.01, "step_s": 2.0,
         "loader_frames_per_s": 1280.0, "loader_batches_per_s": 10.0, "step_frames_per_s": 64.0, "headroom": 20.0,
         "passed": True}
    md = V.to_markdown(dict(res, loader=w))
    assert "1.0% of 2000 ms/step (target < 5%): **PASS**" in md
    assert "1280 frames/s (10.00 batches/s) vs 64 frames/s" in md


def test_loader_part_on_a_fresh_video_set():
    """Part 2 on a small video set built in a temporary folder (the cached one is timed by the bench)."""
    w = V.loader_part(steps=2, batches=3, fresh=True, log=lambda m: None)
    assert w["frames_per_batch"] == 16 * 8 and w["steps"] == 2
    assert 0 <= w["share"] < 1 and w["loader_frames_per_s"] > 0
    assert w["step_frames_per_s"] == pytest.approx(128 / w["step_s"])


def test_step_flops_counts_the_tower_once_per_frame():
    """common.step_flops of a video step = the same step counted with one frame per sample + the
    tower's forward on the extra frames (an independent count: frozen tower, forward only)."""
    from dataclasses import replace

    import torch

    from vtc.bench import common as C
    from vtc.cost.accounting import model_shape
    from vtc.cost.flops import forward_flops

    from tests.tiny import tiny_lmm, toy_video_batch

    model = tiny_lmm()
    with torch.no_grad(), C.recording_forwards(model) as outs:
        model(toy_video_batch(frames=4))
    o = outs[0]
    assert o.frames.tolist() == [4, 1, 0]  # a video, an image, a text-only sample
    shape = model_shape(model)
    tower = forward_flops(shape, 0, [0] * shape.llm_layers, projector_tokens=0, lm_head_tokens=0)["vision"]
    one_frame = C.step_flops(model, [replace(o, frames=(o.frames > 0).long())])
    assert C.step_flops(model, outs) - one_frame == pytest.approx(3 * tower, rel=1e-9)
