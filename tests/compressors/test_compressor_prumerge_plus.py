"""LLaVA-PruMerge+ (vtc.compressors.prumerge_plus) against a transcription of the released
``token_prune_merge_advanced_plus`` (hooks on the next block's q/k during HF's own forward, numpy
percentiles, the per-token merge loop), the head-mean score against HF's eager attention map,
per-image token counts as a list through the LMM, SigLIP rejected, determinism, training."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vtc.compressors.prumerge_plus import PruMergePlus, iqr_outliers, merge_kept, spatial_fill
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)
SIGLIP = EncoderInfo(384, 14, 1152, 27, False, -2)


def peaky_model(seed=0, scale=4.0, **kw):
    """112 px (8x8 patches); the scoring block's q/k scaled so the CLS attention has outliers
    that differ per image (a random-init CLIP attends almost uniformly)."""
    model = tiny_lmm(PruMergePlus(**kw), seed=seed, image_size=112)
    attn = model.encoder.layers[2].self_attn  # selected layer 2 of 3 -> the block reading it
    with torch.no_grad():
        attn.q_proj.weight.mul_(scale)
        attn.k_proj.weight.mul_(scale)
    return model


def released(model, pixel_values, knn=32):
    """Transcription of the released code: hooks on layers[sel].q_proj/k_proj during the HF
    vision tower's full forward, full-width single-row attention, numpy IQR, the adaptive '+'
    fill, the per-token merge loop and the extra token."""
    hf = model.encoder.model
    sel = model.encoder.info.layer_index(-2)
    got = {}
    hooks = [model.encoder.layers[sel].self_attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o)),
             model.encoder.layers[sel].self_attn.q_proj.register_forward_hook(lambda m, i, o: got.__setitem__("q", o))]
    try:
        out = hf(pixel_values, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    feats = out.hidden_states[-2][:, 1:]
    B, N, C = feats.shape
    res = []
    for b in range(B):
        attn = F.softmax((got["q"][b] @ got["k"][b].T) * C ** -0.5, dim=-1)
        cls_attn = attn[0, 1:]
        a = cls_attn.float().numpy()
        q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
        ratio = len(np.where(a > q3 + 1.5 * (q3 - q1))[0]) / len(a)
        ratio = max(ratio, 1 / N)  # top-1 when no outlier (the released code divides by zero)
        idx = torch.topk(cls_attn, int(N * ratio)).indices
        step = max(1, int(int(1 / ratio) / 3))  # 0 would stop their arange
        seq = [x for x in range(0, N - 1, step) if x not in idx.tolist()]
        idx = torch.cat([idx, torch.tensor(seq, dtype=torch.long)])
        keys = got["k"][b, 1:]
        x_o, a_o, k_o = feats[b, idx], cls_attn[idx], F.normalize(keys[idx], dim=-1)
        compl = torch.tensor([j for j in range(N) if j not in idx.tolist()], dtype=torch.long)
        non, non_a, non_k = feats[b, compl], cls_attn[compl], F.normalize(keys[compl], dim=-1)
        upd = torch.zeros_like(x_o)
        for i in range(len(idx)):
            rest_x = torch.cat([x_o[:i], x_o[i + 1:], non])
            rest_a = torch.cat([a_o[:i], a_o[i + 1:], non_a])
            rest_k = torch.cat([k_o[:i], k_o[i + 1:], non_k])
            nb = torch.topk(k_o[i] @ rest_k.T, min(knn, N - 1)).indices
            upd[i] = x_o[i] + (rest_x[nb] * rest_a[nb, None]).sum(0)
        res.append(torch.cat([upd, (non * non_a[:, None]).sum(0, keepdim=True)]))
    return res


def test_matches_released_algorithm_and_counts_differ_per_image():
    model = peaky_model()
    pv = toy_batch(image_size=112)["pixel_values"]
    with torch.no_grad():
        enc = model.encoder(pv)
        enc.encoder = model.encoder
        mine = model.compressor(enc.features, enc)
        ref = released(model, pv)
    assert isinstance(mine, list) and len(mine[0]) != len(mine[1])  # variable counts: a list
    for m, r in zip(mine, ref):
        assert m.shape == r.shape
        assert torch.allclose(m, r, atol=1e-5)
    for knn in (1, 5):
        model.compressor.set_knobs(knn=knn)
        with torch.no_grad():
            mine = model.compressor(enc.features, enc)
            ref = released(model, pv, knn=knn)
        assert all(torch.allclose(m, r, atol=1e-5) for m, r in zip(mine, ref))


def test_head_mean_score_is_hf_eager_attention_row():
    model = peaky_model(score="heads")
    pv = toy_batch(image_size=112)["pixel_values"]
    eager = copy.deepcopy(model.encoder.model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        enc = model.encoder(pv)
        enc.encoder = model.encoder
        a, keys = model.compressor.cls_attention_and_keys(enc)
        out = eager(pv, output_attentions=True)
    ref = out.attentions[2][:, :, 0, 1:].mean(1)  # layers[2] reads hidden state 2 (= layer -2)
    assert torch.allclose(a, ref, atol=1e-6)
    assert keys.shape == (2, 64, 32)


def test_iqr_outliers_and_spatial_fill():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(576, generator=g) ** 8  # heavy right tail
    q1, q3 = np.percentile(a.numpy(), 25), np.percentile(a.numpy(), 75)
    expect = set(np.where(a.numpy() > q3 + 1.5 * (q3 - q1))[0].tolist())
    got = iqr_outliers(a)
    assert set(got.tolist()) == expect and len(expect) > 0
    assert torch.all(a[got][:-1] >= a[got][1:])  # by decreasing attention
    assert len(iqr_outliers(torch.ones(10))) == 1  # no outlier: the top-1 token
    sel = torch.tensor([3, 100, 6])
    fill = spatial_fill(576, torch.arange(32))  # k = 32 -> step int(int(576/32)/3) = 6
    assert fill.tolist() == [x for x in range(0, 575, 6) if x >= 32]
    assert spatial_fill(576, sel).tolist() == [x for x in range(0, 575, 64) if x not in (3, 100, 6)]


def test_merge_rule_on_hand_example():
    x = torch.tensor([[1.0, 0], [0, 1], [2, 2], [4, 0]])
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0.1, 1]])
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = merge_kept(x, keys, a, torch.tensor([0, 1]), knn=1)
    # token 0's nearest other key is token 2, token 1's is token 3; extra = 0.3·x2 + 0.4·x3
    assert torch.allclose(out, torch.tensor([[1 + 0.6, 0.6], [1.6, 1], [0.6 + 1.6, 0.6]]))


def test_list_visual_tokens_through_lmm_batch_equals_alone_and_trains():
    model = peaky_model()
    b = toy_batch(image_size=112)
    vis = model.encode_images(b["pixel_values"])
    assert isinstance(vis, list) and vis[0].shape[1] == 32 and len(vis[0]) != len(vis[1])
    out = model(b)
    assert out.visual_in.tolist() == [len(vis[0]), len(vis[1]), 0]
    full, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    assert seen[0].tolist() == [len(vis[0]), len(vis[1]), 0]
    for i in range(3):
        s = single(b, i)
        alone_out = model(s)
        if len(s["pixel_values"]):
            v = model.encode_images(s["pixel_values"])
            assert torch.allclose(v[0], vis[int(b["image_index"][i])], atol=1e-5)
            assert alone_out.visual_in.tolist() == [len(v[0])]
        assert model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0][0] == full[i]
    # same seed, same output
    again = peaky_model().encode_images(b["pixel_values"])
    assert all(torch.equal(u, w) for u, w in zip(vis, again))
    model.train()
    model(b).loss.backward()
    for name in ("projector", "llm"):
        for p in getattr(model, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_checks_counts_and_defaults():
    comp = PruMergePlus()
    comp.check(CLIP_L, 32)
    comp.setup(CLIP_L, 4096)
    assert comp.extra_layers == () and comp.knn == 32 and comp.score == "released"
    assert comp.tokens_out(576) == 32 + 96 + 1  # nominal: 5.5% outliers, fill step 6, extra token
    assert comp.own_flops(576) > 0
    with pytest.raises(ConfigError, match="CLS") as e:
        PruMergePlus().check(SIGLIP, 32)
    assert e.value.key == "compressor"
    with pytest.raises(ConfigError):
        PruMergePlus(score="mean").check(CLIP_L, 32)
    last = EncoderInfo(336, 14, 1024, 24, True, -1)
    comp.setup(last, 4096)
    assert comp.extra_layers == (23,)  # no block reads the last layer: score inside it instead


def test_select_layer_minus_one_scores_inside_the_last_block():
    model = tiny_lmm(PruMergePlus(), select_layer=-1)
    vis = model.encode_images(toy_batch()["pixel_values"])
    assert len(vis) == 2 and all(v.shape[-1] == 32 for v in vis)
