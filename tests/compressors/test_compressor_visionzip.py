"""VisionZip (vtc.compressors.visionzip) against a transcription of the released
``CLIPVisionTower_VisionZip.forward`` run on HF's own eager forward (full attention map of layer
-2, its head-mean keys from a k_proj hook), the contextual merge against a per-token loop, the
paper's settings, SigLIP rejected, batch independence, determinism, training, generation."""
import copy

import pytest
import torch
import torch.nn.functional as F

from vtc.compressors.visionzip import VisionZip, contextual_merge
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)
SIGLIP = EncoderInfo(384, 14, 1152, 27, False, -2)


def released(model, pixel_values, dominant, contextual):
    """The released code on HF's eager forward: attentions[-2], hidden_states[-2], metric = the
    keys of layers[-2] averaged over heads; ``visionzip(dominant=D)`` passes D - 1 to top-k."""
    hf = copy.deepcopy(model.encoder.model)
    hf.set_attn_implementation("eager")
    layer = hf.encoder.layers[-2]
    got = {}
    h = layer.self_attn.k_proj.register_forward_hook(lambda m, i, o: got.__setitem__("k", o))
    try:
        out = hf(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        h.remove()
    attn_weights, hidden_states = out.attentions[-2], out.hidden_states[-2]
    B, T, C = hidden_states.shape
    a = layer.self_attn
    metric = got["k"].view(B, T, a.num_heads, a.head_dim).transpose(1, 2).mean(1)
    dominant_num = dominant - 1
    cls_attention_sum = attn_weights[:, :, 0, 1:].sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((B, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(B, dominant_num + 1, C)
    metric_filtered = metric[mask].view(B, T - (dominant_num + 1), metric.shape[2])
    hidden_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(B, T - (dominant_num + 1), C)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]
    target_tokens = metric_normalized[:, target_indices, :]
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others, :], target_tokens.transpose(1, 2))
    assign = torch.zeros(B, int(others.sum()), contextual, dtype=hidden_filtered.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others, :]) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


@pytest.mark.parametrize("dominant,contextual,size", [(6, 3, 56), (9, 4, 56), (20, 6, 112)])
def test_matches_released_code_on_hf_eager_forward(dominant, contextual, size):
    comp = VisionZip(dominant, contextual)
    model = tiny_lmm(comp, image_size=size)
    pv = toy_batch(image_size=size)["pixel_values"]
    with torch.no_grad():
        enc = model.encoder(pv, keep_states=comp.extra_layers)
        enc.encoder = model.encoder
        mine = comp(enc.features, enc)
        ref, idx = released(model, pv, dominant, contextual)
    assert mine.shape == (2, dominant + contextual, 32) == ref.shape
    assert torch.allclose(mine, ref, atol=1e-5)
    assert torch.equal(mine[:, 0], enc.cls)  # the CLS leads, then dominant patches in raster order
    assert comp.tokens_out(enc.features.shape[1]) == dominant + contextual


def test_contextual_merge_matches_loop():
    g = torch.Generator().manual_seed(0)
    h, metric = torch.randn(2, 11, 4, generator=g), torch.randn(2, 11, 3, generator=g)
    out = contextual_merge(h, metric, 3)  # step 11 // 3 = 3: targets 0, 3, 6
    for b in range(2):
        tg = [0, 3, 6]
        groups = {t: [] for t in tg}
        for j in range(11):
            if j not in tg:
                sims = [float(F.cosine_similarity(metric[b, j], metric[b, t], dim=0)) for t in tg]
                groups[tg[max(range(3), key=lambda i: sims[i])]].append(j)
        for i, t in enumerate(tg):
            mean = torch.stack([h[b, j] for j in groups[t]]).mean(0) if groups[t] else torch.zeros(4)
            assert torch.allclose(out[b, i], h[b, t] + mean, atol=1e-6)


def test_paper_settings_checks_and_counts():
    for d, c in [(54, 10), (108, 20), (162, 30)]:
        comp = VisionZip(d, c)
        comp.check(CLIP_L, 32)
        comp.setup(CLIP_L, 4096)
        assert comp.tokens_out(576) == d + c and comp.extra_layers == (22,)
    assert VisionZip().get_knobs() == {"dominant": 54, "contextual": 10}
    with pytest.raises(ConfigError, match="CLS") as e:
        VisionZip().check(SIGLIP, 32)
    assert e.value.key == "compressor"
    with pytest.raises(ConfigError) as e:
        tiny_lmm(VisionZip())  # 54 + 10 > 16 patches
    assert e.value.key == "compressor.dominant"
    assert comp.own_flops(576) == 2.0 * (2 * 577 * 1024**2 + 1024**2 + 577 * 1024)  # after setup (width)


def test_same_seed_batch_independence_training_generation():
    b = toy_batch()
    m1, m2 = tiny_lmm(VisionZip(6, 3), seed=5), tiny_lmm(VisionZip(6, 3), seed=5)
    vis = m1.encode_images(b["pixel_values"])
    assert torch.equal(vis, m2.encode_images(b["pixel_values"]))
    assert torch.equal(m1(b).loss, m2(b).loss)
    full, seen = m1.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    assert seen[:, 0].tolist() == [9, 9, 9]
    for i in range(3):
        s = single(b, i)
        if len(s["pixel_values"]):
            assert torch.allclose(m1.encode_images(s["pixel_values"])[0], vis[int(b["image_index"][i])], atol=1e-5)
        assert m1.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0][0] == full[i]
    m1.train()
    m1(b).loss.backward()
    for name in ("projector", "llm"):
        for p in getattr(m1, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
