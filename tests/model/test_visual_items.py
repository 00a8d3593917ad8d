"""Samples with any number of visual items, images and videos (docs/video.md): a mixed batch
(text only, one image, two images, one video, a video and an image) trains and generates exactly as
each sample alone, and a video's tokens are its frames encoded as images, concatenated in time
order."""
from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vtc.compressors import AvgPool2d
from vtc.cost.accounting import batch_flops, model_shape
from vtc.cost.flops import forward_flops
from vtc.data.batch import IGNORE_INDEX, ITEM_IMAGE, ITEM_VIDEO
from vtc.data.collate import collate
from vtc.data.decode import SampleDecoder, visual_members
from vtc.data.image import ImageProcessor
from vtc.data.skips import SampleError
from vtc.data.tokenizer import build_tiny_tokenizer

from tests.tiny import IMG, tiny_lmm

S = 56  # tiny_lmm's image size


def frames(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def sample(name: str, ids: list[int], answer_from: int, visual: list[tuple[int, torch.Tensor]]) -> dict:
    labels = [IGNORE_INDEX] * answer_from + ids[answer_from:]
    return {"id": name, "input_ids": ids, "labels": labels, "visual": visual,
            "gen_input_ids": ids[:answer_from], "answer": "x"}


SAMPLES = [
    sample("text", [1, 5, 6, 7, 8], 3, []),
    sample("image", [1, 5, IMG, 6, 7, 8], 4, [(ITEM_IMAGE, frames(1, 1))]),
    sample("two_images", [1, IMG, 5, IMG, 6, 7, 9], 5, [(ITEM_IMAGE, frames(1, 2)), (ITEM_IMAGE, frames(1, 3))]),
    sample("video", [1, 5, IMG, 6, 7], 3, [(ITEM_VIDEO, frames(3, 4))]),
    sample("video_image", [1, IMG, 5, IMG, 6, 8, 9], 5, [(ITEM_VIDEO, frames(2, 5)), (ITEM_IMAGE, frames(1, 6))]),
]


def per_sample_losses(lmm, batch) -> torch.Tensor:
    """Mean cross-entropy over each sample's own targets (the loss a batch of one reports)."""
    state = lmm.build_sequence(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"],
                               batch["visual_items"])
    out, _, _ = lmm.llm.run_layers(state, lmm.pipeline.active("llm"))
    losses = []
    for b in range(out.hidden.shape[0]):
        valid = out.targets[b] != IGNORE_INDEX
        losses.append(F.cross_entropy(lmm.llm.logits(out.hidden[b][valid]).float(), out.targets[b][valid]))
    return torch.stack(losses)


def test_collate_lays_out_every_frame_and_item():
    batch = collate(SAMPLES, pad_id=0)
    assert batch["pixel_values"].shape == (1 + 2 + 3 + 3, 3, S, S)
    assert batch["visual_items"].tolist() == [
        [1, 0, 1, ITEM_IMAGE], [2, 1, 1, ITEM_IMAGE], [2, 2, 1, ITEM_IMAGE], [3, 3, 3, ITEM_VIDEO],
        [4, 6, 2, ITEM_VIDEO], [4, 8, 1, ITEM_IMAGE]]
    assert torch.equal(batch["pixel_values"][3:6], SAMPLES[3]["visual"][0][1])


@pytest.mark.parametrize("compressor", [None, AvgPool2d(2)], ids=["none", "pool2"])
def test_a_mixed_batch_trains_as_each_sample_alone(compressor):
    lmm = tiny_lmm(compressor)
    with torch.no_grad():
        together = per_sample_losses(lmm, collate(SAMPLES, pad_id=0))
        alone = torch.cat([per_sample_losses(lmm, collate([s], pad_id=0)) for s in SAMPLES])
        assert torch.allclose(together, alone, atol=1e-5), (together, alone)
        # The model's own loss is the mean over all targets of the batch.
        n = torch.tensor([sum(t != IGNORE_INDEX for t in s["labels"][1:]) for s in SAMPLES], dtype=torch.float)
        assert torch.allclose(lmm(collate(SAMPLES, pad_id=0)).loss, (together * n).sum() / n.sum(), atol=1e-5)


def test_a_mixed_batch_generates_as_each_sample_alone():
    lmm = tiny_lmm(AvgPool2d(2))
    batch = collate(SAMPLES, pad_id=0, generation=True)
    tokens, _ = lmm.generate(batch["gen_input_ids"], batch["gen_attention_mask"], batch["pixel_values"],
                             batch["visual_items"], max_new_tokens=4)
    for i, s in enumerate(SAMPLES):
        one = collate([s], pad_id=0, generation=True)
        alone, _ = lmm.generate(one["gen_input_ids"], one["gen_attention_mask"], one["pixel_values"],
                                one["visual_items"], max_new_tokens=4)
        assert tokens[i] == alone[0], s["id"]


def test_a_video_is_its_frames_encoded_as_images_in_time_order():
    lmm = tiny_lmm(AvgPool2d(2))
    video = SAMPLES[3]
    batch = collate([video], pad_id=0)
    with torch.no_grad():
        state = lmm.build_sequence(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"],
                                   batch["visual_items"])
        # independent: each frame alone through encoder, compressor and projector, then concatenated
        expect = torch.cat([lmm.encode_images(f[None])[0] for f in video["visual"][0][1]])
    vis = state.hidden[0][state.visual_mask[0]]
    assert vis.shape == (3 * 4, lmm.llm.config.hidden_size)  # 3 frames x (4x4 patches pooled by 2 = 4)
    assert torch.allclose(vis, expect, atol=1e-6)
    assert state.visual_mask[0].nonzero().squeeze(1).tolist() == list(range(2, 2 + 12))  # one span, at the placeholder


def test_placeholders_and_items_must_match():
    bad = sample("bad", [1, IMG, 5, 6], 3, [(ITEM_IMAGE, frames(1, 1)), (ITEM_IMAGE, frames(1, 2))])
    with pytest.raises(ValueError, match="1 <image> placeholders and 2 visual item"):
        tiny_lmm()(collate([bad], pad_id=0))


# -- the decoder: shard members -> items (docs/video.md) ------------------------------------------------

def jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (28, 28), colour).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok = build_tiny_tokenizer(["what is in the clip and the image red green blue"], str(path))
    return SampleDecoder(tok, "vicuna_v1", None, ImageProcessor(28, (0.5,) * 3, (0.5,) * 3, True),
                         require_supervision=True, system_prompt="")


