"""LLaVolta's visual context compressor (vtc.compressors.vcc) against independent computations:
window means and truncated mean positions, per-sample independence in padded batches, the
paper's compression ratio, cached generation over the pooled KV cache, training."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from vtc.compressors.vcc import VisualContextCompressor, pool_visual
from vtc.errors import ConfigError
from vtc.cost.schedules import llavolta_cr
from vtc.model.encoder import EncoderInfo
from vtc.model.sequence import LayerContext
from tests.tiny import single, spy, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def test_pool_visual_matches_explicit_windows_and_their_avg_pool1d():
    torch.manual_seed(0)
    L, d, S = 11, 3, 3  # 11 = 3·3 + 2: the last two tokens are dropped, as avg_pool1d does
    h = torch.randn(L, d, dtype=torch.float64)
    pos = torch.tensor([40, 41, 43, 43, 45, 46, 48, 47, 49, 49, 50])  # window means 41.33, 44.67, 48
    ph, pp = pool_visual(h, pos, S)
    assert ph.shape == (3, d) and pp.shape == (3,)
    for j in range(3):
        win = range(S * j, S * j + S)
        assert torch.allclose(ph[j], sum(h[t] for t in win) / S)
        assert int(pp[j]) == int(sum(int(pos[t]) for t in win) / S)  # mean, truncated
    # Their operator: avg_pool1d over [1, d, L] hidden and [1, 1, L] positions, then cast to int.
    ref_h = F.avg_pool1d(h.T[None], kernel_size=S, stride=S)[0].T
    ref_p = F.avg_pool1d(pos[None, None].double(), kernel_size=S, stride=S)[0, 0].long()
    assert torch.allclose(ph, ref_h) and torch.equal(pp, ref_p)


def test_compress_pools_each_sample_and_leaves_text_alone():
    """Sequences built from the toy batch (image in the middle; image first + padding; text only)."""
    model = tiny_lmm(VisualContextCompressor(layer=0, stride=3))
    b = toy_batch()
    st = model.build_sequence(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_index"])
    # Shift sample 1's positions to make the position pooling visible (ids 5.. instead of 0..).
    st = replace(st, position_ids=st.position_ids + 5 * st.attention_mask)
    out = model.compressor.compress(st, LayerContext(0, model.llm.layers[0]))
    for i in range(3):
        n = int(st.lengths[i])
        vis = st.visual_mask[i, :n]
        idx = vis.nonzero().squeeze(1).tolist()
        text = (~vis).nonzero().squeeze(1).tolist()
        m = len(idx) // 3
        exp_h, exp_p = [], []
        for j in range(m):
            w = idx[3 * j: 3 * j + 3]
            exp_h.append(st.hidden[i, w].mean(0))
            exp_p.append(sum(int(st.position_ids[i, t]) for t in w) // 3)
        start = idx[0] if idx else n
        # Expected sequence: text before the image, pooled tokens, text after.
        before = [t for t in text if t < start]
        after = [t for t in text if t > start]
        hid = [st.hidden[i, t] for t in before] + exp_h + [st.hidden[i, t] for t in after]
        pos = [int(st.position_ids[i, t]) for t in before] + exp_p + [int(st.position_ids[i, t]) for t in after]
        tgt = [int(st.targets[i, t]) for t in before] + [-100] * m + [int(st.targets[i, t]) for t in after]
        k = len(hid)
        assert int(out.lengths[i]) == k
        assert torch.allclose(out.hidden[i, :k], torch.stack(hid))
        assert out.position_ids[i, :k].tolist() == pos
        assert out.targets[i, :k].tolist() == tgt
        assert int(out.visual_counts()[i]) == m
        # The query token is the same token as before.
        assert torch.equal(out.hidden[i, out.query_index[i]], st.hidden[i, st.query_index[i]])
    assert out.visual_counts().tolist() == [5, 5, 0]  # 16 tokens, S=3: 5 windows, one token dropped


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_batch_equals_each_sample_alone(layer):
    comp = VisualContextCompressor(layer=layer, stride=4)
    model = tiny_lmm(comp)
    rec = spy(comp)
    b = toy_batch()
    full = model(b)
    batch_out = rec["out"]
    total, count = 0.0, 0
    for i in range(3):
        o = model(single(b, i))
        alone = rec["out"]
        n = int(alone.lengths[0])
        assert int(batch_out.lengths[i]) == n
        assert torch.allclose(batch_out.hidden[i, :n], alone.hidden[0, :n], atol=1e-5)
        assert torch.equal(batch_out.position_ids[i, :n], alone.position_ids[0, :n])
        assert torch.equal(batch_out.visual_mask[i, :n], alone.visual_mask[0, :n])
        total += float(o.loss) * o.num_targets
        count += o.num_targets
    assert full.loss.item() == pytest.approx(total / count, rel=1e-5)
    assert full.seen[:, 0].tolist() == comp.tokens_per_layer(16, 3)
    assert full.seen[:, 2].tolist() == [0, 0, 0]


def test_llavolta_compression_ratio_from_tokens_per_layer():
    comp = VisualContextCompressor(layer=2, stride=8)
    per_layer = comp.tokens_per_layer(576, 32)
    assert per_layer == [576] * 2 + [72] * 30
    cr = 32 * 576 / sum(per_layer)
    N, K, S, L = 32, 2, 8, 576
    assert cr == pytest.approx(N * L / ((N - K) * L / S + K * L))
    assert cr == pytest.approx(5.565, abs=1e-3) and cr == pytest.approx(llavolta_cr(32, 2, 8))


def test_uncompressed_settings():
    for comp in (VisualContextCompressor(layer=None, stride=8), VisualContextCompressor(layer=2, stride=1)):
        comp.check(CLIP_L, 32)
        assert comp.tokens_per_layer(576, 32) == [576] * 32
        assert not any(comp.applies_at(i) for i in range(32))
    comp = VisualContextCompressor(2, 8)
    comp.set_enabled(False)
    assert comp.tokens_per_layer(576, 32) == [576] * 32 and not comp.applies_at(2)
    comp.set_enabled(True)
    comp.set_knobs(layer=16, stride=2)  # a later curriculum stage
    assert comp.tokens_per_layer(576, 32) == [576] * 16 + [288] * 16
    assert comp.get_knobs() == {"layer": 16, "stride": 2}
    # K = 0 pools the input embeddings: every layer sees the pooled tokens.
    model = tiny_lmm(VisualContextCompressor(layer=0, stride=4))
    assert model(toy_batch()).seen[:, 0].tolist() == [4, 4, 4]


def test_check_rejects_bad_settings():
    for kw, key in [(dict(stride=0), "compressor.stride"), (dict(stride=2.5), "compressor.stride"),
                    (dict(layer=32), "compressor.layer"), (dict(layer=-1), "compressor.layer"),
                    (dict(stride=1000), "compressor.stride")]:
        with pytest.raises(ConfigError) as e:
            VisualContextCompressor(**{"layer": 2, "stride": 8, **kw}).check(CLIP_L, 32)
        assert e.value.key == key


def test_same_seed_same_output_and_training_gradients():
    b = toy_batch()
    l1 = tiny_lmm(VisualContextCompressor(2, 4), seed=3)(b).loss
    l2 = tiny_lmm(VisualContextCompressor(2, 4), seed=3)(b).loss
    assert torch.equal(l1, l2)
    model = tiny_lmm(VisualContextCompressor(1, 4)).train()
    model(b).loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in (p.grad for p in model.projector.parameters()))


@pytest.mark.parametrize("layer", [0, 2])
def test_cached_generation_matches_full_recompute(layer):
    """The prompt is pooled once; decoding over the pooled cache equals recomputing everything."""
    model = tiny_lmm(VisualContextCompressor(layer=layer, stride=4))
    b = toy_batch()
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 4)
    assert seen[:, 0].tolist() == [16] * layer + [4] * (3 - layer)
    for i in range(3):
        s = single(b, i)
        cur = s["input_ids"]
        q0 = None
        ref = []
        for _ in range(4):
            st = model.build_sequence(cur, torch.ones_like(cur), None, s["pixel_values"], s["image_index"])
            q0 = int(st.query_index[0]) if q0 is None else q0
            st = replace(st, query_index=torch.tensor([q0]))
            o, _, _ = model.llm.run_layers(st, model.compressor)
            t = int(model.next_token(model.llm.logits(o.hidden[0, -1])))
            if t == model.eos_token_id:
                break
            ref.append(t)
            cur = torch.cat([cur, torch.tensor([[t]])], 1)
        assert tokens[i] == ref
