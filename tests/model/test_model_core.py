"""The model core against independent computations: splicing, label masking and batching with
padding, KV-cache generation, and real-size parameter counts on the meta device."""
import pytest
import torch

from vtc.compressors import AvgPool2d, NoCompression
from vtc.data.batch import IGNORE_INDEX
from vtc.model.encoder import VisionEncoder
from vtc.model.llm import LanguageModel
from vtc.model.projector import build_projector
from tests.tiny import IMG, splice_images as splice, tiny_lmm, toy_batch

def test_splice_matches_per_sample_concatenation():
    torch.manual_seed(0)
    b = toy_batch()
    d, V = 8, 3
    emb = torch.randn(3, 7, d)
    visual = torch.randn(2, V, d)
    st = splice(emb, b["input_ids"], b["attention_mask"], b["labels"], b["image_index"], visual, IMG)
    # Independent: build each sample by hand.
    expect = [
        torch.cat([emb[0, :2], visual[0], emb[0, 3:7]]),
        torch.cat([emb[1, :1], visual[1], emb[1, 2:4]]),
        emb[2, :4],
    ]
    for i, e in enumerate(expect):
        n = len(e)
        assert int(st.attention_mask[i].sum()) == n
        assert torch.equal(st.hidden[i, :n], e)
        assert torch.all(st.hidden[i, n:] == 0)
        assert st.position_ids[i, :n].tolist() == list(range(n))
    assert st.visual_mask[0].tolist() == [False, False, True, True, True, False, False, False, False]
    assert st.visual_mask[2].sum() == 0
    # Targets are shifted labels with visual tokens ignored. Sample 0 spliced is
    # [1, 5, v, v, v, 6, 7, 8, 9]: token 8 sits at index 7, so index 6 predicts 8 and 7 predicts 9.
    assert st.targets[0].tolist() == [IGNORE_INDEX] * 6 + [8, 9, IGNORE_INDEX]
    # Sample 1 is [1, v, v, v, 5, 6]: index 4 predicts 6.
    assert st.targets[1].tolist()[:6] == [IGNORE_INDEX] * 4 + [6, IGNORE_INDEX]
    # The query is the token that predicts the first answer token.
    assert st.query_index.tolist() == [6, 4, 2]


def test_splice_rejects_image_without_placeholder():
    b = toy_batch()
    ids = b["input_ids"].clone()
    ids[0, 2] = 5
    with pytest.raises(ValueError, match="placeholders"):
        splice(torch.zeros(3, 7, 4), ids, b["attention_mask"], None, b["image_index"], torch.zeros(2, 2, 4), IMG)


@pytest.mark.parametrize("compressor", [NoCompression(), AvgPool2d(2)])
def test_loss_equals_per_sample_hf_computation(compressor):
    """Batched, padded loss == token-weighted mean of each sample run alone through plain HF."""
    model = tiny_lmm(compressor)
    b = toy_batch()
    out = model(b)
    total, count = 0.0, 0
    for i in range(3):
        n = int(b["attention_mask"][i].sum())
        ids, lab = b["input_ids"][i, :n], b["labels"][i, :n]
        emb = model.llm.embed(ids.masked_fill(ids == IMG, 0))
        if int(b["image_index"][i]) >= 0:
            vis = model.encode_images(b["pixel_values"][[int(b["image_index"][i])]])[0]
            p = int((ids == IMG).nonzero())
            emb = torch.cat([emb[:p], vis, emb[p + 1:]])
            lab = torch.cat([lab[:p], torch.full((len(vis),), IGNORE_INDEX), lab[p + 1:]])
        logits = model.llm.model(inputs_embeds=emb[None]).logits[0]
        ce = torch.nn.functional.cross_entropy(logits[:-1], lab[1:], reduction="sum", ignore_index=IGNORE_INDEX)
        total += float(ce)
        count += int((lab[1:] != IGNORE_INDEX).sum())
    assert out.num_targets == count
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    grid = 4 // (compressor.stride if isinstance(compressor, AvgPool2d) else 1)
    assert out.visual_in.tolist() == [grid * grid, grid * grid, 0]


