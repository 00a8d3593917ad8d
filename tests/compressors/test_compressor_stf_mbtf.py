"""LLaVA-STF with Multi-Block Token Fusion (vtc.compressors.stf_mbtf): which hidden states are
fused and in what channel order, against HF's own ``output_hidden_states``; the depth scaling rule;
gradients; real-size parameter count on the meta device."""
import pytest
import torch

from vtc.compressors.stf import fuse_windows
from vtc.compressors.stf_mbtf import REFERENCE_BLOCKS, STFMultiBlock, scaled_blocks
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def test_block_indices_scale_with_depth():
    assert scaled_blocks(24, 23) == (21, 18, 15, 12, 9, 6, 3) == REFERENCE_BLOCKS  # CLIP-L: the paper's
    assert scaled_blocks(6, 5) == (5, 4, 4, 3, 2, 2, 1)  # round(i/4), halves to even
    assert scaled_blocks(3, 2) == (2, 2, 2, 2, 1, 1, 1)  # clamped to [1, selected]
    assert scaled_blocks(12, 11) == (10, 9, 8, 6, 4, 3, 2)


def test_fused_hidden_states_and_order_match_hf():
    model = tiny_lmm(STFMultiBlock(), layers=6)
    comp = model.compressor
    assert comp.extra_layers == (5, 4, 4, 3, 2, 2, 1)  # instance attribute, read by LMM.encode_images
    pv = toy_batch()["pixel_values"]
    hs = model.encoder.model(pv, output_hidden_states=True).hidden_states  # HF: index i = block i output
    order = [5, 5, 4, 4, 3, 2, 2, 1]  # the selected layer (-2 -> 5) first, then the blocks
    f = torch.cat([hs[i][:, 1:] for i in order], dim=-1)  # CLS dropped
    enc = model.encoder(pv, keep_states=comp.extra_layers)
    assert torch.allclose(comp.gather(enc.features, enc), f, atol=1e-6)
    # Whole path: fusion per token (8C -> 4C -> C), then STF on the 4x4 grid, then its MLP.
    expect = comp.mlp(fuse_windows(comp.fusion(f), (4, 4), 2))
    assert torch.allclose(model.encode_images(pv), expect, atol=1e-6)
    assert [m.weight.shape for m in comp.fusion if isinstance(m, torch.nn.Linear)] == [(128, 256), (32, 128)]


def test_gradients_reach_every_parameter_and_training_is_deterministic():
    b = toy_batch()
    model = tiny_lmm(STFMultiBlock(), seed=2).train()
    loss = model(b).loss
    loss.backward()
    for name, p in model.compressor.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and float(p.grad.abs().sum()) > 0, name
    assert torch.equal(loss, tiny_lmm(STFMultiBlock(), seed=2).train()(b).loss)


def test_real_size_parameter_count_on_meta():
    comp = STFMultiBlock()
    comp.check(CLIP_L, 32)
    with torch.device("meta"):
        comp.setup(CLIP_L, 4096)
    assert comp.extra_layers == (21, 18, 15, 12, 9, 6, 3)
    fusion = sum(p.numel() for p in comp.fusion.parameters())
    stf = sum(p.numel() for p in comp.mlp.parameters())
    assert fusion == 8192 * 4096 + 4096 + 4096 * 1024 + 1024  # 8192 -> 4096 -> 1024
    assert stf == 4096 * 16384 + 16384 + 16384 * 4096 + 4096  # 4096 -> 16384 -> 4096
    assert sum(p.numel() for p in comp.parameters()) == fusion + stf
    assert comp.tokens_out(576) == 144


def test_check_rejects_bad_blocks_and_window():
    with pytest.raises(ConfigError) as e:
        STFMultiBlock(blocks=[30]).check(CLIP_L, 32)
    assert e.value.key == "compressor.blocks"
    with pytest.raises(ConfigError) as e:
        STFMultiBlock(window=5).check(CLIP_L, 32)
    assert e.value.key == "compressor.window"


def test_generation_and_batch_independence():
    model = tiny_lmm(STFMultiBlock())
    b = toy_batch()
    full, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    assert seen[:, 0].tolist() == [4, 4, 4]
    for i in range(3):
        s = single(b, i)
        assert model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0][0] == full[i]
