"""FastV (vtc.compressors.fastv) against an independent computation: HF's own eager attention map
of layer K (a full map, in the test only) ranks the image tokens the same way as the one recomputed
query row; kept counts, positions, batch independence, cached generation, training."""
import copy

import pytest
import torch

from vtc.compressors.fastv import FastV, kept_count, query_attention
from vtc.errors import ConfigError
from vtc.cost.schedules import fastv_visual_tokens_per_layer
from vtc.model.encoder import EncoderInfo
from tests.tiny import greedy_by_recompute, single, spy, tiny_lmm, toy_batch

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


@pytest.fixture(scope="module", params=["previous", "current"])
def setup(request):
    comp = FastV(layer=2, ratio=0.5, score_at=request.param)
    model = tiny_lmm(comp)
    rec = spy(comp)
    b = toy_batch()
    model(b)
    eager = copy.deepcopy(model.llm.model)
    eager.set_attn_implementation("eager")
    comp.live = rec  # updated by every later forward
    return model, comp, b, dict(rec), eager


def eager_row(model, eager, s, K):
    """Head-mean attention row of the query token at layer K, from HF's full eager map."""
    st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
    out = eager.model(inputs_embeds=st.hidden, output_attentions=True)
    q = int(st.query_index[0])
    return out.attentions[K][0, :, q].mean(0), st


def test_query_row_matches_full_eager_attention(setup):
    model, comp, b, rec, eager = setup
    row = query_attention(rec["in"], model.llm.layers[2])
    for i in range(3):
        ref, st = eager_row(model, eager, single(b, i), 2)
        n = len(ref)
        assert torch.allclose(row[i, :n], ref, atol=1e-6)
        assert float(row[i, n:].abs().sum()) == 0  # padding gets nothing
        assert row[i, :n].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_kept_tokens_are_the_eager_top_half_with_positions_unchanged(setup):
    """FastV's code ranks by layer K-1's map (score_at=previous); score_at=current by layer K's."""
    model, comp, b, rec, eager = setup
    out, inp = rec["out"], rec["in"]
    K = 1 if comp.score_at == "previous" else 2
    for i in range(3):
        ref, st = eager_row(model, eager, single(b, i), K)
        vis = st.visual_mask[0].nonzero().squeeze(1)
        n_keep = len(vis) - len(vis) // 2
        expect = set(vis[ref[vis].topk(n_keep).indices].tolist()) if len(vis) else set()
        m = int(out.lengths[i])
        kept_vis = out.position_ids[i, :m][out.visual_mask[i, :m]].tolist()
        # In the unpadded single sequence positions equal indices, so positions name the tokens.
        assert set(kept_vis) == expect
        assert kept_vis == sorted(kept_vis)  # original order kept
        # Every text token is kept with its hidden state and position.
        n = int(inp.lengths[i])
        text = ~inp.visual_mask[i, :n]
        out_text = ~out.visual_mask[i, :m]
        assert torch.equal(out.position_ids[i, :m][out_text], inp.position_ids[i, :n][text])
        assert torch.equal(out.hidden[i, :m][out_text], inp.hidden[i, :n][text])
        # Kept visual tokens carry their own hidden state.
        for p in kept_vis:
            j = int((inp.position_ids[i, :n] == p).nonzero())
            jo = int((out.position_ids[i, :m] == p).nonzero())
            assert torch.equal(out.hidden[i, jo], inp.hidden[i, j])
        assert int(out.position_ids[i, out.query_index[i]]) == int(inp.position_ids[i, inp.query_index[i]])


def test_kept_count_is_n_minus_floor_rn():
    # ceil((1 − R)·n): the paper's 576 at R = 50% -> 288, 75% -> 144; odd counts round up.
    assert kept_count(576, 0.5) == 288 and kept_count(576, 0.75) == 144
    assert kept_count(15, 0.5) == 8 and kept_count(10, 0.3) == 7 and kept_count(16, 0.0) == 16
    comp = FastV(2, 0.5)
    assert comp.tokens_per_layer(576, 32) == fastv_visual_tokens_per_layer(32, 576, 2, 0.5)
    model = tiny_lmm(FastV(layer=1, ratio=0.3))
    seen = model(toy_batch()).seen
    assert seen[:, 0].tolist() == [16, 12, 12] == FastV(1, 0.3).tokens_per_layer(16, 3)  # 16 − floor(4.8)
    assert seen[:, 2].tolist() == [0, 0, 0]


def test_check_and_knobs():
    FastV(2, 0.5).check(CLIP_L, 32)
    for kw, key in [(dict(ratio=1.0), "compressor.ratio"), (dict(ratio=-0.1), "compressor.ratio"),
                    (dict(layer=32), "compressor.layer"), (dict(score_at="layer"), "compressor.score_at")]:
        with pytest.raises(ConfigError) as e:
            FastV(**{"layer": 2, "ratio": 0.5, **kw}).check(CLIP_L, 32)
        assert e.value.key == key
    comp = FastV(2, 0.5)
    comp.set_knobs(layer=3, ratio=0.75)
    assert comp.get_knobs() == {"layer": 3, "ratio": 0.75}
    comp.set_enabled(False)
    assert comp.tokens_per_layer(576, 32) == [576] * 32 and not comp.applies_at(3)


def test_batch_equals_each_sample_alone(setup):
    model, comp, b, rec, _ = setup
    out = rec["out"]
    for i in range(3):
        model(single(b, i))
        alone = comp.live["out"]
        n = int(alone.lengths[0])
        assert int(out.lengths[i]) == n
        assert torch.equal(out.position_ids[i, :n], alone.position_ids[0, :n])
        assert torch.allclose(out.hidden[i, :n], alone.hidden[0, :n], atol=1e-5)


def test_same_seed_same_output_and_training_gradients():
    b = toy_batch()
    assert torch.equal(tiny_lmm(FastV(1, 0.5), seed=4)(b).loss, tiny_lmm(FastV(1, 0.5), seed=4)(b).loss)
    model = tiny_lmm(FastV(1, 0.5)).train()
    model(b).loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_cached_generation_matches_full_recompute(setup):
    """The prompt is pruned once (query = last prompt token); decoding over the pruned cache equals
    recomputing the whole sequence each step with the same query token."""
    model, comp, b, _, _ = setup
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 4)
    assert seen[:, 0].tolist() == [16, 16, 8]
    for i in range(3):
        s = single(b, i)
        assert tokens[i] == greedy_by_recompute(model, s, 4)


def plain_batch() -> dict:
    """The plain (pretraining) template: the caption follows the image directly, so the token that
    predicts the first answer token, the query, is the image's last token."""
    from tests.tiny import IMG

    ids = torch.tensor([[1, IMG, 5, 6, 7], [1, IMG, 8, 9, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 2:5], labels[1, 2:4] = ids[0, 2:5], ids[1, 2:4]
    return dict(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels,
                pixel_values=torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3)),
                image_index=torch.tensor([0, 1]))


@pytest.mark.parametrize("ratio", [0.5, 0.9])
def test_an_image_query_token_is_kept_within_the_budget(ratio):
    comp = FastV(1, ratio)
    rec = spy(comp)
    model = tiny_lmm(comp)
    out = model(plain_batch())
    st, inp = rec["out"], rec["in"]
    assert bool(inp.visual_mask[0, inp.query_index[0]])  # the query is an image token
    assert out.seen[1].tolist() == [kept_count(16, ratio)] * 2
    assert bool(st.visual_mask[0, st.query_index[0]]) and torch.isfinite(out.loss)
