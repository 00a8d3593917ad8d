"""VisPruner (vtc/compressors/vispruner.py): its CLS attention against HF's own eager attention map
(attentions[-2], head mean), the selection against the released rule written out in plain Python,
end to end on the tiny encoder, batch equal to each sample alone, video frames, training, the FLOPs
count, and refusals (SigLIP, bad knobs)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from vtc.compressors.vispruner import VisPruner, removal_rounds, split_counts, vispruner_indices
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

from tests.tiny import check_pre_llm_batch_equals_singles, tiny_lmm, toy_batch, toy_video_batch

TINY = EncoderInfo(image_size=56, patch_size=14, hidden_size=8, num_layers=2, has_cls=True, select_layer=-2)
CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)
SIGLIP = EncoderInfo(384, 14, 1152, 27, False, -2)


def cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def reference(attn: list[float], tokens: list[list[float]], keep: int, ratio: float, per_round: int = 8) -> list[int]:
    """The released rule for one image, lists only. Important: the int(keep * ratio) positions of
    largest attention. Diverse: the others, by decreasing attention, lose per round the (at most
    per_round, at most down to the diverse count) even-position tokens whose best cosine match among
    the odd-position tokens is highest; survivors of the even side (by decreasing match) go first.
    Ties keep the earlier token (Python's sort is stable)."""
    n_imp = int(keep * ratio)
    n_div = keep - n_imp
    by_attn = sorted(range(len(attn)), key=lambda j: -attn[j])
    important, residual = by_attn[:n_imp], by_attn[n_imp:]
    if n_div == 0:
        return sorted(important)
    while True:
        r = min(per_round, len(residual) - n_div)
        if r <= 0:
            break
        evens, odds = residual[0::2], residual[1::2]
        match = {i: max(cos(tokens[i], tokens[o]) for o in odds) for i in evens}
        evens = sorted(evens, key=lambda i: -match[i])[r:]
        residual = evens + odds
    return sorted(important + residual)


@pytest.mark.parametrize("n, keep, ratio, per_round", [
    (64, 16, 0.5, 8),    # the tiny-grid budget: rounds of 8
    (64, 24, 0.75, 8),   # README's 64-token split scaled: 18 + 6
    (30, 10, 0.3, 4),    # odd residual count (27) and a small batch per round
    (17, 9, 0.0, 8),     # diverse only; odd N
    (20, 7, 1.0, 8),     # important only
    (20, 7, 0.4, 8),     # 2.8 important: floored to 2, as released
    (16, 8, 0.5, 8),     # a round that removes the whole even side
    (12, 12, 0.5, 8),    # keeps everything
])
def test_selection_matches_the_rule_written_out(n, keep, ratio, per_round):
    g = torch.Generator().manual_seed(n + keep)
    attn = torch.rand(3, n, generator=g, dtype=torch.float64)
    x = torch.randn(3, n, 5, generator=g, dtype=torch.float64)
    got = vispruner_indices(attn, x, keep, ratio, per_round)
    assert got.shape == (3, keep)
    for b in range(3):
        assert got[b].tolist() == reference(attn[b].tolist(), x[b].tolist(), keep, ratio, per_round)
    assert split_counts(keep, ratio) == (int(keep * ratio), keep - int(keep * ratio))


def test_duplicates_are_removed_first():
    """Two clusters of identical tokens plus distinct ones: all attention equal, keep 1 important +
    the diverse rest; duplicates go, one token per direction stays."""
    e = torch.eye(6, dtype=torch.float64)
    x = torch.stack([e[0], e[0], e[0], e[1], e[1], e[2], e[3], e[4]])[None]  # 5 directions, 8 tokens
    attn = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]], dtype=torch.float64)
    kept = vispruner_indices(attn, x, 5, 0.2, per_round=1)[0].tolist()
    assert 7 in kept  # the most attended token is the important one
    assert len({tuple(x[0, i].tolist()) for i in kept}) == 5


