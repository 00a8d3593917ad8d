"""DivPrune (vtc/compressors/divprune.py) against the released greedy rule written out in plain Python,
its max-min objective against a brute-force optimum (the greedy's factor-2 bound), duplicates,
batch equal to each sample alone, video frames, training, and refusals."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from vtc.compressors.divprune import DivPrune, divprune_indices, greedy_maxmin
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

from tests.tiny import check_pre_llm_batch_equals_singles, tiny_lmm, toy_batch, toy_video_batch

INFO = EncoderInfo(image_size=56, patch_size=14, hidden_size=8, num_layers=2, has_cls=True, select_layer=-2)


def cos_dist(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return 1.0 - dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def reference(tokens: list[list[float]], k: int) -> list[int]:
    """The released rule, one image, lists only: the first pick is the token whose nearest other
    token is farthest (second-smallest entry of its distance column), then each pick is the token
    not yet kept whose distance to the kept set is largest; first index on ties; sorted at the end."""
    n = len(tokens)
    d = [[cos_dist(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
    best, first = None, None
    for j in range(n):
        second = sorted(d[i][j] for i in range(n))[1]
        if best is None or second > best:
            best, first = second, j
    kept = [first]
    while len(kept) < k:
        best, pick = None, None
        for j in range(n):
            if j in kept:
                continue
            to_set = min(d[i][j] for i in kept)
            if best is None or to_set > best:
                best, pick = to_set, j
        kept.append(pick)
    return sorted(kept)


@pytest.mark.parametrize("n, c, k", [(9, 3, 1), (9, 3, 4), (16, 5, 6), (20, 8, 19), (12, 2, 12)])
def test_picks_match_the_rule_written_out(n, c, k):
    g = torch.Generator().manual_seed(n * 100 + k)
    x = torch.randn(3, n, c, generator=g, dtype=torch.float64)
    got = divprune_indices(x, k)
    assert got.shape == (3, k)
    for b in range(3):
        assert got[b].tolist() == reference(x[b].tolist(), k)
    out = DivPrune(k).eval()(x, None)  # the module keeps those tokens, in raster order
    want = torch.stack([x[b, got[b]] for b in range(3)]) if k < n else x
    assert torch.equal(out, want)


def chord_objective(points: list[list[float]], subset) -> float:
    """min pairwise chordal distance ||u/|u| - v/|v||| = sqrt(2 (1 - cos)), a metric."""
    return min(math.sqrt(max(0.0, 2.0 * cos_dist(points[i], points[j]))) for i, j in itertools.combinations(subset, 2))


def test_greedy_is_within_factor_two_of_the_brute_force_optimum():
    """1 - cos is increasing in the chordal metric, so greedy max-min is a 2-approximation there
    (a factor 4 in 1 - cos). Brute force over every subset of small sets."""
    g = torch.Generator().manual_seed(0)
    optimal = 0
    trials = 0
    for n, c, k in [(8, 2, 3), (8, 3, 4), (9, 3, 3), (10, 4, 5), (7, 2, 4)]:
        for _ in range(8):
            x = torch.randn(n, c, generator=g, dtype=torch.float64)
            pts = x.tolist()
            picked = divprune_indices(x[None], k)[0].tolist()
            got = chord_objective(pts, picked)
            best = max(chord_objective(pts, s) for s in itertools.combinations(range(n), k))
            assert got >= best / 2 - 1e-12, (n, k, got, best)
            assert got ** 2 / 2 >= (best ** 2 / 2) / 4 - 1e-12  # the same bound in 1 - cos
            optimal += got >= best - 1e-12
            trials += 1
    assert 0 < optimal <= trials  # the greedy is often, not always, optimal


def test_greedy_finds_the_optimum_where_it_is_known():
    """A case where greedy is known optimal: k = 2 on a line of directions (angles 0, 1, 2.5 rad in
    the plane): the most isolated direction (2.5) first, then the farthest from it (0), the diameter."""
    pts = torch.tensor([[math.cos(a), math.sin(a)] for a in (0.0, 1.0, 2.5)], dtype=torch.float64)
    assert divprune_indices(pts[None], 2)[0].tolist() == [0, 2]
    assert greedy_maxmin((1 - pts @ pts.T)[None], 2)[0].tolist() == [2, 0]  # pick order: isolated first


def test_duplicates_and_scale_are_one_direction_and_kept_tokens_stay_distinct():
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    x = torch.stack([e1, 2 * e1, e2, e1, 3 * e2, e3 + 0.01 * e1])[None]  # 3 directions, repeated and scaled
    kept = divprune_indices(x, 3)[0].tolist()
    dirs = {tuple((x[0, i] / x[0, i].norm()).round(decimals=1).tolist()) for i in kept}
    assert len(dirs) == 3  # one token per direction
    more = divprune_indices(x, 5)[0].tolist()
    assert len(set(more)) == 5  # once every direction is kept, further picks are still new tokens


@pytest.mark.parametrize("features", ["projected", "encoder"])
def test_scores_the_configured_features_and_keeps_them(features):
    """projected (the released code): the projector runs on every patch and the greedy picks among
    its outputs; encoder: the picks come from the patch features, the projector runs on the kept."""
    model = tiny_lmm(DivPrune(5, features))
    pv = toy_batch()["pixel_values"]
    with torch.no_grad():
        got = model.encode_images(pv)
        feats = model.encoder(pv).features
        projected = model.projector(feats)
    scored = projected if features == "projected" else feats
    for b in range(2):
        idx = reference(scored[b].double().tolist(), 5)
        assert torch.allclose(got[b], projected[b, idx], atol=1e-5)
    other = projected if features == "encoder" else feats
    assert any(reference(other[b].double().tolist(), 5) != reference(scored[b].double().tolist(), 5)
               for b in range(2))  # the two feature choices pick differently here


@pytest.mark.parametrize("features", ["projected", "encoder"])
def test_batch_equals_each_sample_alone_and_video_frames_are_images(features):
    b = toy_batch()
    m = tiny_lmm(DivPrune(5, features))
    vis = check_pre_llm_batch_equals_singles(m, b)
    assert vis.shape[1] == 5
    out = m(toy_video_batch(frames=4))  # a video: 4 frames x 5 tokens
    assert out.visual_in.tolist() == [20, 5, 0]


@pytest.mark.parametrize("features", ["projected", "encoder"])
def test_training_forward_backward(features):
    m = tiny_lmm(DivPrune(6, features)).train()
    out = m(toy_batch())
    assert torch.isfinite(out.loss) and out.visual_in.tolist() == [6, 6, 0]
    out.loss.backward()
    for name in ("projector", "llm"):
        for p in getattr(m, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_refusals_knobs_budgets_counts_and_own_flops():
    for bad in (0, 17, 2.5, True, "8"):
        with pytest.raises(ConfigError) as e:
            DivPrune(bad).check(INFO, 3)
        assert e.value.key == "compressor.keep" and "1..16" in e.value.message
    DivPrune(16).check(INFO, 3)
    with pytest.raises(ConfigError) as e:
        DivPrune(4, "pixels").check(INFO, 3)
    assert e.value.key == "compressor.features" and "projected" in e.value.message
    comp = DivPrune(4, "encoder")
    assert comp.get_knobs() == {"keep": 4}
    assert comp.budget_knobs(9, 16, INFO) == {"keep": 9} and comp.budget_knobs(40, 16, INFO) == {"keep": 16}
    assert comp.tokens_out(16) == 4 and comp.tokens_out(3) == 3
    clip_l = EncoderInfo(336, 14, 1024, 24, True, -2)
    comp.setup(clip_l, 4096)
    assert comp.own_flops(576) == 2.0 * 576 * 576 * 1024 + 3.0 * 576 * 1024 + 2.0 * 4 * 576
    proj = DivPrune(4)  # projected: the 4096-d Gram, and the mlp2x_gelu projector on the 572 pruned patches
    proj.setup(clip_l, 4096)
    proj.projector_dims = [1024, 4096, 4096]  # as the LMM sets them
    assert proj.own_flops(576) == (2.0 * 576 * 576 * 4096 + 3.0 * 576 * 4096 + 2.0 * 4 * 576
                                   + 2.0 * 572 * (1024 * 4096 + 4096 * 4096))
    assert tiny_lmm(DivPrune(4)).compressor.projector_dims == [32, 32, 32]
    assert DivPrune(576).own_flops(576) == 0.0  # keeps everything: no scoring pass
    x = torch.randn(2, 16, 3)
    assert DivPrune(16)(x, None) is x
    comp.set_enabled(False)
    assert comp(x, None) is x and comp.tokens_out(16) == 16
