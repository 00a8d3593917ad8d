"""PyramidDrop (vtc.compressors.pyramid_drop) against independent computations: HF's own eager
attention (a full map, in the test only) of each boundary layer ranks the image tokens, and the top
floor(n0·λ^(s+1)) of them, counted from the tokens the sample brought in, are what each stage keeps;
counts, refusals, batch independence, cached generation, training, the composed config."""
import copy
import math

import pytest
import torch

from vtc.compressors.pyramid_drop import PyramidDrop, scaled_layers
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import (IMG, eager_attention_map, greedy_by_recompute, in_llm_config_stage_counts, single, tiny_lmm,
                        toy_batch)

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)
LAYERS, RATIO = [0, 1, 2], 0.7  # 16 -> 11 -> 7 -> 5 (a floor of floors would give 4 at the last stage)


def spy(comp):
    """Record (layer index, state in, state out) of every compress call into ``comp.calls``."""
    comp.calls = []
    orig = comp.compress

    def wrapped(state, at):
        out = orig(state, at)
        comp.calls.append((at.index, state, out))
        return out

    comp.compress = wrapped
    return comp


@pytest.fixture(scope="module")
def setup():
    comp = spy(PyramidDrop(LAYERS, RATIO))
    model = tiny_lmm(comp)
    b = toy_batch()
    model(b)
    calls = list(comp.calls)
    eager = copy.deepcopy(model.llm.model)
    eager.set_attn_implementation("eager")
    return model, comp, b, calls, eager


def kept_positions(st, b: int) -> list[int]:
    n = int(st.attention_mask[b].sum())
    return st.position_ids[b, :n][st.visual_mask[b, :n]].tolist()


def test_first_stage_is_the_top_of_the_full_eager_attention_map(setup):
    """Stage 0 against HF's whole eager forward of the single, unpadded sample: the last instruction
    token's row of layer l_0's map (head mean), top floor(16·λ) image tokens."""
    model, comp, b, calls, eager = setup
    _, _, out = calls[0]
    for i in range(2):
        s = single(b, i)
        st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
        att = eager.model(inputs_embeds=st.hidden, output_attentions=True).attentions[LAYERS[0]]
        row = att[0, :, int(st.query_index[0])].mean(0)
        vis = st.visual_mask[0].nonzero().squeeze(1)
        expect = vis[row[vis].topk(int(16 * RATIO)).indices].tolist()  # positions = indices here
        assert sorted(kept_positions(out, i)) == sorted(expect) and kept_positions(out, i) == sorted(expect)


def test_every_stage_keeps_the_eager_top_of_n0_lambda_power(setup):
    model, comp, b, calls, eager = setup
    assert [c[0] for c in calls] == LAYERS
    for s, (idx, inp, out) in enumerate(calls):
        for i in range(3):
            n = int(inp.attention_mask[i].sum())
            vis = inp.visual_mask[i, :n].nonzero().squeeze(1)
            if len(vis) == 0:
                assert kept_positions(out, i) == []
                continue
            row = eager_attention_map(eager, idx, inp, i)[int(inp.query_index[i])]
            k = math.floor(16 * RATIO ** (s + 1))  # n0 = 16 for both image samples
            expect = inp.position_ids[i, vis[row[vis].topk(k).indices]].tolist()
            assert kept_positions(out, i) == sorted(expect), (s, i)
            # text: every token kept, with its hidden state and position; the query follows
            m = int(out.attention_mask[i].sum())
            t_in, t_out = ~inp.visual_mask[i, :n], ~out.visual_mask[i, :m]
            assert torch.equal(out.position_ids[i, :m][t_out], inp.position_ids[i, :n][t_in])
            assert torch.equal(out.hidden[i, :m][t_out], inp.hidden[i, :n][t_in])
            assert int(out.position_ids[i, out.query_index[i]]) == int(inp.position_ids[i, inp.query_index[i]])


def test_counts_match_what_the_model_saw():
    assert PyramidDrop([8, 16, 24]).tokens_per_layer(576, 32) == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert PyramidDrop([8, 16, 24]).kept(576) == 72 and PyramidDrop([8, 16, 24], 0.6).stage_counts(100) == [60, 36, 21]
    for layers, ratio, expect in [(LAYERS, RATIO, [11, 7, 5]), ([1, 2], 0.5, [16, 8, 4]), ([2], 0.3, [16, 16, 4])]:
        comp = PyramidDrop(layers, ratio)
        seen = tiny_lmm(comp)(toy_batch()).seen
        assert seen[:, 0].tolist() == seen[:, 1].tolist() == comp.tokens_per_layer(16, 3) == expect
        assert seen[:, 2].tolist() == [0, 0, 0]