def record(human: str, answer: str = "red") -> bytes:
    return json.dumps({"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}).encode()


def test_members_are_grouped_by_item_in_index_and_time_order():
    raw = {"vid0.002.jpg": b"", "vid0.000.jpg": b"", "vid0.001.jpg": b"", "img1.jpg": b"", "img0.jpg": b"",
           "vid1.000.jpg": b"", "json": b""}
    assert visual_members(raw) == {"image": [["img0.jpg"], ["img1.jpg"]],
                                   "video": [["vid0.000.jpg", "vid0.001.jpg", "vid0.002.jpg"], ["vid1.000.jpg"]]}


def test_decoder_reads_videos_and_images_in_placeholder_order(decoder):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    raw = {"__key__": "k", "json": record("what is in the <video> and the <image>"),
           "vid0.000.jpg": jpeg(colours[0]), "vid0.001.jpg": jpeg(colours[1]), "img0.jpg": jpeg(colours[2])}
    out = decoder(raw)
    kinds = [k for k, _ in out["visual"]]
    assert kinds == [ITEM_VIDEO, ITEM_IMAGE]
    video, image = out["visual"][0][1], out["visual"][1][1]
    assert video.shape == (2, 3, 28, 28) and image.shape == (1, 3, 28, 28)
    # frame 0 is red, frame 1 green, the image blue: the dominant channel of each (normalised to [-1, 1])
    assert [int(f.mean((1, 2)).argmax()) for f in video] == [0, 1] and int(image[0].mean((1, 2)).argmax()) == 2
    assert sum(t == decoder.tokenizer.convert_tokens_to_ids("<image>") for t in out["input_ids"]) == 2


def test_decoder_refuses_a_count_mismatch(decoder):
    raw = {"__key__": "k", "json": record("what is in the <image> and the <image>"), "img0.jpg": jpeg((255, 0, 0))}
    with pytest.raises(SampleError) as e:
        decoder(raw)
    assert e.value.reason == "record"


def test_training_flops_count_the_tower_once_per_frame():
    """batch_flops against forward_flops by hand: a 3-frame video runs the vision tower 3 times."""
    lmm = tiny_lmm(AvgPool2d(2)).train()
    out = lmm(collate([SAMPLES[3]], pad_id=0))  # the video: 3 frames x 4 tokens
    assert out.frames.tolist() == [3] and out.visual_in.tolist() == [12]
    shape = model_shape(lmm)
    got = batch_flops(shape, out.lengths, out.visual_in, out.seen, out.targets_per_sample, frames_per_sample=out.frames)
    one = forward_flops(shape, text_tokens=int(out.lengths[0]) - 12, visual_tokens_per_layer=out.seen[:, 0].tolist(),
                        projector_tokens=12, lm_head_tokens=int(out.targets_per_sample[0]))
    assert got == pytest.approx(one["total"] + 2 * one["vision"], rel=1e-12) and one["vision"] > 0
