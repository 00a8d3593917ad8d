"""Temporal pooling (vtc/compressors/temporal.py) against an independent computation, in a chain
with a spatial compressor, in a mixed batch, and refused where it cannot work."""
from __future__ import annotations

import pytest
import torch

from vtc.compressors import AvgPool2d
from vtc.compressors.chain import Chain, Pipeline
from vtc.compressors.prumerge_plus import PruMergePlus
from vtc.compressors.temporal import TemporalPool, pool_frames
from vtc.data.batch import IGNORE_INDEX, ITEM_IMAGE, ITEM_VIDEO
from vtc.data.collate import collate
from vtc.errors import ConfigError

from tests.tiny import IMG, tiny_lmm


def reference(frames: torch.Tensor, s: int) -> torch.Tensor:
    """Window means written out frame by frame (the formula of the module docstring)."""
    T = frames.shape[0]
    out = []
    for j in range(-(-T // s)):
        window = [frames[t] for t in range(s * j, min(s * j + s, T))]
        out.append(sum(window) / len(window))
    return torch.stack(out)


@pytest.mark.parametrize("T, s", [(8, 2), (8, 3), (5, 4), (3, 8), (1, 2), (6, 1)])
def test_pool_frames_matches_window_means(T, s):
    frames = torch.randn(T, 4, 3, generator=torch.Generator().manual_seed(T * 10 + s))
    got = pool_frames(frames, s)
    assert got.shape == (-(-T // s), 4, 3)
    assert torch.allclose(got, reference(frames, s), atol=1e-6)
    assert TemporalPool(s).frames_out(T) == got.shape[0]


@pytest.mark.parametrize("T, s", [(8, 2), (8, 3), (5, 4), (3, 8)])
def test_reduce_first_keeps_each_window_s_first_frame(T, s):
    frames = torch.randn(T, 4, 3, generator=torch.Generator().manual_seed(T + s))
    t = TemporalPool(s, reduce="first")
    got = t(frames)
    assert torch.equal(got, torch.stack([frames[s * j] for j in range(-(-T // s))]))
    assert t.frames_out(T) == got.shape[0] and "reduce=first" in t.describe()


def video_sample(name, seed, frames=5):
    g = torch.Generator().manual_seed(seed)
    ids = [1, 5, IMG, 6, 7, 8]
    return {"id": name, "input_ids": ids, "labels": [IGNORE_INDEX] * 4 + ids[4:],
            "visual": [(ITEM_VIDEO, torch.randn(frames, 3, 56, 56, generator=g))]}


def image_sample(name, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [1, IMG, 5, 6, 7]
    return {"id": name, "input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:],
            "visual": [(ITEM_IMAGE, torch.randn(1, 3, 56, 56, generator=g))]}


def test_chain_pools_each_frame_then_time_and_leaves_images_alone():
    chain = tiny_lmm(Chain(pre_llm=AvgPool2d(2), temporal=TemporalPool(2)))
    spatial = tiny_lmm(AvgPool2d(2))  # same seed: the same weights
    video, image = video_sample("v", 1), image_sample("i", 2)
    with torch.no_grad():
        b = collate([video, image], pad_id=0)
        got = chain.item_tokens(b["pixel_values"], b["visual_items"])
        per_frame = spatial.encode_images(video["visual"][0][1])  # [5, 4, d]
        assert torch.allclose(got[0], reference(per_frame, 2).reshape(-1, per_frame.shape[-1]), atol=1e-6)
        assert got[0].shape[0] == 3 * 4  # ceil(5/2) frames x 4 tokens
        assert torch.allclose(got[1], spatial.encode_images(image["visual"][0][1])[0], atol=1e-6)
        # batch of two equals each alone
        out = chain(b)
        alone = [chain(collate([s], pad_id=0)) for s in (video, image)]
        n = torch.tensor([o.num_targets for o in alone], dtype=torch.float)
        assert torch.allclose(out.loss, sum(o.loss * k for o, k in zip(alone, n)) / n.sum(), atol=1e-5)
        assert out.visual_in.tolist() == [12, 4]


def test_a_stride_knob_and_off_switch():
    t = TemporalPool(2)
    t.set_knobs(stride=4)
    assert t.frames_out(8) == 2
    t.set_enabled(False)
    frames = torch.randn(8, 2, 3)
    assert torch.equal(t(frames), frames) and t.frames_out(8) == 8


def test_refusals_name_the_key():
    with pytest.raises(ConfigError) as e:
        TemporalPool(0).check(None, 4)
    assert e.value.key == "compressor.stride"
    with pytest.raises(ConfigError) as e:
        TemporalPool(2, reduce="max").check(None, 4)
    assert e.value.key == "compressor.reduce" and "'max'" in e.value.message
    with pytest.raises(ConfigError) as e:
        Pipeline.of(Chain(pre_llm=PruMergePlus(), temporal=TemporalPool(2))).check(tiny_lmm().encoder.info, 3)
    assert e.value.key == "compressor.temporal" and "different number of tokens" in e.value.message