def test_sample_result_independent_of_batch():
    model = tiny_lmm(AvgPool2d(2))
    b = toy_batch()
    full = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 4)[0]
    for i in range(3):
        n = int(b["attention_mask"][i].sum())
        img = int(b["image_index"][i])
        pv = b["pixel_values"][[img]] if img >= 0 else b["pixel_values"][:0]
        alone = model.generate(b["input_ids"][i:i + 1, :n], b["attention_mask"][i:i + 1, :n], pv,
                               torch.tensor([0 if img >= 0 else -1]), 4)[0]
        assert alone[0] == full[i]


def test_cached_generation_matches_full_recompute():
    model = tiny_lmm()
    b = toy_batch()
    tokens, seen = model.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 4)
    assert seen.shape == (3, 3) and seen[:, 0].tolist() == [16, 16, 16]
    for i in range(3):
        n = int(b["attention_mask"][i].sum())
        cur = b["input_ids"][i:i + 1, :n]
        img = int(b["image_index"][i])
        pv = b["pixel_values"][[img]] if img >= 0 else b["pixel_values"][:0]
        ref = []
        for _ in range(4):
            st = model.build_sequence(cur, torch.ones_like(cur), None, pv, torch.tensor([0 if img >= 0 else -1]))
            o, _, _ = model.llm.run_layers(st)
            t = int(model.next_token(model.llm.logits(o.hidden[0, -1])))
            ref.append(t)
            cur = torch.cat([cur, torch.tensor([[t]])], 1)
        assert tokens[i] == ref


def test_gradients_reach_trainable_parts():
    model = tiny_lmm().train()
    out = model(toy_batch())
    out.loss.backward()
    for name in ("projector", "llm"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads[:4])


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_real_size_parameter_counts_on_meta():
    with torch.device("meta"):
        clip = VisionEncoder.build(kind="clip", config=dict(
            image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
            num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu"))
        vicuna = LanguageModel.build(config=dict(
            model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
            max_position_embeddings=4096, tie_word_embeddings=False))
        proj = build_projector("mlp2x_gelu", 1024, 4096)
    assert next(clip.parameters()).device.type == "meta"
    # CLIP ViT-L/14-336 vision tower: 303.5M; Vicuna-7B: 6.74B; mlp2x_gelu: 1024*4096+4096 + 4096^2+4096.
    assert count(clip) == pytest.approx(303.5e6, rel=0.003)
    assert count(vicuna) == pytest.approx(6.738e9, rel=0.002)
    assert count(proj) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert clip.info.grid == 24 and clip.info.num_patches == 576


def test_seqstate_select_matches_per_sample_boolean_indexing():
    """SeqState.select's batched gather against the plain per-sample version: same fields, same
    right padding, gradients flow to the kept hidden states only."""
    from vtc.data.batch import IGNORE_INDEX
    from vtc.model.sequence import SeqState

    g = torch.Generator().manual_seed(0)
    B, T, d = 3, 9, 4
    lengths = torch.tensor([9, 6, 7])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    hidden = torch.randn(B, T, d, generator=g, requires_grad=True)
    state = SeqState(hidden=hidden, attention_mask=mask, position_ids=torch.arange(T).repeat(B, 1),
                     visual_mask=torch.rand(B, T, generator=g) < 0.5,
                     targets=torch.randint(0, 50, (B, T), generator=g), query_index=lengths - 1)
    keep = torch.rand(B, T, generator=g) < 0.6
    keep[torch.arange(B), lengths - 1] = True
    out = state.select(keep)
    k = keep & mask.bool()
    width = int(k.sum(1).max())
    for b in range(B):
        n = int(k[b].sum())
        assert out.attention_mask[b].tolist() == [1] * n + [0] * (width - n)
        assert torch.equal(out.hidden[b, :n], hidden[b][k[b]]) and not out.hidden[b, n:].any()
        assert out.position_ids[b, :n].tolist() == torch.arange(T)[k[b]].tolist()
        assert out.visual_mask[b, :n].tolist() == state.visual_mask[b][k[b]].tolist()
        assert out.targets[b, :n].tolist() == state.targets[b][k[b]].tolist()
        assert (out.targets[b, n:] == IGNORE_INDEX).all() and not out.visual_mask[b, n:].any()
        assert out.query_index[b] == n - 1
    out.hidden.sum().backward()
    assert torch.equal(hidden.grad, k[..., None].expand(-1, -1, d).float())
