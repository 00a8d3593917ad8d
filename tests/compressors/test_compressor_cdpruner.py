"""CDPruner (vtc.compressors.cdpruner) against independent computations: the greedy DPP against
brute-force log-determinants (torch.linalg.slogdet, float64), the relevance / kernel with Python
loops, the kept tokens of the tiny model with a from-scratch reference; the budget, positions,
batch independence (loss and cached generation), video spans, the checks and training."""
import itertools
import math

import pytest
import torch

from tests.tiny import greedy_by_recompute, single, spy, tiny_lmm, toy_batch, toy_video_batch
from vtc.compressors.cdpruner import CDPruner, conditional_kernel, dpp_greedy, relevance
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

CLIP_L = EncoderInfo(336, 14, 1024, 24, True, -2)


def logdet(L: torch.Tensor, subset) -> float:
    sub = L[list(subset)][:, list(subset)].double()
    sign, val = torch.linalg.slogdet(sub)
    return float(val) if sign > 0 else -math.inf


def random_kernel(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    x = x / x.norm(dim=1, keepdim=True)
    return (r[:, None] * (x @ x.T) * r[None]).float()


# -- the greedy MAP inference ---------------------------------------------------------------------

def test_greedy_is_greedy_by_brute_force_and_near_the_best_subset():
    g = torch.Generator().manual_seed(0)
    gaps = []
    for trial in range(60):
        n = 3 + trial % 6  # 3..8
        k = 1 + trial % 3  # 1..3
        L = random_kernel(n, 6, g)
        picks = dpp_greedy(L[None], torch.tensor([k]), eps=1e-9)[0].tolist()
        assert len(picks) == k and len(set(picks)) == k
        assert picks[0] == int(torch.diagonal(L).argmax())
        chosen: list[int] = []
        for j in picks:
            scores = {c: logdet(L, chosen + [c]) for c in range(n) if c not in chosen}
            assert scores[j] >= max(scores.values()) - 1e-5, (trial, chosen, j, scores)
            chosen.append(j)
        best = max(logdet(L, s) for s in itertools.combinations(range(n), k))
        greedy = logdet(L, picks)
        assert greedy <= best + 1e-6
        gaps.append(best - greedy)
    # How close greedy comes: the log-det gap to the best k-subset, over the 60 kernels.
    print(f"greedy vs best subset log-det gap: mean {sum(gaps) / len(gaps):.4f}, max {max(gaps):.4f}, "
          f"exact in {sum(x < 1e-6 for x in gaps)}/{len(gaps)}")
    assert sum(x < 1e-6 for x in gaps) >= len(gaps) // 2


def test_greedy_equals_brute_force_greedy_at_a_larger_size():
    # 96 tokens, 16 picks: every step's argmax of log det(L_{Y ∪ j}) (float64, batched slogdet).
    g = torch.Generator().manual_seed(4)
    n, k = 96, 16
    x, t = torch.randn(1, n, 32, generator=g), torch.randn(1, 32, generator=g)
    valid = torch.ones(1, n, dtype=torch.bool)
    L = conditional_kernel(x, relevance(x, t, valid), valid)
    picks = dpp_greedy(L, torch.tensor([k]))[0].tolist()
    Ld, chosen = L[0].double(), []
    for _ in range(k):
        rest = [c for c in range(n) if c not in chosen]
        idx = torch.tensor([chosen + [c] for c in rest])
        sign, val = torch.linalg.slogdet(Ld[idx[:, :, None], idx[:, None, :]])
        chosen.append(rest[int(torch.where(sign > 0, val, -math.inf).argmax())])
    assert picks == chosen


def test_greedy_batched_with_padding_equals_each_sample_alone():
    g = torch.Generator().manual_seed(1)
    sizes, ks = [8, 5, 3, 6], [3, 2, 3, 6]
    N = max(sizes)
    kernel = torch.zeros(len(sizes), N, N)
    valid = torch.zeros(len(sizes), N, dtype=torch.bool)
    for b, n in enumerate(sizes):
        kernel[b, :n, :n] = random_kernel(n, 7, g)
        valid[b, :n] = True
    picks = dpp_greedy(kernel, torch.tensor(ks), valid)
    assert picks.shape == (4, 6)
    for b, (n, k) in enumerate(zip(sizes, ks)):
        alone = dpp_greedy(kernel[b:b + 1, :n, :n], torch.tensor([k]))[0]
        m = min(n, k)
        assert picks[b, :m].tolist() == alone[:m].tolist()
        assert (picks[b, m:] == -1).all() and all(0 <= j < n for j in picks[b, :m].tolist())


def test_degenerate_kernel_fills_by_the_diagonal_without_nans():
    # Six tokens spanning two directions: after two picks every residual is ~0. The rest of the
    # budget is filled by decreasing L_ii (ties to the lower index).
    x = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])
    r = torch.tensor([0.9, 0.8, 0.7, 1.0, 0.5, 0.6])
    L = r[:, None] * (x @ x.T) * r[None]
    picks = dpp_greedy(L[None], torch.tensor([5]))[0].tolist()
    assert picks[:2] == [3, 0]  # L_33 = 1 first, then the best token of the other direction
    assert picks[2:] == [1, 2, 5]  # fill: diag 0.64, 0.49, 0.36
    assert torch.isfinite(torch.tensor(picks, dtype=torch.float)).all()
    zero = dpp_greedy(torch.zeros(1, 4, 4), torch.tensor([2]))[0].tolist()
    assert zero == [0, 1]


