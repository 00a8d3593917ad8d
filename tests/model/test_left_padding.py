"""Padding layout does not matter (issue 22, item 5): a left-padded (or two-sided padded) batch
gives the same spliced sequence, loss, answer logits and greedy generations as the right-padded
one, for no compression, a pre-LLM and in-LLM compressors; a mask with a hole is rejected."""
import pytest
import torch

from vtc.compressors import AvgPool2d, NoCompression
from vtc.compressors.fastv import FastV
from vtc.compressors.vcc import VisualContextCompressor
from vtc.data.batch import IGNORE_INDEX
from tests.tiny import IMG, splice_images as splice, tiny_lmm

PAD = 0
# (prompt, answer, has image): different lengths, images at different places, text-only rows.
ROWS = [
    ([1, 5, IMG, 6, 7, 8], [9, 10, 11], True),
    ([1, IMG, 5], [6, 7], True),
    ([1, 5, 6, 7, 8, 9, 10, 12], [13], False),
    ([1, 8, IMG, 9, 14, 15, 16], [17, 18], True),
    ([1, 4], [3], False),
]


def pad(rows: list[list[int]], side: str, value: int, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest row (+ ``extra``) on the ``side`` ("right", "left" or "both")."""
    T = max(map(len, rows)) + extra
    ids = torch.full((len(rows), T), value, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        gap = T - len(r)
        s = {"right": 0, "left": gap, "both": gap // 2}[side]
        ids[b, s:s + len(r)] = torch.tensor(r)
        mask[b, s:s + len(r)] = 1
    return ids, mask


def make_batch(side: str, pad_id: int = PAD, extra: int = 0) -> dict:
    g = torch.Generator().manual_seed(0)
    full = [p + a for p, a, _ in ROWS]
    labs = [[IGNORE_INDEX] * len(p) + a for p, a, _ in ROWS]
    ids, mask = pad(full, side, pad_id, extra)
    labels, _ = pad(labs, side, IGNORE_INDEX, extra)
    gen_ids, gen_mask = pad([p for p, _, _ in ROWS], side, pad_id, extra)
    image_index, k = [], 0
    for _, _, has in ROWS:
        image_index.append(k if has else -1)
        k += has
    return dict(input_ids=ids, attention_mask=mask, labels=labels, gen_input_ids=gen_ids,
                gen_attention_mask=gen_mask, image_index=torch.tensor(image_index),
                pixel_values=torch.randn(k, 3, 56, 56, generator=g))


COMPRESSORS = {
    "none": lambda: NoCompression(),
    "avgpool": lambda: AvgPool2d(2),
    "vcc": lambda: VisualContextCompressor(layer=1, stride=4),
    "fastv": lambda: FastV(layer=1, ratio=0.5),
}
LAYOUTS = [("left", PAD, 0), ("both", PAD, 3), ("left", IMG, 2)]  # the last: pad slots hold <image> ids


def answer_logits(model, b):
    state = model.build_sequence(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"],
                                 b["image_index"])
    out, _, _ = model.llm.run_layers(state, model.compressor)
    valid = out.targets != IGNORE_INDEX
    return model.llm.logits(out.hidden[valid]), out.targets[valid]


@pytest.mark.parametrize("side,pad_id,extra", LAYOUTS)
def test_splice_state_independent_of_padding(side, pad_id, extra):
    right, other = make_batch("right"), make_batch(side, pad_id, extra)
    d = 8
    torch.manual_seed(0)
    table = torch.randn(64, d)
    visual = torch.randn(3, 5, d)
    for key_ids, key_mask, key_lab in (("input_ids", "attention_mask", "labels"),
                                       ("gen_input_ids", "gen_attention_mask", None)):
        st = [splice(table[b[key_ids]], b[key_ids], b[key_mask], b[key_lab] if key_lab else None,
                     b["image_index"], visual, IMG) for b in (right, other)]
        for f in ("hidden", "attention_mask", "position_ids", "visual_mask", "targets", "query_index"):
            x, y = getattr(st[0], f), getattr(st[1], f)
            assert (x is None and y is None) or torch.equal(x, y), f


@pytest.mark.parametrize("side,pad_id,extra", LAYOUTS)
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_loss_logits_generation_independent_of_padding(name, side, pad_id, extra):
    model = tiny_lmm(COMPRESSORS[name]())
    right, other = make_batch("right"), make_batch(side, pad_id, extra)
    with torch.no_grad():
        lr, lo = model(right), model(other)
        assert lr.num_targets == lo.num_targets == sum(len(a) for _, a, _ in ROWS)
        torch.testing.assert_close(lo.loss, lr.loss, rtol=1e-6, atol=1e-6)
        assert torch.equal(lo.visual_in, lr.visual_in) and torch.equal(lo.seen, lr.seen)
        (xr, tr), (xo, to) = answer_logits(model, right), answer_logits(model, other)
        assert torch.equal(tr, to)
        torch.testing.assert_close(xo, xr, rtol=1e-5, atol=1e-5)
    gens = [model.generate(b["gen_input_ids"], b["gen_attention_mask"], b["pixel_values"], b["image_index"], 6)
            for b in (right, other)]
    assert gens[0][0] == gens[1][0]
    assert torch.equal(gens[0][1], gens[1][1])


@pytest.mark.parametrize("hole", [(0, 3), (2, 1)])
def test_mask_with_a_hole_raises(hole):
    b = make_batch("left")
    row, back = hole
    mask = b["attention_mask"].clone()
    real = mask[row].nonzero().squeeze(1)
    mask[row, int(real[back])] = 0  # a zero inside the run of real tokens
    with pytest.raises(ValueError, match="contiguous"):
        splice(torch.zeros(*mask.shape, 4), b["input_ids"], mask, b["labels"], b["image_index"],
               torch.zeros(3, 2, 4), IMG)
    with pytest.raises(ValueError, match="holes"):
        tiny_lmm()(dict(b, attention_mask=mask))
