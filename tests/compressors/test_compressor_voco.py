"""VoCo-LLaMA (vtc.compressors.voco) against independent computations: HF's eager model with an
explicit 4-D mask built here; a two-pass run whose text attends to a cache holding no visual entry;
batch = each sample alone; cached (dropped or masked) generation = a full recompute; training;
what the config check and the checkpoint loader refuse."""
import copy

import pytest
import torch
import torch.nn.functional as F

from vtc.compressors.voco import VoCo
from vtc.data.batch import IGNORE_INDEX
from vtc.errors import ConfigError
from vtc.lmm import drop_masked_keys
from vtc.model.encoder import EncoderInfo
from vtc.model.llm import cache_keyword
from tests.tiny import IMG, single, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)
M = 2  # VoCo tokens in most tests (1 would hide a per-token mistake behind the shared embedding)


def plain_batch() -> dict:
    """The plain template: the caption follows the image directly (the last visual token's target
    is the caption's first token); the second sample is padded."""
    ids = torch.tensor([[1, IMG, 5, 6, 7], [1, IMG, 8, 9, 0]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2:5], labels[1, 2:4] = ids[0, 2:5], ids[1, 2:4]
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels,
                pixel_values=torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3)),
                image_index=torch.tensor([0, 1]))


def batches():
    return {"toy": toy_batch(), "plain": plain_batch()}


@pytest.fixture(scope="module", params=[True, False], ids=["shared", "distinct"])
def model(request):
    return tiny_lmm(VoCo(tokens=M, shared=request.param), seed=1)


def reference_sample(model, s: dict):
    """One sample, built here: embeddings [before, visual, VoCo x m, after] with positions 0..L-1,
    shifted targets with the VoCo tokens inserted (the last visual token's target moved to the last
    VoCo token), and the allowed-attention matrix [L, L] (causal; after the VoCo tokens, not the
    visual ones)."""
    st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
    h, t = st.hidden[0], st.targets[0]
    vis = st.visual_mask[0].nonzero().squeeze(1).tolist()
    if not vis:
        L = len(h)
        return h, t, torch.ones(L, L).tril().bool(), None
    a, z = vis[0], vis[-1] + 1
    voco = model.compressor.embeddings.detach().expand(M, -1)
    emb = torch.cat([h[:a], h[a:z], voco, h[z:]])
    ignore = torch.full((M,), IGNORE_INDEX)
    tgt = torch.cat([t[:z - 1], torch.tensor([IGNORE_INDEX]), ignore[:-1], t[z - 1:z], t[z:]])
    L = len(emb)
    allowed = torch.ones(L, L).tril().bool()
    allowed[z + M:, a:z] = False
    return emb, tgt, allowed, (a, z)


def eager_hidden(eager, emb, allowed):
    mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None]
    pos = torch.arange(len(emb))[None]
    return eager.model(inputs_embeds=emb[None], position_ids=pos, attention_mask=mask).last_hidden_state[0]