# -- relevance and kernel, recomputed by hand ---------------------------------------------------------

@pytest.mark.parametrize("negate,theta", [(False, None), (True, None), (False, 0.5)])
def test_relevance_and_kernel_match_a_loop(negate, theta):
    g = torch.Generator().manual_seed(2)
    B, N, d = 2, 5, 4
    x = torch.randn(B, N, d, generator=g)
    t = torch.randn(B, d, generator=g)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    r = relevance(x, t, valid, negate, theta)
    L = conditional_kernel(x, r, valid)
    for b in range(B):
        n = int(valid[b].sum())
        cos = [float(x[b, i] @ t[b]) / (float(x[b, i].norm()) * float(t[b].norm())) for i in range(n)]
        c = [-v for v in cos] if negate else cos
        lo, hi = min(c), max(c)
        want = [(v - lo + 1e-6) / (hi - lo) for v in c]
        if theta is not None:
            a = theta / (2 * (1 - theta))
            want = [math.exp(a * v) * math.exp(-a) for v in want]
        assert r[b, :n].tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert (r[b, n:] == 0).all()
        for i in range(N):
            for j in range(N):
                if i < n and j < n:
                    s = float(x[b, i] @ x[b, j]) / (float(x[b, i].norm()) * float(x[b, j].norm()))
                    assert float(L[b, i, j]) == pytest.approx(want[i] * s * want[j], rel=1e-4, abs=1e-6)
                else:
                    assert float(L[b, i, j]) == 0.0
    flat = relevance(torch.ones(1, 3, 2), torch.ones(1, 2), torch.ones(1, 3, dtype=torch.bool))
    assert flat[0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # all equal: r = 1, pure diversity


# -- in the tiny model ---------------------------------------------------------------------------------

def reference_keep(h: torch.Tensor, vis: list[int], q: int, keep: int, theta=None) -> list[int]:
    """From scratch on one unpadded sample's layer input h [T, d]: the kept visual indices."""
    if not vis:
        return []
    h = h.double()
    text = [i for i in range(q + 1) if i not in vis]
    instr = [i for i in text if i > vis[-1]] or text
    t = sum(h[i] for i in instr) / len(instr)
    cos = [float(h[i] @ t / (h[i].norm() * t.norm())) for i in vis]
    lo, hi = min(cos), max(cos)
    r = [(c - lo + 1e-6) / max(hi - lo, 1e-6) for c in cos]
    if theta is not None:
        a = theta / (2 * (1 - theta))
        r = [math.exp(a * (v - 1)) for v in r]
    n = len(vis)
    L = torch.tensor([[r[a] * float(h[vis[a]] @ h[vis[b]] / (h[vis[a]].norm() * h[vis[b]].norm())) * r[b]
                       for b in range(n)] for a in range(n)], dtype=torch.float64)
    chosen: list[int] = []
    for _ in range(min(keep, n)):  # greedy by brute-force log-det
        rest = [c for c in range(n) if c not in chosen]
        chosen.append(max(rest, key=lambda c: logdet(L, chosen + [c])))
    return sorted(vis[c] for c in chosen)


@pytest.mark.parametrize("layer,positions,keep,theta", [(0, "compact", 5, None), (1, "keep", 7, None),
                                                         (0, "compact", 6, 0.6)])
def test_kept_tokens_match_independent_computation(layer, positions, keep, theta):
    comp = CDPruner(layer=layer, keep=keep, theta=theta, positions=positions)
    model = tiny_lmm(comp)
    rec = spy(comp)
    b = toy_batch()
    model(b)
    inp, out = rec["in"], rec["out"]
    assert rec["at"].index == layer
    for i in range(3):
        n = int(inp.lengths[i])
        vis = inp.visual_mask[i, :n].nonzero().squeeze(1).tolist()
        h = inp.hidden[i, :n]
        if layer == 0:  # the layer-0 input: the sample's own sequence, built alone
            s = single(b, i)
            st = model.build_sequence(s["input_ids"], s["attention_mask"], None, s["pixel_values"], s["image_index"])
            assert torch.allclose(st.hidden[0], h, atol=1e-5)
            h = st.hidden[0]
        expect = reference_keep(h, vis, int(inp.query_index[i]), keep, theta)
        m = int(out.lengths[i])
        pos_in = inp.position_ids[i, :n]
        kept_idx = [j for j in range(n) if j not in vis or j in expect]
        dropped_before = [sum(1 for v in vis if v < j and v not in expect) for j in kept_idx]
        shift = dropped_before if positions == "compact" else [0] * len(kept_idx)
        assert out.position_ids[i, :m].tolist() == [int(pos_in[j]) - s_ for j, s_ in zip(kept_idx, shift)]
        assert torch.equal(out.hidden[i, :m], inp.hidden[i, kept_idx])
        assert out.visual_mask[i, :m].tolist() == [j in vis for j in kept_idx]
        assert int(out.query_index[i]) == kept_idx.index(int(inp.query_index[i]))
    assert out.visual_counts().tolist() == [keep, keep, 0]


def test_batch_equals_each_sample_alone_loss_and_generation():
    comp = CDPruner(layer=0, keep=6)
    model = tiny_lmm(comp)
    b = toy_batch()
    out = model(b)
    total = sum(float(model(single(b, i)).loss) * model(single(b, i)).num_targets for i in range(3))
    assert float(out.loss) * out.num_targets == pytest.approx(total, rel=1e-5)
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 4)
    assert seen[:, 0].tolist() == [6, 6, 6] and seen[:, 2].tolist() == [0, 0, 0]
    for i in range(3):
        s = single(b, i)
        alone, _ = model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], 4)
        assert tokens[i] == alone[0]
        assert tokens[i] == greedy_by_recompute(model, s, 4)  # no cache: the whole sequence each step


