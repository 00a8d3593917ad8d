"""Random pruning (vtc/compressors/random_prune.py) against an independent draw, batch equal to each
sample alone at eval, fresh subsets in training, and refused where it cannot work."""
from __future__ import annotations

import pytest
import torch

from vtc.compressors.random_prune import RandomPrune
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

from tests.tiny import check_pre_llm_batch_equals_singles, tiny_lmm, toy_batch, toy_video_batch


def eval_reference(features: torch.Tensor, keep: int, seed: int) -> torch.Tensor:
    """The rule written out: positions = the first ``keep`` of one seeded permutation, ascending."""
    g = torch.Generator().manual_seed(seed)
    positions = sorted(torch.randperm(features.shape[1], generator=g).tolist()[:keep])
    return torch.stack([torch.stack([x[p] for p in positions]) for x in features])


@pytest.mark.parametrize("keep, seed", [(4, 0), (7, 3), (16, 1)])
def test_eval_keeps_one_seeded_subset_in_raster_order(keep, seed):
    x = torch.randn(3, 16, 5)
    comp = RandomPrune(keep, seed).eval()
    got = comp(x, None)
    assert got.shape == (3, keep, 5) and torch.equal(got, eval_reference(x, keep, seed))
    assert torch.equal(comp(x, None), got)  # repeats exactly
    if keep < 16:
        assert not torch.equal(RandomPrune(keep, seed + 1).eval()(x, None), got)  # another seed, another draw


def test_training_draws_a_fresh_subset_per_image_and_step():
    torch.manual_seed(0)
    x = torch.arange(16.0)[None, :, None].expand(4, 16, 2).contiguous()  # token value = its position
    comp = RandomPrune(6).train()
    a, b = comp(x, None), comp(x, None)
    for out in (a, b):
        pos = out[..., 0]
        assert out.shape == (4, 6, 2) and (pos.diff(dim=1) > 0).all()  # a subset, in raster order
    assert len({tuple(r.tolist()) for r in torch.cat([a[..., 0], b[..., 0]])}) > 1


def test_batch_equals_each_sample_alone_and_frames_share_the_subset():
    b = toy_batch()
    m = tiny_lmm(RandomPrune(5, seed=2))
    vis = check_pre_llm_batch_equals_singles(m, b)
    assert vis.shape[1] == 5
    out = m(toy_video_batch(frames=4))  # a video: 4 frames x 5 tokens
    assert out.visual_in.tolist() == [20, 5, 0]


def test_refusals_name_the_key_and_budgets_map_to_keep():
    info = EncoderInfo(image_size=56, patch_size=14, hidden_size=8, has_cls=True, select_layer=-2, num_layers=2)
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ConfigError) as e:
            RandomPrune(bad).check(info, 3)
        assert e.value.key == "compressor.keep" and "1..16" in e.value.message
    with pytest.raises(ConfigError) as e:
        RandomPrune(4, seed="a").check(info, 3)
    assert e.value.key == "compressor.seed"
    assert RandomPrune().budget_knobs(9, 16, info) == {"keep": 9}
    assert RandomPrune(4).tokens_out(16) == 4