def vtc_final(model, b: dict):
    st = model.build_sequence(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_index"])
    out, seen, _ = model.llm.run_layers(st, model.compressor)
    return out, torch.stack(seen)


@pytest.mark.parametrize("name", ["toy", "plain"])
def test_hidden_states_and_loss_match_eager_with_an_explicit_mask(model, name):
    b = batches()[name]
    eager = copy.deepcopy(model.llm.model)
    eager.set_attn_implementation("eager")
    out, _ = vtc_final(model, b)
    loss = model(b).loss
    ce, n_t = 0.0, 0
    with torch.no_grad():
        for i in range(b["input_ids"].shape[0]):
            emb, tgt, allowed, _ = reference_sample(model, single(b, i))
            ref = eager_hidden(eager, emb, allowed)
            L = len(emb)
            assert int(out.lengths[i]) == L
            assert torch.allclose(out.hidden[i, :L], ref, atol=1e-5)
            assert torch.equal(out.targets[i, :L], tgt)
            assert torch.equal(out.position_ids[i, :L], torch.arange(L))
            valid = tgt != IGNORE_INDEX
            ce += F.cross_entropy(model.llm.logits(ref[valid]), tgt[valid], reduction="sum")
            n_t += int(valid.sum())
    assert loss.item() == pytest.approx((ce / n_t).item(), abs=1e-5)
    # The mask matters: the plain causal mask over the same sequence gives other text states.
    emb, _, allowed, (_, z) = reference_sample(model, single(b, 0))
    with torch.no_grad():
        causal = eager_hidden(eager, emb, torch.ones_like(allowed).tril())
    assert not torch.allclose(causal[z + M:], out.hidden[0, z + M:len(emb)], atol=1e-3)
    assert torch.allclose(causal[:z + M], out.hidden[0, :z + M], atol=1e-5)  # before the text: causal


def two_pass_text(model, emb, span, voco_kv_from=None):
    """Pass A: [before, visual, VoCo] causal with a cache. Pass B: the text after, attending to a
    cache of [before, VoCo] only (sliced from pass A; the VoCo entries optionally from another
    pass A). Returns (the text's final hidden states, the VoCo tokens' final hidden states)."""
    from transformers import DynamicCache

    a, z = span
    hf = model.llm.model.model
    kw = cache_keyword(type(hf).forward)
    A = DynamicCache(config=model.llm.config)
    head = emb[:z + M]
    out_a = hf(inputs_embeds=head[None], position_ids=torch.arange(z + M)[None], use_cache=True, **{kw: A})
    src = voco_kv_from if voco_kv_from is not None else A
    B = DynamicCache(config=model.llm.config)
    for i in range(model.llm.num_layers):
        k = torch.cat([A.layers[i].keys[:, :, :a], src.layers[i].keys[:, :, z:z + M]], 2)
        v = torch.cat([A.layers[i].values[:, :, :a], src.layers[i].values[:, :, z:z + M]], 2)
        B.update(k, v, i)
    text = emb[z + M:]
    pos = torch.arange(z + M, len(emb))[None]
    out_b = hf(inputs_embeds=text[None], position_ids=pos, attention_mask=torch.ones(1, a + M + len(text)),
               use_cache=True, **{kw: B})
    return out_b.last_hidden_state[0], out_a.last_hidden_state[0, z:z + M], A


@torch.no_grad()
def test_text_sees_the_image_only_through_the_voco_cache(model):
    s = single(toy_batch(), 0)  # [1, 5] + image + [6, 7, 8, 9]: text before and after
    emb, _, _, span = reference_sample(model, s)
    a, z = span
    out, _ = vtc_final(model, s)
    text, voco, cache_a = two_pass_text(model, emb, span)
    assert torch.allclose(out.hidden[0, z + M:], text, atol=1e-5)
    assert torch.allclose(out.hidden[0, z:z + M], voco, atol=1e-5)
    # Noise for the image: the VoCo states change, and the text through them ...
    noisy = emb.clone()
    noisy[a:z] = torch.randn(z - a, emb.shape[1], generator=torch.Generator().manual_seed(5))
    text_n, voco_n, _ = two_pass_text(model, noisy, span)
    assert not torch.allclose(voco_n, voco, atol=1e-3) and not torch.allclose(text_n, text, atol=1e-3)
    st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
    st.hidden[0, a:z] = noisy[a:z]
    out_n, _, _ = model.llm.run_layers(st, model.compressor)
    assert torch.allclose(out_n.hidden[0, z + M:], text_n, atol=1e-5)
    # ... only through them: the noisy image with the original VoCo keys/values gives the original text.
    text_swapped, _, _ = two_pass_text(model, noisy, span, voco_kv_from=cache_a)
    assert torch.allclose(text_swapped, text, atol=1e-5)


def test_batch_equals_each_sample_alone(model):
    b = toy_batch()
    with torch.no_grad():
        out, seen = vtc_final(model, b)
        for i in range(3):
            alone, seen1 = vtc_final(model, single(b, i))
            n = int(alone.lengths[0])
            assert int(out.lengths[i]) == n
            assert torch.equal(out.position_ids[i, :n], alone.position_ids[0])
            assert torch.allclose(out.hidden[i, :n], alone.hidden[0], atol=1e-5)
            assert torch.equal(seen[:, i], seen1[:, 0])
    assert seen[:, 0].tolist() == [16 + M] * 3 and seen[:, 2].tolist() == [0] * 3  # text only: no VoCo
    assert VoCo(M).tokens_per_layer(16, 3) == [16 + M] * 3 and VoCo(M).tokens_per_layer(0, 3) == [0] * 3
    tokens, _ = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 5)
    for i in range(3):
        s = single(b, i)
        assert model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 5)[0][0] \
            == tokens[i]


