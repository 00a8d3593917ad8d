"""SparseVLM (vtc.compressors.sparsevlm) against independent computations: raters recomputed from
the input embeddings with plain loops, their attention rows from HF's own eager attention (a full
map, in the test only), kept tokens the top of those rows, recycled tokens from a plain DPC-kNN;
counts, refusals, batch independence, cached generation, training, the composed config."""
import copy
import math

import pytest
import torch

from vtc.compressors.sparsevlm import SparseVLM, cluster_merge, rater_attention, recycled
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo
from tests.tiny import (IMG, eager_attention_map, greedy_by_recompute, in_llm_config_stage_counts, single, tiny_lmm,
                        toy_batch)

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)
LAYERS, KEEP = [1, 2], [0.25, 0.125]  # 64 -> 16 kept + 2 clusters of 15 recycled = 18 -> 8 + 1 = 9
SCHEDULE_64 = [66 / 576, 30 / 576, 17 / 576]

PAPER_LAYERS = [3, 7, 16]  # LLaVA-1.5's 32 layers (scored by 2, 6, 15)


def text_batch() -> dict:
    """toy_batch's layout (image in the middle; image first + padding; text only) with 64-token
    images and a longer question after the image, so the raters are a real choice."""
    b = toy_batch(image_size=112)
    ids = torch.tensor([[1, 5, IMG, 6, 7, 8, 9, 10, 11, 12, 13], [1, IMG, 5, 6, 7, 8, 9, 0, 0, 0, 0],
                        [1, 5, 6, 7, 0, 0, 0, 0, 0, 0, 0]])
    labels = torch.full_like(ids, -100)
    labels[0, 9:11], labels[1, 5:7], labels[2, 3] = ids[0, 9:11], ids[1, 5:7], 7
    return dict(b, input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)


def spy(comp):
    comp.calls = []
    orig = comp.compress

    def wrapped(state, at):
        out = orig(state, at)
        comp.calls.append((at.index, state, out, at))
        return out

    comp.compress = wrapped
    return comp


@pytest.fixture(scope="module")
def setup():
    comp = spy(SparseVLM(LAYERS, KEEP))
    model = tiny_lmm(comp, image_size=112)
    b = text_batch()
    model(b)
    calls, raters = list(comp.calls), [r.clone() for r in comp._raters]
    eager = copy.deepcopy(model.llm.model)
    eager.set_attn_implementation("eager")
    return model, comp, b, calls, raters, eager


def plain_raters(st, b: int) -> list[int]:
    n = int(st.attention_mask[b].sum())
    vis = [j for j in range(n) if st.visual_mask[b, j]]
    q = int(st.query_index[b])
    cand = [j for j in range(vis[-1] + 1, q + 1)]
    r = []
    for j in cand:
        total = 0.0
        for v in vis:
            logits = torch.stack([st.hidden[b, v].float() @ st.hidden[b, t].float() for t in cand])
            total += float(logits.softmax(0)[cand.index(j)])
        r.append(total / len(vis))
    mean = sum(r) / len(r)
    chosen = [j for j, x in zip(cand, r) if x > mean] or cand
    return [int(st.position_ids[b, j]) for j in chosen]


def plain_dpc_knn(x: torch.Tensor, c: int) -> tuple[torch.Tensor, list[int]]:
    m, C = x.shape
    D = [[float((x[i] - x[j]).float().norm()) / C ** 0.5 for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(d * d for d in sorted(D[i])[:c]) / c) for i in range(m)]
    big = max(max(row) for row in D)
    delta = [min([D[i][j] for j in range(m) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)], default=big)
             for i in range(m)]
    centres = sorted(range(m), key=lambda i: -rho[i] * delta[i])[:c]
    assign = [centres.index(j) if j in centres else min(range(c), key=lambda a: D[centres[a]][j]) for j in range(m)]
    means = torch.stack([x[[j for j in range(m) if assign[j] == a]].mean(0) for a in range(c)])
    return means, centres