def hf_cls_attention(model, pixel_values):
    """HF's eager CLIP forward: attentions[-2][:, :, 0, 1:] averaged over heads (the released
    ``feature_select`` with output_attentions), and the layer -2 patch features."""
    hf = copy.deepcopy(model.encoder.model)
    hf.set_attn_implementation("eager")
    out = hf(pixel_values, output_hidden_states=True, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(1), out.hidden_states[-2][:, 1:]


@pytest.mark.parametrize("keep, ratio, size", [(8, 0.5, 56), (16, 0.5, 112), (12, 0.75, 112)])
def test_end_to_end_matches_hf_attention_and_the_rule(keep, ratio, size):
    comp = VisPruner(keep, ratio)
    model = tiny_lmm(comp, image_size=size)
    pv = toy_batch(image_size=size)["pixel_values"]
    with torch.no_grad():
        enc = model.encoder(pv, keep_states=comp.extra_layers)
        enc.encoder = model.encoder
        mine = comp(enc.features, enc)
        attn, feats = hf_cls_attention(model, pv)
        assert torch.allclose(comp.cls_attention(enc), attn, atol=1e-6)
        assert torch.allclose(enc.features, feats, atol=1e-5)
    for b in range(2):
        idx = reference(attn[b].tolist(), feats[b].tolist(), keep, ratio)
        assert torch.allclose(mine[b], enc.features[b, idx], atol=1e-6)
    assert mine.shape == (2, keep, 32) and comp.tokens_out(enc.features.shape[1]) == keep


def test_batch_equals_each_sample_alone_and_video_frames_are_images():
    b = toy_batch()
    m = tiny_lmm(VisPruner(8))
    vis = check_pre_llm_batch_equals_singles(m, b)
    assert vis.shape[1] == 8
    out = m(toy_video_batch(frames=4))  # a video: 4 frames x 8 tokens
    assert out.visual_in.tolist() == [32, 8, 0]


def test_training_forward_backward():
    m = tiny_lmm(VisPruner(6, 0.5)).train()
    out = m(toy_batch())
    assert torch.isfinite(out.loss) and out.visual_in.tolist() == [6, 6, 0]
    out.loss.backward()
    for name in ("projector", "llm"):
        for p in getattr(m, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_refusals_name_the_key():
    with pytest.raises(ConfigError, match="CLS") as e:
        VisPruner().check(SIGLIP, 32)
    assert e.value.key == "compressor"
    with pytest.raises(ConfigError) as e:
        VisPruner(4).check(EncoderInfo(56, 14, 8, 2, True, 0), 3)
    assert e.value.key == "encoder.select_layer"
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ConfigError) as e:
            VisPruner(bad).check(TINY, 3)
        assert e.value.key == "compressor.keep" and "1..16" in e.value.message
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ConfigError) as e:
            VisPruner(4, bad).check(TINY, 3)
        assert e.value.key == "compressor.important_ratio"
    for bad in (0, 2.5, False):
        with pytest.raises(ConfigError) as e:
            VisPruner(4, 0.5, bad).check(TINY, 3)
        assert e.value.key == "compressor.per_round"
    with pytest.raises(ConfigError) as e:
        tiny_lmm(VisPruner())  # 64 > 16 patches
    assert e.value.key == "compressor.keep"
    for ok in (VisPruner(16, 1), VisPruner(1, 0.0)):
        ok.check(TINY, 3)


def test_knobs_budgets_counts_and_own_flops():
    comp = VisPruner()
    assert comp.get_knobs() == {"keep": 64, "important_ratio": 0.5}
    assert comp.budget_knobs(128, 576, CLIP_L) == {"keep": 128} and comp.budget_knobs(999, 576, CLIP_L) == {"keep": 576}
    assert comp.tokens_out(576) == 64 and comp.tokens_out(30) == 30
    comp.check(CLIP_L, 32)
    comp.setup(CLIP_L, 4096)
    assert comp.extra_layers == (22,)
    # 64 = 32 important + 32 diverse: 544 residual tokens lose 8 per round down to 32 (64 rounds)
    c = 1024
    rounds = sum(2.0 * (R // 2) * (R // 2) * c for R in range(544, 32, -8))
    assert removal_rounds(544, 32, 8) == list(range(544, 32, -8))
    assert comp.own_flops(576) == 2.0 * (577 * c * c + c * c + 577 * c) + 3.0 * 576 * c + rounds
    assert VisPruner(576).own_flops(576) == 0.0
    x = torch.randn(2, 16, 3)
    assert VisPruner(16)(x, None) is x
    comp.set_enabled(False)
    assert comp(x, None) is x and comp.tokens_out(576) == 576
