"""M3 / Matryoshka (vtc.compressors.m3): every scale against explicit window means, the nested
scales per grid, the training loss = the mean of the per-scale losses computed one by one,
knobs restored, checks, batch independence, determinism, training, generation."""
import math

import pytest
import torch

from vtc.compressors.m3 import Matryoshka, default_sides, pool_to
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def window_means(x, g, side):
    """Explicit pooling: output cell (i, j) averages rows floor(i·g/s)..ceil((i+1)·g/s) - 1 (and
    the same for columns): non-overlapping s x s windows when side divides g."""
    out = []
    for i in range(side):
        for j in range(side):
            r0, r1 = (i * g) // side, -((-(i + 1) * g) // side)
            c0, c1 = (j * g) // side, -((-(j + 1) * g) // side)
            cells = [x[:, r * g + c] for r in range(r0, r1) for c in range(c0, c1)]
            out.append(torch.stack(cells).mean(0))
    return torch.stack(out, 1)


@pytest.mark.parametrize("g,side", [(4, 4), (4, 2), (4, 1), (24, 12), (24, 6), (24, 3), (24, 1), (27, 13), (6, 4)])
def test_each_scale_is_independent_pooling(g, side):
    x = torch.randn(2, g * g, 5, generator=torch.Generator().manual_seed(g * side))
    got = pool_to(x, (g, g), side)
    assert got.shape == (2, side * side, 5)
    assert torch.allclose(got, window_means(x, g, side), atol=1e-5)


def test_scales_nest_and_defaults():
    assert default_sides(24) == [24, 12, 6, 3, 1] and default_sides(8) == [8, 4, 2, 1]
    assert default_sides(4) == [4, 2, 1] and default_sides(27) == [27, 13, 6, 3, 1]
    comp = Matryoshka(tokens=144)
    comp.check(CLIP_L, 32)
    comp.setup(CLIP_L, 4096)
    assert comp.trained_scales == [576, 144, 36, 9, 1]  # the paper's
    assert comp.training_variants() == [{"tokens": t} for t in (576, 144, 36, 9, 1)]
    assert comp.tokens_out(576) == 144 and Matryoshka().tokens_out(576) == 576
    x = torch.randn(1, 576, 3)
    assert torch.allclose(pool_to(pool_to(x, (24, 24), 12), (12, 12), 6), pool_to(x, (24, 24), 6), atol=1e-6)
    comp.set_enabled(False)
    assert comp.training_variants() == []
    with pytest.raises(ConfigError) as e:
        Matryoshka(tokens=100).check(CLIP_L, 32)
    assert e.value.key == "compressor.tokens" and "576" in str(e.value)
    with pytest.raises(ConfigError) as e:
        Matryoshka(scales=[576, 50]).check(CLIP_L, 32)
    assert e.value.key == "compressor.scales"
    explicit = Matryoshka(tokens=64, scales=[576, 64, 4])
    explicit.check(CLIP_L, 32)
    explicit.setup(CLIP_L, 4096)
    assert explicit.trained_scales == [576, 64, 4]


def test_training_loss_is_mean_of_per_scale_losses():
    comp = Matryoshka(tokens=4)
    model = tiny_lmm(comp).train()
    b = toy_batch()
    out = model(b)
    assert comp.tokens == 4  # knob restored after the variants
    per_scale = []
    model.eval()  # eval: no variants, the knob alone picks the scale
    for t in (16, 4, 1):
        comp.set_knobs(tokens=t)
        o = model(b)
        assert o.visual_in.tolist() == [t, t, 0]
        per_scale.append(o.loss)
    assert out.loss.item() == pytest.approx(torch.stack(per_scale).mean().item(), rel=1e-6)
    comp.set_knobs(tokens=4)
    model.train()
    model.zero_grad()
    model(b).loss.backward()
    g_joint = [p.grad.clone() for p in model.projector.parameters()]
    model.zero_grad()
    model.eval()
    total = 0
    for t in (16, 4, 1):
        comp.set_knobs(tokens=t)
        total = total + model(b).loss / 3
    total.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(g_joint, model.projector.parameters()))


@pytest.mark.parametrize("pool_at", ["projected", "features"])
def test_outputs_pool_the_projected_tokens_or_the_features(pool_at):
    """Their code pools the projector's output (projected, the default); ``features`` pools before it."""
    comp = Matryoshka(pool_at=pool_at)
    model = tiny_lmm(comp)
    pv = toy_batch()["pixel_values"]
    feats = model.encoder(pv).features
    for t in (16, 4, 1):
        comp.set_knobs(tokens=t)
        s = math.isqrt(t)
        after = window_means(model.projector(feats), 4, s)
        before = model.projector(window_means(feats, 4, s))
        got = model.encode_images(pv)
        assert torch.allclose(got, after if pool_at == "projected" else before, atol=1e-5)
        if t < 16:  # the projector's GELU makes the two orders differ
            assert not torch.allclose(after, before, atol=1e-4)
    assert model.projector[0].in_features == 32  # the projector reads CLIP's width either way


def test_own_flops_count_the_projector_on_the_pooled_away_patches():
    comp = Matryoshka(tokens=144)
    comp.check(CLIP_L, 32)
    comp.projector_dims = [1024, 4096, 4096]  # LLaVA-1.5's mlp2x_gelu, as the LMM sets it
    assert comp.own_flops(576) == 2 * (576 - 144) * (1024 * 4096 + 4096 * 4096)
    assert Matryoshka(tokens=144, pool_at="features").own_flops(576) == 0
    model = tiny_lmm(Matryoshka(tokens=4))
    assert model.compressor.projector_dims == [32, 32, 32]
    with pytest.raises(ConfigError) as e:
        Matryoshka(pool_at="llm").check(CLIP_L, 32)
    assert e.value.key == "compressor.pool_at"


def test_same_seed_batch_independence_training_generation():
    b = toy_batch()
    m1, m2 = tiny_lmm(Matryoshka(tokens=4), seed=2), tiny_lmm(Matryoshka(tokens=4), seed=2)
    vis = m1.encode_images(b["pixel_values"])
    assert torch.equal(vis, m2.encode_images(b["pixel_values"]))
    full, seen = m1.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    assert seen[:, 0].tolist() == [4, 4, 4]
    for i in range(3):
        s = single(b, i)
        if len(s["pixel_values"]):
            assert torch.allclose(m1.encode_images(s["pixel_values"])[0], vis[int(b["image_index"][i])], atol=1e-6)
        assert m1.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0][0] == full[i]
    m1.train()
    m1(b).loss.backward()
    for name in ("projector", "llm"):
        for p in getattr(m1, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