def span(st, b: int):
    n = int(st.attention_mask[b].sum())
    v = st.visual_mask[b, :n]
    return st.hidden[b, :n][v], st.position_ids[b, :n][v]


def test_raters_are_the_above_average_text_after_the_image(setup):
    model, comp, b, calls, raters, _ = setup
    idx, st, out, _ = calls[0]
    assert idx == 0 and out is st  # before layer 0 the tokens do not change
    for i in range(2):
        assert raters[i].tolist() == plain_raters(st, i)
        assert len(raters[i]) < int(st.query_index[i]) - int(span(st, i)[1][-1])  # a real choice
    assert raters[2].tolist() == []


def test_rater_rows_match_the_full_eager_attention_map(setup):
    """The recomputed R x T block, head and rater means, against HF's whole eager forward of each
    single sample (layer K_1 − 1 = 0 sees the unpruned sequence)."""
    model, comp, b, calls, raters, eager = setup
    _, _, _, at = calls[1]
    prev = at.previous_input
    B = prev.hidden.shape[0]
    for i in range(2):
        s = single(b, i)
        st = model.build_sequence(s["input_ids"], s["attention_mask"], s["labels"], s["pixel_values"], s["image_index"])
        att = eager.model(inputs_embeds=st.hidden, output_attentions=True).attentions[LAYERS[0] - 1][0].mean(0)
        ref = att[raters[i]].mean(0)  # positions are indices in the unpadded single sequence
        r = torch.isin(prev.position_ids[i], raters[i]).nonzero().squeeze(1)
        got = rater_attention(prev, at.previous_layer, r[None].expand(B, -1), torch.ones(B, len(r), dtype=torch.bool))
        n = len(ref)
        assert torch.allclose(got[i, :n], ref, atol=1e-6) and float(got[i, n:].abs().sum()) == 0


def test_each_stage_is_a_plain_recomputation(setup):
    """Per stage and sample: eager rows of layer K_s − 1 at the rater tokens, the top
    min(round(keep·n0), v − 1) image tokens kept in order, then the DPC-kNN means of the top
    int(0.3·d) + 1 deleted ones, each at its centre's position."""
    model, comp, b, calls, raters, eager = setup
    assert [c[0] for c in calls] == [0] + LAYERS
    for s, (idx, st, out, at) in enumerate(calls[1:]):
        prev = at.previous_input
        for i in range(2):
            h, pos = span(st, i)
            v = len(pos)
            rows = torch.isin(prev.position_ids[i], raters[i]).nonzero().squeeze(1)
            ref = eager_attention_map(eager, idx - 1, prev, i)[rows].mean(0)
            vis = st.visual_mask[i].nonzero().squeeze(1)
            k = min(round(KEEP[s] * 64), v - 1)
            order = sorted(range(v), key=lambda j: -float(ref[vis[j]]))
            kept = sorted(order[:k])
            m, c = int(0.3 * (v - k)) + 1, (int(0.3 * (v - k)) + 1) // 10 + 1
            means, centres = plain_dpc_knn(h[order[k:k + m]], c)
            got_h, got_pos = span(out, i)
            assert got_pos.tolist() == pos[kept].tolist() + [int(pos[order[k + j]]) for j in centres], (s, i)
            assert torch.allclose(got_h, torch.cat([h[kept], means]), atol=1e-5)
            n, n_out = int(st.attention_mask[i].sum()), int(out.attention_mask[i].sum())
            t_in, t_out = ~st.visual_mask[i, :n], ~out.visual_mask[i, :n_out]
            assert torch.equal(out.hidden[i, :n_out][t_out], st.hidden[i, :n][t_in])
            assert torch.equal(out.position_ids[i, :n_out][t_out], st.position_ids[i, :n][t_in])
            assert int(out.position_ids[i, out.query_index[i]]) == int(st.position_ids[i, st.query_index[i]])
    assert [len(span(c[2], 0)[1]) for c in calls[1:]] == [18, 9]