def test_video_span_is_one_set_and_batch_equals_alone():
    comp = CDPruner(layer=0, keep=16)
    model = tiny_lmm(comp)
    rec = spy(comp)
    vb = toy_video_batch(frames=4)
    out = model(vb)
    assert torch.isfinite(out.loss)
    assert out.visual_in.tolist() == [64, 16, 0] and out.seen[0].tolist() == [16, 16, 0]
    batch_out = rec["out"]
    n0 = int(batch_out.lengths[0])
    alone = {"input_ids": vb["input_ids"][:1], "attention_mask": vb["attention_mask"][:1],
             "labels": vb["labels"][:1], "pixel_values": vb["pixel_values"][:4],
             "visual_items": torch.tensor([[0, 0, 4, 1]])}
    o1 = model(alone)
    a = rec["out"]
    assert int(a.lengths[0]) == n0
    assert torch.equal(a.position_ids[0], batch_out.position_ids[0, :n0])
    assert torch.allclose(a.hidden[0], batch_out.hidden[0, :n0], atol=1e-6)
    assert math.isfinite(float(o1.loss))
    inp = rec["in"]  # 16 of the span's 64 tokens, in order, drawn from several frames at once
    vis = inp.visual_mask[0].nonzero().squeeze(1)
    kept = comp.select(inp)[0, vis].nonzero().squeeze(1)
    assert len(kept) == 16 and len(set((kept // 16).tolist())) > 1


def test_check_knobs_and_counts():
    CDPruner().check(CLIP_L, 32)
    CDPruner(layer=2, positions="keep", theta=0.5).check(CLIP_L, 32)
    for kw, key in [({"keep": 0}, "compressor.keep"), ({"keep": 2.5}, "compressor.keep"),
                    ({"theta": 1.0}, "compressor.theta"), ({"theta": -0.1}, "compressor.theta"),
                    ({"layer": 40}, "compressor.layer"), ({"positions": "x"}, "compressor.positions"),
                    ({"layer": 2}, "compressor.positions"), ({"eps": 0}, "compressor.eps"),
                    ({"negate": "yes"}, "compressor.negate")]:
        with pytest.raises(ConfigError) as e:
            CDPruner(**kw).check(CLIP_L, 32)
        assert e.value.key == key and len(e.value.message) > 30
    comp = CDPruner()
    assert comp.get_knobs() == {"layer": 0, "keep": 64, "theta": None}
    assert comp.tokens_per_layer(576, 32) == [64] * 32 and comp.kept(10) == 10
    assert CDPruner(layer=2, positions="keep", keep=128).tokens_per_layer(576, 4) == [576, 576, 128, 128]
    assert comp.budget_knobs(16, 64, CLIP_L) == {"keep": 16}
    comp.set_knobs(keep=192)
    assert comp.kept(576) == 192
    with pytest.raises(ConfigError):
        comp.set_knobs(ratio=0.5)


def test_own_flops_count():
    comp = CDPruner(keep=64)
    comp.setup(CLIP_L, 4096)
    n, d, k = 576, 4096, 64
    want = 2 * n * n * d + 2 * n * n + 5 * n * d + n * k * (k - 1) + 5 * n * k
    assert comp.own_flops(n) == want
    assert comp.own_flops(n) / (2 * n * n * d) == pytest.approx(1.0, abs=0.01)  # the Gram matrix dominates
    comp.set_enabled(False)
    assert comp.own_flops(n) == 0.0


def test_training_step_is_finite():
    b = toy_batch()
    assert torch.equal(tiny_lmm(CDPruner(keep=5), seed=5)(b).loss, tiny_lmm(CDPruner(keep=5), seed=5)(b).loss)
    model = tiny_lmm(CDPruner(keep=5)).train()
    out = model(b)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_instruction_is_the_text_after_the_image_up_to_the_query():
    # Tokens: two text tokens along e1 (system prompt), four visual tokens, the question along e2.
    # keep=1 takes argmax L_ii = r_i²: the visual token most aligned with the instruction.
    from vtc.model.sequence import SeqState

    e1, e2 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    vis = [e1, e2, e1 + 0.3 * e2, torch.tensor([0, 0, 1.0])]

    def state(tokens, visual, q):
        T = len(tokens)
        return SeqState(hidden=torch.stack(tokens)[None], attention_mask=torch.ones(1, T, dtype=torch.long),
                        position_ids=torch.arange(T)[None], visual_mask=torch.tensor([visual]), targets=None,
                        query_index=torch.tensor([q]))

    comp = CDPruner(keep=1)
    after = state([e1, e1, *vis, e2, e2], [False, False, True, True, True, True, False, False], 7)
    assert comp.select(after)[0].tolist() == [True, True, False, True, False, False, True, True]
    # An image after the query (no text after it): the text up to the query is the instruction.
    before = state([e1, e1, *vis], [False, False, True, True, True, True], 1)
    assert comp.select(before)[0].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("keep", [64, 128, 192])
def test_real_size_budget_is_exact(keep):
    # LLaVA-1.5's 576 tokens between a 10-token prefix and a 20-token question; a second sample
    # padded shorter, with its image first. Kept: exactly `keep` distinct tokens of each image.
    from vtc.model.sequence import SeqState

    g = torch.Generator().manual_seed(3)
    B, T, d = 2, 606, 64
    vis = torch.zeros(B, T, dtype=torch.bool)
    vis[0, 10:586] = True
    vis[1, 0:576] = True
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 590:] = 0
    st = SeqState(hidden=torch.randn(B, T, d, generator=g), attention_mask=mask,
                  position_ids=torch.arange(T).repeat(B, 1), visual_mask=vis, targets=None,
                  query_index=torch.tensor([T - 1, 589]))
    comp = CDPruner(keep=keep)
    sel = comp.select(st)
    assert (sel & vis).sum(1).tolist() == [keep, keep]
    assert sel[0, :10].all() and sel[0, 586:].all() and sel[1, 576:590].all() and not sel[1, 590:].any()
    out = comp.compress(st, None)
    assert out.visual_counts().tolist() == [keep, keep]
    assert out.position_ids[0, -1] == T - 1 - (576 - keep)  # compact: as if pruned before the LLM
