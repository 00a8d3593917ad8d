"""Image downsampling (vtc/compressors/downsample.py) against an independent computation: the
encoder run by hand on a PIL-free bilinear+antialias resize with HF's interpolated position
embeddings; token counts, the smaller tower in the FLOPs, composition with a pre-LLM method,
batch equal to each sample alone, refusals."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vtc.compressors.chain import Chain, Pipeline
from vtc.compressors.downsample import Downsample
from vtc.compressors.pool import AvgPool2d
from vtc.compressors.tome import ToMe
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

from tests.tiny import single, tiny_lmm, toy_batch, toy_video_batch

INFO = EncoderInfo(image_size=112, patch_size=14, hidden_size=32, num_layers=3, has_cls=True, select_layer=-2)


def reference_features(model, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """The tower on the resized image, written out: HF's own vision model with
    ``interpolate_pos_encoding=True`` and ``output_hidden_states``, layer -2, CLS dropped."""
    small = F.interpolate(pixels, size=(grid * 14, grid * 14), mode="bilinear", antialias=True, align_corners=False)
    out = model.encoder.model(small, interpolate_pos_encoding=True, output_hidden_states=True)
    return out.hidden_states[-2][:, 1:]


@pytest.mark.parametrize("grid", [2, 4, 6])
def test_features_are_the_tower_on_the_resized_image(grid):
    model = tiny_lmm(Downsample(grid), image_size=112)
    pv = toy_batch(image_size=112)["pixel_values"]
    got = model.encode_images(pv)
    assert got.shape == (2, grid * grid, 32)
    assert torch.allclose(got, model.projector(reference_features(model, pv, grid)), atol=1e-5)
    full = tiny_lmm(None, image_size=112)
    assert full.encode_images(pv).shape[1] == 64


def test_counts_flops_and_batch_equals_singles():
    model = tiny_lmm(Downsample(4), image_size=112)
    b = toy_batch(image_size=112)
    out = model(b)
    assert out.seen[:, 0].tolist() == [16, 16, 16] and model.pipeline.tokens_in_llm(64) == 16
    # Two blocks run to layer -2, each on CLS + 16 patches.
    assert model.pipeline.encoder_tokens(64) == [(17, 17), (17, 17)]
    full, _ = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    for i in range(3):
        s = single(b, i)
        assert model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0][0] == full[i]
    assert model(toy_video_batch(image_size=112, frames=2)).visual_in.tolist() == [32, 16, 0]


def test_composes_with_a_pre_llm_method_on_the_smaller_grid():
    model = tiny_lmm(Chain(image=Downsample(4), pre_llm=AvgPool2d(2)), image_size=112)
    assert model.encode_images(toy_batch(image_size=112)["pixel_values"]).shape[1] == 4  # 8x8 -> 4x4 -> 2x2
    with pytest.raises(ConfigError) as e:  # 3 does not divide the 4x4 grid the pool sees
        Pipeline.of(Chain(image=Downsample(4), pre_llm=AvgPool2d(3))).check(INFO, 3)
    assert e.value.key == "compressor.pre_llm.stride" and "4x4" in e.value.message
    with pytest.raises(ConfigError) as e:
        Pipeline.of(Chain(image=Downsample(4), vision=ToMe(r=2))).check(INFO, 3)
    assert e.value.key == "compressor.vision"


def test_refusals_budgets_and_training():
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ConfigError) as e:
            Downsample(bad).check(INFO, 3)
        assert e.value.key == "compressor.grid" and "1..8" in e.value.message
    assert Downsample().budget_knobs(16, 64, INFO) == {"grid": 4}
    assert Downsample().budget_knobs(5, 64, INFO) == {"grid": 2}
    model = tiny_lmm(Downsample(2), image_size=112).train()
    model(toy_batch(image_size=112)).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