@pytest.mark.parametrize("drop", [True, False], ids=["dropped", "masked"])
def test_cached_generation_matches_full_recompute(drop):
    model = tiny_lmm(VoCo(tokens=M, drop_cache=drop), seed=2)
    b = toy_batch()
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 5)
    assert seen[0].tolist() == [16 + M, 16 + M, 0]  # layer 0, per sample
    for i in range(3):
        s = single(b, i)
        cur, ref = s["input_ids"], []
        for _ in range(5):
            st = model.build_sequence(cur, torch.ones_like(cur), None, s["pixel_values"], s["image_index"])
            o, _, _ = model.llm.run_layers(st, model.compressor)  # no cache: the whole sequence again
            t = int(model.next_token(model.llm.logits(o.hidden[0, -1])))
            if t == model.eos_token_id:
                break
            ref.append(t)
            cur = torch.cat([cur, torch.tensor([[t]])], 1)
        assert tokens[i] == ref


@torch.no_grad()
def test_dropping_the_visual_cache_keeps_every_decode_step():
    """After prefill the cache holds the prompt less its visual tokens (and padding); one decode
    step over it gives the logits of the masked full cache."""
    from transformers import DynamicCache

    from vtc.model.sequence import SeqState

    model = tiny_lmm(VoCo(tokens=M), seed=3)
    b = toy_batch()
    st = model.build_sequence(b["input_ids"], b["attention_mask"], None, b["pixel_values"], b["image_index"])
    logits = []
    for drop in (False, True):
        cache = DynamicCache(config=model.llm.config)
        out, _, masks = model.llm.run_layers(st, model.compressor, cache=cache)
        full = [layer.keys.clone() for layer in cache.layers]
        if drop:
            lengths = out.lengths
            masks = drop_masked_keys(cache, masks)
            kept = masks[0].sum(1)
            assert kept.tolist() == (lengths - torch.tensor([16, 16, 0])).tolist() == [6 + M, 3 + M, 4]
            assert cache.layers[0].keys.shape[2] == int(kept.max())
            for layer, keys in zip(cache.layers, full):  # the kept entries, in order: text and VoCo
                hide = out.visual_mask & out.attention_mask.bool()
                hide[0, 18:20] = hide[1, 17:19] = False  # the VoCo tokens stay
                for r in range(3):
                    want = keys[r][:, (out.attention_mask[r].bool() & ~hide[r])]
                    assert torch.equal(layer.keys[r, :, :int(kept[r])], want)
        B = 3
        rows = torch.arange(B)
        step = SeqState(hidden=model.llm.embed(torch.tensor([[5], [6], [7]])), attention_mask=torch.ones(B, 1).long(),
                        position_ids=(out.position_ids[rows, out.lengths - 1] + 1)[:, None],
                        visual_mask=torch.zeros(B, 1, dtype=torch.bool), targets=None,
                        query_index=torch.zeros(B, dtype=torch.long))
        o, _, _ = model.llm.run_layers(step, model.compressor, cache=cache, past_mask=masks)
        logits.append(model.llm.logits(o.hidden[:, -1]))
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    a = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 6)
    model.compressor.drop_cache = False
    assert model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 6)[0] == a[0]


