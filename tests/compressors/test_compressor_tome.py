"""ToMe (vtc.compressors.tome) against independent computations: one bipartite merge step against
a per-token loop (sizes, size-weighted means, order), the CLS never merged, SDPA with the log-size
mask against an eager softmax with the bias, the whole merged encoder against a hand-written
reference ViT pass, counts/schedules, batch independence, determinism, training, generation."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from vtc.compressors.tome import ToMe, bipartite_merge, merge_schedule
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_encoder, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def loop_merge(x, size, metric, r, protect_first):
    """Independent transcription of one ToMe step for one sample (lists, explicit loops)."""
    T = len(x)
    A, Bs = list(range(0, T, 2)), list(range(1, T, 2))
    cos = lambda i, j: float(F.cosine_similarity(metric[i], metric[j], dim=0))
    best = {}
    for a in A:
        sims = [cos(a, b) for b in Bs]
        j = max(range(len(Bs)), key=lambda t: sims[t])
        best[a] = (sims[j] if not (protect_first and a == 0) else -math.inf, Bs[j])
    order = sorted(A, key=lambda a: -best[a][0])
    merged = set(order[:r])
    groups = {b: [b] for b in Bs}
    for a in merged:
        groups[best[a][1]].append(a)
    out_x, out_s = [], []
    for a in sorted(set(A) - merged):
        out_x.append(x[a])
        out_s.append(size[a])
    for b in Bs:
        s = sum(float(size[t]) for t in groups[b])
        out_x.append(sum(float(size[t]) * x[t] for t in groups[b]) / s)
        out_s.append(torch.tensor([s]))
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("T,r", [(9, 3), (10, 4), (7, 1)])
def test_one_merge_step_matches_loop(protect, T, r):
    g = torch.Generator().manual_seed(T * 10 + r)
    B, C = 2, 5
    x = torch.randn(B, T, C, generator=g)
    metric = torch.randn(B, T, 4, generator=g)
    size = torch.randint(1, 5, (B, T, 1), generator=g).float()
    nx, ns = bipartite_merge(x, size, metric, r, protect)
    assert nx.shape == (B, T - r, C) and ns.shape == (B, T - r, 1)
    for b in range(B):
        ex, es = loop_merge(x[b], size[b], metric[b], r, protect)
        assert torch.allclose(nx[b], ex, atol=1e-6)
        assert torch.equal(ns[b], es)
    assert torch.equal(ns.sum(1), size.sum(1))  # every patch is still counted once


def test_cls_is_never_merged_even_when_most_similar():
    torch.manual_seed(0)
    x = torch.randn(1, 9, 3)
    metric = torch.randn(1, 9, 4)
    metric[0, 0] = metric[0, 1]  # CLS identical to a B token: the best edge of all
    nx, ns = bipartite_merge(x, torch.ones(1, 9, 1), metric, 4, protect_first=True)
    assert torch.equal(nx[0, 0], x[0, 0]) and float(ns[0, 0]) == 1
    nx, ns = bipartite_merge(x, torch.ones(1, 9, 1), metric, 4, protect_first=False)
    # unprotected, token 0 (its best edge) merges into token 1, B's first, now the 5th output
    assert float(ns[0, 0]) == 1 and not torch.equal(nx[0, 0], x[0, 0]) and float(ns[0, -4]) >= 2


def test_cap_is_half_of_the_unprotected_tokens():
    x = torch.randn(1, 5, 2)
    nx, _ = bipartite_merge(x, torch.ones(1, 5, 1), torch.randn(1, 5, 3), 10, protect_first=True)
    assert nx.shape[1] == 3  # (5 - 1) // 2 = 2 merged


def test_proportional_attention_is_sdpa_with_log_size_mask():
    """HF CLIP attention (SDPA) given the float mask [B,1,1,T] = log(size) equals an eager
    softmax(q kᵀ/√d + log s) v written out here."""
    enc = tiny_encoder()
    attn = enc.layers[0].self_attn
    assert enc.model.config._attn_implementation == "sdpa"
    torch.manual_seed(1)
    x = torch.randn(2, 11, 32)
    size = torch.randint(1, 6, (2, 11, 1)).float()
    mask = size.log().transpose(1, 2)[:, None]
    got, _ = attn(hidden_states=x, attention_mask=mask)
    H, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(2, 11, H, d).transpose(1, 2)
    k = attn.k_proj(x).view(2, 11, H, d).transpose(1, 2)
    v = attn.v_proj(x).view(2, 11, H, d).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) / math.sqrt(d) + size.log().view(2, 1, 1, 11)).softmax(-1)
    ref = attn.out_proj((w @ v).transpose(1, 2).reshape(2, 11, 32))
    assert torch.allclose(got, ref, atol=1e-5)
    plain, _ = attn(hidden_states=x, attention_mask=None)
    assert not torch.allclose(plain, ref, atol=1e-3)  # the bias matters


def reference_encoder(enc, pixel_values, schedule, prop_attn=True):
    """A hand-written ToMe ViT pass (eager attention with the size bias, loop merges per sample)."""
    layers = enc.layers
    h = enc.embed(pixel_values)
    outs = []
    for b in range(h.shape[0]):
        x = h[b]
        size = torch.ones(len(x), 1)
        for i, r in enumerate(schedule):
            L = layers[i]
            a = L.self_attn
            T = len(x)
            y = L.layer_norm1(x)
            q = a.q_proj(y).view(T, a.num_heads, a.head_dim).transpose(0, 1)
            k = a.k_proj(y).view(T, a.num_heads, a.head_dim).transpose(0, 1)
            v = a.v_proj(y).view(T, a.num_heads, a.head_dim).transpose(0, 1)
            logits = q @ k.transpose(-1, -2) * a.head_dim ** -0.5
            if prop_attn:
                logits = logits + size.log().view(1, 1, T)
            x = x + a.out_proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(T, -1))
            if r:
                x, size = loop_merge(x, size, k.mean(0), r, protect_first=True)
            x = x + L.mlp(L.layer_norm2(x))
        outs.append(x)
    return torch.stack(outs), size


@pytest.mark.parametrize("prop_attn", [True, False])
def test_encoder_pass_matches_reference(prop_attn):
    comp = ToMe(r=3, prop_attn=prop_attn)
    model = tiny_lmm(comp)
    pv = toy_batch()["pixel_values"]
    with torch.no_grad():
        enc = model.encoder(pv, vision_compressor=comp)
        ref, size = reference_encoder(model.encoder, pv, comp.schedule_for(model.encoder.info), prop_attn)
    assert comp.schedule_for(model.encoder.info) == [3, 3]
    assert enc.grid is None and enc.features.shape == (2, 10, 32) and comp.tokens_out(16) == 10
    assert torch.allclose(enc.features, ref[:, 1:], atol=1e-5)
    assert torch.allclose(enc.cls, ref[:, 0], atol=1e-5)
    assert torch.all(comp.last_sizes[:, 0] == 1)  # CLS stands for itself alone
    assert torch.all(comp.last_sizes.sum(1) == 17)


def test_start_block_and_no_merge_equals_plain_encoder():
    model = tiny_lmm(ToMe(r=0))
    pv = toy_batch()["pixel_values"]
    with torch.no_grad():
        assert torch.equal(model.encoder(pv, vision_compressor=model.compressor).features, model.encoder(pv).features)
    comp = ToMe(r=3, start=1)
    model = tiny_lmm(comp)
    assert comp.schedule_for(model.encoder.info) == [0, 3] and comp.encoder_tokens_per_layer(16) == [17, 17]
    with torch.no_grad():
        enc = model.encoder(pv, vision_compressor=comp)
        ref, _ = reference_encoder(model.encoder, pv, [0, 3])
    assert torch.allclose(enc.features, ref[:, 1:], atol=1e-5)


def test_schedules_and_counts():
    assert merge_schedule(577, 1, 23, 8, None) == [8] * 23
    assert merge_schedule(17, 1, 2, 10, None) == [8, 4]  # capped at half the unprotected tokens
    sched = merge_schedule(577, 1, 23, None, 64)
    assert sum(sched) == 576 - 64 and max(sched) - min(sched) <= 1
    with pytest.raises(ValueError):
        merge_schedule(17, 1, 2, None, 1)  # 16 -> 8 -> 4 at best
    comp = ToMe()
    comp.check(CLIP_L, 32)
    comp.setup(CLIP_L, 4096)
    assert comp.tokens_out(576) == 576 - 23 * 8  # r = 8 over the 23 blocks run for layer -2
    assert comp.encoder_tokens_per_layer(576)[:3] == [577, 569, 561]
    comp.set_knobs(tokens=144)
    assert comp.tokens_out(576) == 144
    with pytest.raises(ConfigError) as e:
        ToMe(r=None, tokens=2).check(replace(CLIP_L, num_layers=3), 32)
    assert e.value.key == "compressor.tokens"
    with pytest.raises(ConfigError):
        ToMe(start=30).check(CLIP_L, 32)


def test_target_tokens_reached_in_the_model():
    model = tiny_lmm(ToMe(r=None, tokens=5))
    vis = model.encode_images(toy_batch()["pixel_values"])
    assert vis.shape == (2, 5, 32)
    assert model(toy_batch()).visual_in.tolist() == [5, 5, 0]


def test_siglip_without_cls_merges_all_tokens():
    comp = ToMe(r=3)
    model = tiny_lmm(comp, kind="siglip")
    with torch.no_grad():
        enc = model.encoder(toy_batch()["pixel_values"], vision_compressor=comp)
    assert enc.features.shape == (2, 16 - 6, 32) and comp.tokens_out(16) == 10


def test_same_seed_batch_independence_training_generation():
    b = toy_batch()
    m1, m2 = tiny_lmm(ToMe(r=3), seed=3), tiny_lmm(ToMe(r=3), seed=3)
    assert torch.equal(m1.encode_images(b["pixel_values"]), m2.encode_images(b["pixel_values"]))
    assert torch.equal(m1(b).loss, m2(b).loss)
    full_vis = m1.encode_images(b["pixel_values"])
    full, seen = m1.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 3)
    assert seen[:, 0].tolist() == [10, 10, 10]
    for i in range(3):
        s = single(b, i)
        if len(s["pixel_values"]):
            assert torch.allclose(m1.encode_images(s["pixel_values"])[0], full_vis[int(b["image_index"][i])], atol=1e-5)
        alone = m1.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 3)[0]
        assert alone[0] == full[i]
    m1.train()
    m1(b).loss.backward()
    for name in ("projector", "llm"):
        for p in getattr(m1, name).parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()


def test_flops_count_the_merged_encoder():
    """The accounting charges each encoder block for what it ran: attention on the tokens before
    its merge, MLP on the tokens after (vit layer: 4nd^2 + 2n^2d + 2 n_mlp d m MACs), and the
    projector on what leaves the tower; written out here independently of vtc.cost.flops."""
    from vtc.cost.accounting import batch_flops, model_shape

    comp = ToMe(r=3)
    model = tiny_lmm(comp)
    info = model.encoder.info
    shape = model_shape(model)
    n = info.num_patches
    blocks = comp.encoder_tokens(n)
    assert [a - b for a, b in blocks] == comp.schedule_for(info)
    d, m = shape.vision_d, shape.vision_m
    t, expect = n + 1, 0
    for r in comp.schedule_for(info):
        expect += 2 * (4 * t * d * d + 2 * t * t * d + 2 * (t - r) * d * m)
        t -= r
    lengths, vis = torch.tensor([30]), torch.tensor([comp.tokens_out(n)])
    seen = torch.full((shape.llm_layers, 1), int(vis[0]))
    plain = batch_flops(shape, lengths, vis, seen, torch.tensor([2]), projector_tokens=vis)
    merged = batch_flops(shape, lengths, vis, seen, torch.tensor([2]), projector_tokens=vis,
                         vision_tokens_per_layer=blocks)
    full_vision = 2 * shape.vision_layers * (4 * (n + 1) * d * d + 2 * (n + 1) ** 2 * d + 2 * (n + 1) * d * m)
    assert plain - merged == full_vision - expect > 0