def test_cluster_merge_is_dpc_knn():
    g = torch.Generator().manual_seed(0)
    for m, c in [(20, 3), (40, 4), (11, 2), (5, 1), (1, 1)]:  # over 25 tokens cdist's matrix product would blur
        x = torch.randn(m, 8, generator=g)
        means, centres = cluster_merge(x, c)
        ref, ref_centres = plain_dpc_knn(x, c)
        assert centres.tolist() == ref_centres and torch.allclose(means, ref, atol=1e-6)
    assert [recycled(d) for d in (0, 1, 3, 4, 48, 276)] == [(0, 0), (1, 1), (1, 1), (2, 1), (15, 2), (83, 9)]


def test_counts_match_what_the_model_saw():
    assert SparseVLM(PAPER_LAYERS).tokens_per_layer(576, 32) == [576] * 3 + [309] * 4 + [204] * 9 + [113] * 16
    assert SparseVLM(PAPER_LAYERS, keep=SCHEDULE_64).tokens_per_layer(576, 32) == [576] * 3 + [82] * 4 + [32] * 9 + [18] * 16
    assert SparseVLM(PAPER_LAYERS, keep=SCHEDULE_64, recycle=False).stage_counts(576) == [66, 30, 17]
    for layers, keep, recycle, expect in [(LAYERS, KEEP, True, [64, 18, 9]), (LAYERS, KEEP, False, [64, 16, 8]),
                                          ([2], [0.5], True, [64, 64, 34]), ([1, 2], [1.0, 1.0], True, [64, 64, 64])]:
        comp = SparseVLM(layers, keep, recycle)
        seen = tiny_lmm(comp, image_size=112)(text_batch()).seen
        assert seen[:, 0].tolist() == seen[:, 1].tolist() == comp.tokens_per_layer(64, 3) == expect
        assert seen[:, 2].tolist() == [0, 0, 0]


def test_refusals_name_the_key():
    SparseVLM().check(CLIP_L, 32)
    SparseVLM([1, 2, 3]).check(CLIP_L, 4)
    for kw, key in [(dict(layers=[3, 7, 32]), "compressor.layers"), (dict(layers=[0, 7, 16]), "compressor.layers"),
                    (dict(layers=[7, 3, 16]), "compressor.layers"), (dict(layers=[]), "compressor.layers"),
                    (dict(keep=[0.5, 0.3]), "compressor.keep"), (dict(keep=0.5), "compressor.keep"),
                    (dict(keep=[0.5, 0.0, 0.1]), "compressor.keep[1]"), (dict(keep=[0.5, 0.3, 1.2]), "compressor.keep[2]"),
                    (dict(recycle="yes"), "compressor.recycle")]:
        with pytest.raises(ConfigError) as e:
            SparseVLM(**kw).check(CLIP_L, 32)
        assert e.value.key == key, kw
    with pytest.raises(ConfigError) as e:
        SparseVLM(PAPER_LAYERS).check(CLIP_L, 4)
    assert e.value.key == "compressor.layers" and "compressor.layers=[1, 2, 3]" in e.value.message
    for depth, expect in [(32, PAPER_LAYERS), (4, [1, 2, 3])]:  # layers: null = the paper's, scaled
        comp = SparseVLM()
        comp.check(CLIP_L, depth)
        assert comp.layers == expect


