"""DART (vtc.compressors.dart) against an independent computation: keys and normalised inputs of
layer K captured from a plain HF forward (hooks), RoPE from the model's own rotary embedding, and
the pivot / least-similar selection rewritten with Python sets; the exact budget; batch
independence; cached generation; training."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vtc.compressors.dart import DART, dart_select
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import greedy_by_recompute, single, spy, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def reference_keep(model, s, K, ratio, p_img, p_txt, score_at="previous", budget_rule="exact") -> set[int]:
    """Independent DART on one unpadded sample: returns the kept image token indices. Keys are
    captured from k_proj in a plain HF forward (layer K-1's for score_at=previous, K's for
    current) with RoPE from the model's own rotary embedding; features are layer K's input through
    the final norm (previous) or layer K's input_layernorm output (current)."""
    st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
    previous = score_at == "previous" and K > 0
    layer = model.llm.layers[K]
    key_layer = model.llm.layers[K - 1] if previous else layer
    cap = {}
    hooks = [key_layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: cap.setdefault("k", o))]
    if previous:
        def grab_input(module, args, kwargs):
            cap.setdefault("h", args[0] if args else kwargs["hidden_states"])

        hooks.append(layer.register_forward_pre_hook(grab_input, with_kwargs=True))
    else:
        hooks.append(layer.input_layernorm.register_forward_hook(lambda m, a, o: cap.setdefault("x", o)))
    try:
        model.llm.model(inputs_embeds=st.hidden)
    finally:
        for h in hooks:
            h.remove()
    x = model.llm.decoder.norm(cap["h"])[0] if previous else cap["x"][0]
    k = cap["k"]
    T = x.shape[0]
    hd = layer.self_attn.head_dim
    k = k.view(1, T, -1, hd).transpose(1, 2)
    cos, sin = model.llm.decoder.rotary_emb(k, torch.arange(T)[None])
    k, _ = apply_rotary_pos_emb(k, k, cos, sin)
    norm = [float(k[0, :, t].abs().sum()) for t in range(T)]
    image = [t for t in range(T) if st.visual_mask[0, t]]
    if not image:
        return set()
    q = int(st.query_index[0])
    text = [t for t in range(image[-1] + 1, q + 1)]
    n_keep = len(image) - int(ratio * len(image) + 1e-9)
    img_piv = sorted(image, key=lambda t: -norm[t])[:p_img]
    txt_piv = sorted(text, key=lambda t: -norm[t])[:p_txt]
    pivots = img_piv + txt_piv
    budget = n_keep - len(img_piv)
    kept, left = set(img_piv), [t for t in image if t not in img_piv]
    for j, p in enumerate(pivots):
        if budget_rule == "released":  # their scripts: every pivot takes budget // (p_img + p_txt)
            quota = n_keep // (p_img + p_txt)
        else:
            quota = budget // len(pivots) + (1 if j < budget % len(pivots) else 0)
        sims = {t: float(F.cosine_similarity(x[p], x[t], dim=0)) for t in left}
        take = sorted(left, key=lambda t: sims[t])[:quota]
        kept |= set(take)
        left = [t for t in left if t not in take]
    if budget_rule == "exact":
        assert len(kept) == n_keep
    return kept


@pytest.mark.parametrize("ratio,p_img,p_txt,score_at,rule", [(0.25, 4, 4, "previous", "exact"),
                                                              (0.5, 2, 4, "previous", "exact"),
                                                              (0.5, 2, 4, "current", "exact"),
                                                              (0.5, 2, 2, "previous", "released")])