def test_positions_and_targets_after_the_voco_tokens():
    comp = VoCo(tokens=3)
    model = tiny_lmm(comp)
    b = plain_batch()
    st = model.build_sequence(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"], b["image_index"])
    out = comp.compress(st, None)
    # sample 0: BOS, 16 visual (1..16), 3 VoCo (17..19), caption 5 6 7 at 20..22 (was 17..19)
    assert out.position_ids[0].tolist() == list(range(23))
    assert out.position_ids[1, :22].tolist() == list(range(22))
    assert out.visual_mask[0].sum() == 19 and out.lengths.tolist() == [23, 22]
    assert out.targets[0, 16:20].tolist() == [IGNORE_INDEX] * 3 + [5]  # the last VoCo token predicts "5"
    assert out.targets[0, 20:].tolist() == [6, 7, IGNORE_INDEX]
    assert int(out.query_index[0]) == 19 and int(st.query_index[0]) == 16


def test_training_gives_the_voco_embedding_a_gradient():
    torch.manual_seed(0)
    for shared, rows in ((True, 1), (False, M)):
        model = tiny_lmm(VoCo(tokens=M, shared=shared)).train()
        assert model.compressor.embeddings.shape == (rows, 32)
        assert [n for n, _ in model.named_parameters() if n.startswith("compressor.")] == ["compressor.embeddings"]
        out = model(toy_batch())
        out.loss.backward()
        g = model.compressor.embeddings.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
        assert all(p.grad is not None for p in model.llm.parameters() if p.requires_grad)
    assert torch.equal(tiny_lmm(VoCo(M), seed=4)(toy_batch()).loss, tiny_lmm(VoCo(M), seed=4)(toy_batch()).loss)


def test_check_refusals_name_the_key():
    VoCo(1).check(CLIP_L, 32)
    for kw, key in [(dict(tokens=0), "compressor.tokens"), (dict(tokens=-2), "compressor.tokens"),
                    (dict(tokens=True), "compressor.tokens"), (dict(tokens=1.5), "compressor.tokens"),
                    (dict(shared="yes"), "compressor.shared"), (dict(drop_cache=None), "compressor.drop_cache")]:
        with pytest.raises(ConfigError) as e:
            VoCo(**kw).check(CLIP_L, 32)
        assert e.value.key == key
    with pytest.raises(ConfigError) as e:
        VoCo(4).set_knobs(tokens=8)
    assert e.value.key == "compressor.tokens"
    with pytest.raises(ConfigError) as e:
        VoCo(4).budget_knobs(16, 576, CLIP_L)
    assert e.value.key == "schedule" and "fixed" in e.value.message


def test_flash_attention_is_refused_naming_the_key():
    """flash-attention takes padding only, not the VoCo mask: the first forward refuses it (the
    check runs before any kernel is called, so no GPU is needed to see it)."""
    model = tiny_lmm(VoCo(1))
    model.llm.model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ConfigError) as e:
        model(toy_batch())
    assert e.value.key == "llm.attn_implementation" and "sdpa" in e.value.message


@pytest.mark.parametrize("overrides,key", [
    (["compressor=voco", "compressor.tokens=0"], "compressor.tokens"),
    (["compressor=voco", "schedule=coarse_to_fine"], "schedule.stages[0].keep"),
    (["compressor=voco", "schedule=two_stage"], "schedule.adds"),
])
def test_config_check_refusals(overrides, key):
    from vtc.assembly.checks import check_config
    from vtc.config import compose_conf

    with pytest.raises(ConfigError) as e:
        check_config(compose_conf("train", overrides))
    assert e.value.key.startswith(key), e.value


def test_a_checkpoint_without_voco_cannot_take_it_at_test_time():
    from vtc.assembly.checkpoint import load_weights

    plain = tiny_lmm(None).state_dict()
    with pytest.raises(ConfigError) as e:
        load_weights(tiny_lmm(VoCo(1)), plain, compressor_changed=True, prefix="")
    assert e.value.key == "compressor" and "compressor.embeddings" in e.value.message
    trained = tiny_lmm(VoCo(1))
    load_weights(tiny_lmm(VoCo(1), seed=9), trained.state_dict(), compressor_changed=False, prefix="")
    # what eval's zero-shot check (vtc.eval.init_from.fresh_compressor_params) sees: built on meta
    with torch.device("meta"):
        comp = VoCo(4)
        comp.setup(CLIP_L, 4096)
    assert [n for n, _ in comp.named_parameters()] == ["embeddings"]