def test_refusals_name_the_key():
    PyramidDrop().check(CLIP_L, 32)
    PyramidDrop([1, 2, 3], 1.0).check(CLIP_L, 4)
    for kw, key in [(dict(layers=[8, 16, 32]), "compressor.layers"), (dict(layers=[16, 8]), "compressor.layers"),
                    (dict(layers=[8, 8]), "compressor.layers"), (dict(layers=[]), "compressor.layers"),
                    (dict(layers=[-1, 4]), "compressor.layers"),
                    (dict(layers=[2.0]), "compressor.layers"), (dict(ratio=0.0), "compressor.ratio"),
                    (dict(ratio=1.5), "compressor.ratio"), (dict(ratio=True), "compressor.ratio")]:
        with pytest.raises(ConfigError) as e:
            PyramidDrop(**{"layers": [8, 16, 24], "ratio": 0.5, **kw}).check(CLIP_L, 32)
        assert e.value.key == key, kw
    with pytest.raises(ConfigError) as e:
        PyramidDrop([8, 16, 24]).check(CLIP_L, 4)
    assert e.value.key == "compressor.layers" and "compressor.layers=[1, 2, 3]" in e.value.message
    for depth, expect in [(32, [8, 16, 24]), (4, [1, 2, 3])]:  # layers: null = the paper's, scaled
        comp = PyramidDrop()
        comp.check(CLIP_L, depth)
        assert comp.layers == expect
    assert scaled_layers((8, 16, 24), 32) == [8, 16, 24] and scaled_layers((8, 16, 24), 8) == [2, 4, 6]
    assert scaled_layers((3, 7, 16), 32, first=1) == [3, 7, 16] and scaled_layers((3, 7, 16), 8, first=1) == [1, 3, 5]


def test_knobs_and_budget():
    comp = PyramidDrop([8, 16, 24])
    for n, tokens in [(576, 72), (576, 64), (576, 10), (576, 1), (64, 16), (64, 64), (100, 37)]:
        comp.set_knobs(**comp.budget_knobs(tokens, n, CLIP_L))
        assert comp.kept(n) == tokens and 0 < comp.ratio <= 1, (n, tokens, comp.ratio)
    comp.set_knobs(layers=[1, 2], ratio=0.5)
    assert comp.get_knobs() == {"layers": [1, 2], "ratio": 0.5}
    comp.set_enabled(False)
    assert comp.tokens_per_layer(16, 3) == [16] * 3 and not comp.applies_at(1) and comp.own_flops(16) == 0


def test_own_flops_counts_keys_query_and_dot_products():
    comp = PyramidDrop([1, 2], 0.5)
    comp.setup(CLIP_L, 32)
    d = 32

    def stage(v):
        return 2 * v * d * d + 2 * d * d + 2 * v * d
    assert comp.own_flops(16) == stage(16) + stage(8)
    model = tiny_lmm(PyramidDrop([1, 2], 0.5))
    assert model.compressor.llm_hidden == 32  # the LMM calls setup with the LLM width


def test_batch_equals_each_sample_alone(setup):
    model, comp, b, calls, _ = setup
    outs = {idx: out for idx, _, out in calls}
    full = model(b)
    per = []
    for i in range(3):
        comp.calls.clear()
        o = model(single(b, i))
        per.append((o.loss * o.num_targets, o.num_targets))
        for idx, _, alone in comp.calls:
            n = int(alone.attention_mask[0].sum())
            assert int(outs[idx].attention_mask[i].sum()) == n
            assert torch.equal(outs[idx].position_ids[i, :n], alone.position_ids[0, :n])
            assert torch.allclose(outs[idx].hidden[i, :n], alone.hidden[0, :n], atol=1e-5)
    assert full.loss.item() == pytest.approx((sum(p[0] for p in per) / sum(p[1] for p in per)).item(), abs=1e-5)


def test_cached_generation_matches_full_recompute_and_singles(setup):
    """The prompt is dropped at every stage once; decoding over the cache of three differently sized
    segments equals recomputing the whole sequence each step with the same query token, and a
    batch generates what each sample generates alone."""
    model, comp, b, _, _ = setup
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 5)
    assert seen[:, 0].tolist() == [11, 7, 5]
    for i in range(3):
        s = single(b, i)
        alone, _ = model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 5)
        assert alone[0] == tokens[i]
        assert tokens[i] == greedy_by_recompute(model, s, 5)


def test_training_gradients_and_an_image_token_query():
    """Training runs through every stage; a caption right after the image (LLaVA's plain template)
    makes the last image token the query, which every stage keeps."""
    b = toy_batch()
    model = tiny_lmm(PyramidDrop(LAYERS, RATIO)).train()
    out = model(b)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    plain = dict(b, input_ids=torch.tensor([[1, IMG, 5, 6], [1, IMG, 7, 0]]),
                 attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                 labels=torch.tensor([[-100, -100, 5, 6], [-100, -100, 7, -100]]), image_index=torch.tensor([0, 1]))
    comp = spy(PyramidDrop(LAYERS, 0.1))  # floor(16·0.1) = 1, then 0: the query still stays
    out = tiny_lmm(comp).train()(plain)
    assert torch.isfinite(out.loss) and out.seen[:, 0].tolist() == [1, 1, 1]
    last = comp.calls[-1][2]
    for i in range(2):
        assert bool(last.visual_mask[i, last.query_index[i]]) and int(last.position_ids[i, last.query_index[i]]) == 16


def test_the_config_composes_and_scales():
    kept = in_llm_config_stage_counts("pyramid_drop", PyramidDrop([1, 2, 3], 0.5))
    assert kept == [2, 4, 8]  # a quarter, a half, then all of the configured 8