def test_knobs_budget_and_flops():
    comp = SparseVLM(PAPER_LAYERS)
    for n, tokens in [(576, 64), (576, 128), (576, 192), (576, 20), (64, 16), (64, 4)]:
        knobs = comp.budget_knobs(tokens, n, CLIP_L)
        probe = SparseVLM(PAPER_LAYERS, keep=knobs["keep"])
        assert tokens - 3 <= probe.kept(n) <= tokens and all(0 < k <= 1 for k in knobs["keep"]), (n, tokens)
    comp.set_knobs(layers=[1, 2], keep=[0.5, 0.25])
    assert comp.get_knobs() == {"layers": [1, 2], "keep": [0.5, 0.25]}
    comp.setup(CLIP_L, 32)
    d, R = 32, 16  # 64 -> k 32, 32 deleted: m 10 recycled, 2 clusters -> 34 -> k 16, 18 deleted: m 6

    def stage(v, m):
        return 2 * v * d * d + 2 * R * d * d + 2 * R * v * d + 3 * m * m * d
    assert comp.stage_counts(64) == [34, 17]
    assert comp.own_flops(64) == 2 * 64 * 32 * d + stage(64, 10) + stage(34, 6)
    comp.set_enabled(False)
    assert comp.tokens_per_layer(64, 3) == [64] * 3 and not comp.applies_at(0) and comp.own_flops(64) == 0


def test_batch_equals_each_sample_alone(setup):
    model, comp, b, calls, _, _ = setup
    outs = {c[0]: c[2] for c in calls}
    full = model(b)
    per = []
    for i in range(3):
        comp.calls.clear()
        o = model(single(b, i))
        per.append((o.loss * o.num_targets, o.num_targets))
        for idx, _, alone, _ in comp.calls:
            n = int(alone.attention_mask[0].sum())
            assert int(outs[idx].attention_mask[i].sum()) == n
            assert torch.equal(outs[idx].position_ids[i, :n], alone.position_ids[0, :n])
            assert torch.allclose(outs[idx].hidden[i, :n], alone.hidden[0, :n], atol=1e-5)
    assert full.loss.item() == pytest.approx((sum(p[0] for p in per) / sum(p[1] for p in per)).item(), abs=1e-5)


def test_cached_generation_matches_full_recompute_and_singles(setup):
    model, comp, b, _, _, _ = setup
    gen = dict(b, input_ids=b["input_ids"][:, :9], attention_mask=b["attention_mask"][:, :9])  # prompts only
    tokens, seen = model.generate(gen["input_ids"], gen["attention_mask"], gen["pixel_values"], gen["image_index"], 5)
    assert seen[:, 0].tolist() == [64, 18, 9]
    for i in range(3):
        s = single(gen, i)
        alone, _ = model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 5)
        assert alone[0] == tokens[i]
        assert tokens[i] == greedy_by_recompute(model, s, 5)


def test_training_gradients_and_an_image_token_query():
    model = tiny_lmm(SparseVLM(LAYERS, KEEP), image_size=112).train()
    out = model(text_batch())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    b = toy_batch(image_size=112)  # LLaVA's plain template: the caption follows the image at once
    plain = dict(b, input_ids=torch.tensor([[1, IMG, 5, 6], [1, IMG, 7, 0]]),
                 attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
                 labels=torch.tensor([[-100, -100, 5, 6], [-100, -100, 7, -100]]), image_index=torch.tensor([0, 1]))
    comp = spy(SparseVLM(LAYERS, KEEP))
    out = tiny_lmm(comp, image_size=112).train()(plain)
    assert torch.isfinite(out.loss) and out.seen[:, 0].tolist() == [64, 18, 9]
    for _, st, res, _ in comp.calls[1:]:
        for i in range(2):
            q = int(res.query_index[i])
            assert bool(res.visual_mask[i, q]) and int(res.position_ids[i, q]) == 64  # the last image token
            assert not bool(res.visual_mask[i, q + 1]) and int(span(res, i)[1][-1]) == 64


def test_the_config_composes_and_scales():
    from vtc.config import compose_conf

    comp = SparseVLM([1, 2, 3], list(compose_conf("train", ["compressor=sparsevlm"]).compressor.keep))
    budget = comp.kept(64)
    kept = in_llm_config_stage_counts("sparsevlm", comp)
    assert kept[-1] == budget and kept[0] < kept[1] < kept[2] and kept[0] <= round(budget / 4)