def test_kept_tokens_match_independent_computation(ratio, p_img, p_txt, score_at, rule):
    comp = DART(layer=2, ratio=ratio, pivot_image=p_img, pivot_text=p_txt, score_at=score_at, budget_rule=rule)
    model = tiny_lmm(comp)
    with torch.no_grad():  # trained norm weights, so that "which features" matters for the cosine
        model.llm.layers[2].input_layernorm.weight.uniform_(0.2, 2.0)
        model.llm.decoder.norm.weight.uniform_(0.2, 2.0)
    rec = spy(comp)
    b = toy_batch()
    model(b)
    out, inp = rec["out"], rec["in"]
    for i in range(3):
        expect = reference_keep(model, single(b, i), 2, ratio, p_img, p_txt, score_at, rule)
        m = int(out.lengths[i])
        kept = out.position_ids[i, :m][out.visual_mask[i, :m]].tolist()  # positions = indices alone
        assert set(kept) == expect and kept == sorted(kept)
        n = int(inp.lengths[i])
        text = ~inp.visual_mask[i, :n]
        assert torch.equal(out.position_ids[i, :m][~out.visual_mask[i, :m]], inp.position_ids[i, :n][text])
        assert torch.equal(out.hidden[i, :m][~out.visual_mask[i, :m]], inp.hidden[i, :n][text])
    n_keep = comp.kept(16)
    counts = out.visual_counts().tolist()
    assert counts[2] == 0 and (counts[:2] == [n_keep, n_keep] or rule == "released")
    assert n_keep == (16 - int(16 * ratio) if rule == "exact" else 2 + (8 // 4) * 4)


def test_released_budget_rule_keeps_their_counts():
    """Their scripts keep 4 + 8·(budget // 8): 68 / 132 / 196 for 64 / 128 / 192 of 576."""
    for budget, kept in [(64, 68), (128, 132), (192, 196)]:
        comp = DART(ratio=1 - budget / 576, budget_rule="released")
        assert comp.kept(576) == kept and comp.tokens_per_layer(576, 32)[2] == kept
    torch.manual_seed(0)
    T = 600
    feats = F.normalize(torch.randn(T, 16), dim=-1)
    image, text = torch.arange(10, 586), torch.arange(586, 600)
    kept = dart_select(feats, torch.rand(T), image, text, n_keep=128, budget_rule="released")
    assert len(kept) == len(set(kept.tolist())) == 132


def test_select_takes_the_least_similar_tokens():
    # Unit vectors at angles; pivot (largest key norm) at 0 degrees. The least similar to it are
    # those nearest 180 degrees.
    ang = torch.tensor([0.0, 10, 170, 180, 90, 200, 30]) * torch.pi / 180
    feats = torch.stack([ang.cos(), ang.sin()], 1)
    key_norm = torch.tensor([9.0, 1, 1, 1, 1, 1, 1])
    image = torch.arange(7)
    kept = dart_select(feats, key_norm, image, image[:0], n_keep=3, pivot_image=1, pivot_text=0)
    assert sorted(kept.tolist()) == [0, 2, 3]  # pivot, 170 and 180 degrees (cos -0.985, -1; 200: -0.940)


def test_real_size_budget_is_exact():
    torch.manual_seed(0)
    T = 600
    feats = F.normalize(torch.randn(T, 16), dim=-1)
    image, text = torch.arange(10, 586), torch.arange(586, 600)
    kept = dart_select(feats, torch.rand(T), image, text, n_keep=576 - int(0.778 * 576))
    assert len(kept) == 128 and len(set(kept.tolist())) == 128
    assert all(10 <= t < 586 for t in kept.tolist())
    assert DART().tokens_per_layer(576, 32) == [576] * 2 + [128] * 30


def test_check_and_knobs():
    DART().check(CLIP_L, 32)
    for kw, key in [(dict(ratio=1.0), "compressor.ratio"), (dict(layer=40), "compressor.layer"),
                    (dict(pivot_image=0), "compressor.pivot_image"), (dict(score_at="next"), "compressor.score_at"),
                    (dict(budget_rule="paper"), "compressor.budget_rule")]:
        with pytest.raises(ConfigError) as e:
            DART(**kw).check(CLIP_L, 32)
        assert e.value.key == key
    comp = DART()
    comp.set_knobs(ratio=0.5)
    assert comp.get_knobs() == {"layer": 2, "ratio": 0.5}


def test_batch_equals_each_sample_alone_and_generation_matches_recompute():
    comp = DART(layer=1, ratio=0.5, pivot_image=2, pivot_text=2)
    model = tiny_lmm(comp)
    rec = spy(comp)
    b = toy_batch()
    model(b)
    out = rec["out"]
    for i in range(3):
        model(single(b, i))
        alone = rec["out"]
        n = int(alone.lengths[0])
        assert torch.equal(out.position_ids[i, :n], alone.position_ids[0, :n]) and int(out.lengths[i]) == n
        assert torch.allclose(out.hidden[i, :n], alone.hidden[0, :n], atol=1e-5)
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 4)
    assert seen[:, 0].tolist() == [16, 8, 8]
    for i in range(3):
        s = single(b, i)
        assert tokens[i] == greedy_by_recompute(model, s, 4)


def test_same_seed_same_output_and_training_gradients():
    b = toy_batch()
    assert torch.equal(tiny_lmm(DART(1, 0.5), seed=5)(b).loss, tiny_lmm(DART(1, 0.5), seed=5)(b).loss)
    model = tiny_lmm(DART(1, 0.5)).train()
    model(b).loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_scoring_flops_are_counted_per_image():
    comp = DART(layer=2, ratio=0.778)
    comp.setup(CLIP_L, 4096)
    assert comp.own_flops(576) == 2 * 576 * 4096 ** 2 + 2 * 8 * 576 * 4096
    model = tiny_lmm(DART(1, 0.5))
    assert model.pipeline.own_flops(16) == 2 * 16 * 32 ** 2 + 2 * 8 * 16 * 32
    comp.set_knobs(layer=None)
    assert comp.own_flops(576) == 0


def test_an_image_query_token_is_kept_within_the_budget():
    from tests.compressors.test_compressor_fastv import plain_batch

    comp = DART(1, 0.9, pivot_image=1, pivot_text=1)
    rec = spy(comp)
    out = tiny_lmm(comp)(plain_batch())
    st = rec["out"]
    assert out.seen[1].tolist() == [2, 2] and bool(st.visual_mask[0, st.query_index[0]]) and torch.isfinite(out.loss)
