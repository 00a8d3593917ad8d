"""LLaVA-STF's Spatial Token Fusion (vtc.compressors.stf): the window-to-channel layout against an
explicit loop and the released code's unfold, shapes, the MLP as the projector, gradients,
real-size parameter count on the meta device, config checks, generation."""
import pytest
import torch

from vtc.compressors.stf import SpatialTokenFusion, fuse_windows
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


@pytest.mark.parametrize("H,W,k", [(4, 4, 2), (6, 6, 3), (4, 6, 2)])
def test_window_channel_layout_matches_explicit_loop(H, W, k):
    torch.manual_seed(0)
    B, C = 2, 3
    x = torch.randn(B, H * W, C)
    z = fuse_windows(x, (H, W), k)
    assert z.shape == (B, (H // k) * (W // k), C * k * k)
    for b in range(B):
        for i in range(H // k):
            for j in range(W // k):
                tok = z[b, i * (W // k) + j]
                for c in range(C):
                    for a in range(k):
                        for bb in range(k):
                            # channel c, then the window offsets in row-major order (0,0),(0,1),...
                            assert tok[c * k * k + a * k + bb] == x[b, (k * i + a) * W + (k * j + bb), c]


def test_layout_is_the_released_codes_unfold():
    """LLaVA-STF's split_image_features: view(b,h,w,c).unfold(1,ws,ws).unfold(2,ws,ws).view(b,-1,4c)."""
    torch.manual_seed(1)
    x = torch.randn(2, 36, 5)
    ref = x.view(2, 6, 6, 5).unfold(1, 2, 2).unfold(2, 2, 2).contiguous().view(2, 3, 3, 20).view(2, -1, 20)
    assert torch.equal(fuse_windows(x, (6, 6), 2), ref)


def test_forward_is_fusion_then_mlp_and_shapes():
    model = tiny_lmm(SpatialTokenFusion(window=2))
    comp = model.compressor
    assert isinstance(model.projector, torch.nn.Identity)  # the STF MLP is the projector
    assert [m.weight.shape for m in comp.mlp if isinstance(m, torch.nn.Linear)] == [(512, 128), (32, 512)]
    pv = toy_batch()["pixel_values"]
    vis = model.encode_images(pv)
    assert vis.shape == (2, 4, 32)  # 4x4 grid -> 2x2 fused tokens at the LLM width
    enc = model.encoder(pv)
    assert torch.allclose(vis, comp.mlp(fuse_windows(enc.features, (4, 4), 2)))
    assert comp.tokens_out(576) == 144 and comp.tokens_per_layer(576, 32) == [144] * 32
    assert model(toy_batch()).visual_in.tolist() == [4, 4, 0]


def test_gradients_reach_every_parameter():
    model = tiny_lmm(SpatialTokenFusion()).train()
    model(toy_batch()).loss.backward()
    for p in model.compressor.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0
    grads = [p.grad for p in model.llm.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_real_size_parameter_count_on_meta():
    comp = SpatialTokenFusion()
    comp.check(CLIP_L, 32)
    with torch.device("meta"):
        comp.setup(CLIP_L, 4096)
    assert next(comp.parameters()).device.type == "meta"
    n = sum(p.numel() for p in comp.parameters())
    assert n == 4096 * 16384 + 16384 + 16384 * 4096 + 4096  # 4096 -> 16384 -> 4096 (the paper)
    with torch.device("meta"):
        wide = SpatialTokenFusion(hidden=8192)
        wide.setup(CLIP_L, 4096)
    assert sum(p.numel() for p in wide.parameters()) == 4096 * 8192 + 8192 + 8192 * 4096 + 4096


def test_check_rejects_window_not_dividing_grid_and_cannot_be_switched_off():
    with pytest.raises(ConfigError) as e:
        SpatialTokenFusion(window=5).check(CLIP_L, 32)
    assert e.value.key == "compressor.window" and "24x24" in str(e.value)
    with pytest.raises(ConfigError) as e:
        tiny_lmm(SpatialTokenFusion(window=3))  # 4x4 grid
    assert e.value.key == "compressor.window"
    with pytest.raises(ConfigError):
        SpatialTokenFusion().set_enabled(False)
    assert SpatialTokenFusion.knobs == ()


def test_same_seed_same_output_generation_and_batch_independence():
    b = toy_batch()
    m1, m2 = tiny_lmm(SpatialTokenFusion(), seed=7), tiny_lmm(SpatialTokenFusion(), seed=7)
    assert torch.equal(m1(b).loss, m2(b).loss)
    full, seen = m1.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    assert seen[:, 0].tolist() == [4, 4, 4]
    for i in range(3):
        s = single(b, i)
        alone = m1.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0]
        assert alone[0] == full[i]
