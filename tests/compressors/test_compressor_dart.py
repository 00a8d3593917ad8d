"""DART (vtc.compressors.dart) against an independent computation: keys and normalised inputs of
layer K captured from a plain HF forward (hooks), RoPE from the model's own rotary embedding, and
the pivot / least-similar selection rewritten with Python sets; the exact budget; batch
independence; cached generation; training."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from vtc.compressors.dart import DART, dart_select
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def spy(comp):
    seen = {}
    orig = comp.compress

    def wrapped(state, i, layer):
        out = orig(state, i, layer)
        seen["in"], seen["out"] = state, out
        return out

    comp.compress = wrapped
    return seen


def reference_keep(model, s, K, ratio, p_img, p_txt) -> set[int]:
    """Independent DART on one unpadded sample: returns the kept image token indices."""
    st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
    layer = model.llm.layers[K]
    cap = {}
    h1 = layer.input_layernorm.register_forward_hook(lambda m, a, o: cap.setdefault("x", o))
    h2 = layer.self_attn.k_proj.register_forward_hook(lambda m, a, o: cap.setdefault("k", o))
    try:
        model.llm.model(inputs_embeds=st.hidden)
    finally:
        h1.remove()
        h2.remove()
    x, k = cap["x"][0], cap["k"]
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
        quota = budget // len(pivots) + (1 if j < budget % len(pivots) else 0)
        sims = {t: float(F.cosine_similarity(x[p], x[t], dim=0)) for t in left}
        take = sorted(left, key=lambda t: sims[t])[:quota]
        kept |= set(take)
        left = [t for t in left if t not in take]
    assert len(kept) == n_keep
    return kept


@pytest.mark.parametrize("ratio,p_img,p_txt", [(0.25, 4, 4), (0.5, 2, 4)])
def test_kept_tokens_match_independent_computation(ratio, p_img, p_txt):
    comp = DART(layer=2, ratio=ratio, pivot_image=p_img, pivot_text=p_txt)
    model = tiny_lmm(comp)
    with torch.no_grad():  # a trained norm weight, so that "which features" matters for the cosine
        model.llm.layers[2].input_layernorm.weight.uniform_(0.2, 2.0)
    rec = spy(comp)
    b = toy_batch()
    model(b)
    out, inp = rec["out"], rec["in"]
    for i in range(3):
        expect = reference_keep(model, single(b, i), 2, ratio, p_img, p_txt)
        m = int(out.lengths[i])
        kept = out.position_ids[i, :m][out.visual_mask[i, :m]].tolist()  # positions = indices alone
        assert set(kept) == expect and kept == sorted(kept)
        n = int(inp.lengths[i])
        text = ~inp.visual_mask[i, :n]
        assert torch.equal(out.position_ids[i, :m][~out.visual_mask[i, :m]], inp.position_ids[i, :n][text])
        assert torch.equal(out.hidden[i, :m][~out.visual_mask[i, :m]], inp.hidden[i, :n][text])
    n_keep = 16 - int(16 * ratio)
    assert out.visual_counts().tolist() == [n_keep, n_keep, 0]


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
                    (dict(pivot_image=0), "compressor.pivot_image")]:
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
        cur, q0, ref = s["input_ids"], None, []
        for _ in range(4):
            st = model.build_sequence(cur, torch.ones_like(cur), None, s["pixel_values"], s["image_index"])
            q0 = int(st.query_index[0]) if q0 is None else q0
            o, _, _ = model.llm.run_layers(replace(st, query_index=torch.tensor([q0])), model.compressor)
            t = int(model.next_token(model.llm.logits(o.hidden[0, -1])))
            if t == model.eos_token_id:
                break
            ref.append(t)
            cur = torch.cat([cur, torch.tensor([[t]])], 1)
        assert tokens[i] == ref


def test_same_seed_same_output_and_training_gradients():
    b = toy_batch()
    assert torch.equal(tiny_lmm(DART(1, 0.5), seed=5)(b).loss, tiny_lmm(DART(1, 0.5), seed=5)(b).loss)
    model = tiny_lmm(DART(1, 0.5)).train()
    model(b).loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
