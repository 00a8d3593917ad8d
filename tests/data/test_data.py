"""Data side: image preprocessing, templates, tokenizer, collate, and one DataModule test."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.data.batch import GEN_KEYS, IGNORE_INDEX, TRAIN_KEYS
from vtc.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor, fill_colour
from vtc.data.templates import VICUNA_SYSTEM, encode_conversation
from vtc.data.tokenizer import build_tiny_tokenizer, load_tokenizer

MEAN = np.array(CLIP_MEAN)
STD = np.array(CLIP_STD)


def hand_normalise(rgb_uint8: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> [3, H, W] float64, written out independently of the processor."""
    x = rgb_uint8.astype(np.float64) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


# ----------------------------------------------------------------------------- images


def test_pad_colour_and_centring_wide_and_tall():
    proc = ImageProcessor(size=21)
    fill = np.array(fill_colour(CLIP_MEAN), dtype=np.uint8)
    assert tuple(fill) == tuple(int(m * 255) for m in CLIP_MEAN)
    red = np.array([200, 10, 30], dtype=np.uint8)
    # 21 wide x 10 high: 11 rows of padding, 5 above ((21 - 10) // 2) and 6 below.
    wide = proc(Image.new("RGB", (21, 10), tuple(int(v) for v in red))).numpy()
    expect = np.empty((21, 21, 3), np.uint8)
    expect[:] = fill
    expect[5:15] = red
    np.testing.assert_allclose(wide, hand_normalise(expect), atol=1e-5)
    # tall: 10 wide x 21 high -> columns 5..14 hold the image
    tall = proc(Image.new("RGB", (10, 21), tuple(int(v) for v in red))).numpy()
    expect = np.empty((21, 21, 3), np.uint8)
    expect[:] = fill
    expect[:, 5:15] = red
    np.testing.assert_allclose(tall, hand_normalise(expect), atol=1e-5)


def test_normalisation_matches_hand_computation():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    out = ImageProcessor(size=12)(Image.fromarray(arr))
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, 12, 12)
    np.testing.assert_allclose(out.numpy(), hand_normalise(arr), atol=1e-5)
    # resizing goes through PIL bicubic, then the same normalisation
    out = ImageProcessor(size=6)(Image.fromarray(arr)).numpy()
    ref = np.asarray(Image.fromarray(arr).resize((6, 6), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(out, hand_normalise(ref), atol=1e-5)


MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "La",
         "RGBa", "I", "I;16", "I;16B", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_three_channels(mode):
    out = ImageProcessor(size=8)(Image.new(mode, (13, 7)))
    assert tuple(out.shape) == (3, 8, 8) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_alpha_and_wide_greyscale():
    proc = ImageProcessor(size=4)
    # fully transparent pixels look like padding (the mean colour)
    clear = proc(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).numpy()
    np.testing.assert_allclose(clear, hand_normalise(np.full((4, 4, 3), fill_colour(CLIP_MEAN), np.uint8)), atol=1e-5)
    # 16-bit white is white, not clipped garbage
    white16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    np.testing.assert_allclose(proc(white16).numpy(), hand_normalise(np.full((4, 4, 3), 255, np.uint8)), atol=1e-5)


def test_centre_crop_mode():
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, 5:15] = 255  # the centre 10x10 is white
    out = ImageProcessor(size=10, pad_to_square=False)(Image.fromarray(arr)).numpy()
    np.testing.assert_allclose(out, hand_normalise(np.full((10, 10, 3), 255, np.uint8)), atol=1e-5)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(["What is the digit in row 1, column 2?", "a cat", "seven 7", "yes no"], path)
    return load_tokenizer(path)


def test_tiny_tokenizer_specials_and_roundtrip(tok):
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids("<image>") == 4
    ids = tok("What is the digit?", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["What", "is", "the", "digit", "?"]
    assert tok.decode(ids) == "What is the digit ?"
    assert tok("a cat")["input_ids"][0] == tok.bos_token_id  # like Llama: <s> by default
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert tok.decode([7, tok.eos_token_id, 4], skip_special_tokens=True) == tok.decode([7])


def test_load_tokenizer_adds_image_and_pad(tmp_path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    t = load_tokenizer(tmp_path)
    assert t.convert_tokens_to_ids("<image>") == 4 and len(t) == 5
    assert t.pad_token == "<unk>" and t.pad_token_id == 0
    assert t("hello <image> hello", add_special_tokens=False)["input_ids"] == [3, 4, 3]


# ----------------------------------------------------------------------------- templates


def expected_labels(tok, ids):
    """Independent mask: supervised from after each 'ASSISTANT :' through the next '</s>'."""
    toks = tok.convert_ids_to_tokens(ids)
    out, inside = [], False
    for i, t in enumerate(toks):
        out.append(ids[i] if inside else IGNORE_INDEX)
        if t == "</s>":
            inside = False
        if t == ":" and i > 0 and toks[i - 1] == "ASSISTANT":
            inside = True
    return out


CONV2 = [
    {"from": "human", "value": "What is the <image> digit?"},
    {"from": "gpt", "value": "seven 7"},
    {"from": "human", "value": "a cat?"},
    {"from": "gpt", "value": "no"},
]


def test_vicuna_multi_turn_ids_and_labels(tok):
    enc = encode_conversation(tok, CONV2, "vicuna_v1", max_length=512, has_image=True)
    whole = ("<s>" + VICUNA_SYSTEM + " USER: What is the <image> digit? ASSISTANT: seven 7</s>"
             " USER: a cat? ASSISTANT: no</s>")
    # word-level tokenisation of the whole string equals the segment-wise ids
    assert enc["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    assert enc["labels"] == expected_labels(tok, enc["input_ids"])
    sup = [t for t in enc["labels"] if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(sup) == ["seven", "7", "</s>", "no", "</s>"]
    assert enc["input_ids"].count(tok.convert_tokens_to_ids("<image>")) == 1
    # generation prompt: everything up to and including the last 'ASSISTANT :'
    gen = enc["gen_input_ids"]
    assert enc["input_ids"][: len(gen)] == gen
    assert tok.convert_ids_to_tokens(gen[-2:]) == ["ASSISTANT", ":"]
    assert tok.convert_ids_to_tokens(enc["input_ids"][len(gen):]) == ["no", "</s>"]
    assert enc["answer"] == "no"


@pytest.mark.parametrize("system", ["", "Answer briefly."])
def test_vicuna_system_prompt_override(tok, system):
    enc = encode_conversation(tok, CONV2, "vicuna_v1", max_length=512, has_image=True, system=system)
    whole = ("<s>" + system + " USER: What is the <image> digit? ASSISTANT: seven 7</s>"
             " USER: a cat? ASSISTANT: no</s>")
    assert enc["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    assert enc["labels"] == expected_labels(tok, enc["input_ids"])
    default = encode_conversation(tok, CONV2, "vicuna_v1", max_length=512, has_image=True)
    n_default = len(tok(VICUNA_SYSTEM, add_special_tokens=False)["input_ids"])
    n_system = len(tok(system, add_special_tokens=False)["input_ids"]) if system else 0
    # only the prefix changes: the rest of the ids and every supervised token are the same
    assert len(default["input_ids"]) - len(enc["input_ids"]) == n_default - n_system
    assert enc["input_ids"][1 + n_system:] == default["input_ids"][1 + n_default:]
    assert enc["gen_input_ids"][1 + n_system:] == default["gen_input_ids"][1 + n_default:]
    # plain has no system prompt to override
    conv = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a cat"}]
    assert (encode_conversation(tok, conv, "plain", 64, system=system)
            == encode_conversation(tok, conv, "plain", 64))


def test_plain_template(tok):
    conv = [{"from": "human", "value": "<image>\nignored question"}, {"from": "gpt", "value": "a cat"}]
    enc = encode_conversation(tok, conv, "plain", max_length=64, has_image=True)
    cat = tok("a cat", add_special_tokens=False)["input_ids"]
    # the word-level tokenizer has no token for "\n": </s> closes the caption
    assert enc["input_ids"] == [tok.bos_token_id, 4, *cat, tok.eos_token_id]
    assert enc["labels"] == [IGNORE_INDEX, IGNORE_INDEX, *cat, tok.eos_token_id]
    assert enc["gen_input_ids"] == [tok.bos_token_id, 4] and enc["answer"] == "a cat"


def test_image_placeholder_rules(tok):
    conv = [{"from": "human", "value": "What is the digit?"}, {"from": "gpt", "value": "7"}]
    enc = encode_conversation(tok, conv, "vicuna_v1", None, has_image=True)  # inserted at the start
    toks = tok.convert_ids_to_tokens(enc["input_ids"])
    i = toks.index("<image>")
    assert toks[i - 2 : i + 2] == ["USER", ":", "<image>", "What"]
    assert 4 not in encode_conversation(tok, conv, "vicuna_v1", None, has_image=False)["input_ids"]
    with pytest.raises(ValueError, match="no image"):
        encode_conversation(tok, CONV2, "vicuna_v1", None, has_image=False)
    bad = [dict(CONV2[0]), dict(CONV2[1]), {"from": "human", "value": "<image> again"}, dict(CONV2[3])]
    with pytest.raises(ValueError, match="first human turn"):
        encode_conversation(tok, bad, "vicuna_v1", None, has_image=True)


@pytest.mark.parametrize("conv", [
    None, [], "text", [["human", "x"]], [{"from": "human"}],
    [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
    [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
    [{"from": "human", "value": "a"}],
    [{"from": "human", "value": 3}, {"from": "gpt", "value": "b"}],
])
def test_malformed_conversations(tok, conv):
    with pytest.raises(ValueError):
        encode_conversation(tok, conv, "vicuna_v1", 64, has_image=False)


def test_truncation_keeps_image(tok):
    full = encode_conversation(tok, CONV2, "vicuna_v1", None, has_image=True)
    pos = full["input_ids"].index(4)
    enc = encode_conversation(tok, CONV2, "vicuna_v1", pos + 3, has_image=True)
    assert enc["input_ids"] == full["input_ids"][: pos + 3] and enc["labels"] == full["labels"][: pos + 3]
    assert 4 in enc["input_ids"]
    gen = enc["gen_input_ids"]  # head through the image, then the tail ending with ASSISTANT:
    assert len(gen) == pos + 3 and gen[: pos + 1] == full["gen_input_ids"][: pos + 1]
    assert gen[pos + 1 :] == full["gen_input_ids"][-2:]
    with pytest.raises(ValueError, match="max_length"):
        encode_conversation(tok, CONV2, "vicuna_v1", pos, has_image=True)


# ----------------------------------------------------------------------------- collate


def test_collate_pads_and_indexes_images():
    from vtc.data.collate import collate

    img = torch.randn(3, 4, 4)
    a = {"id": "a", "input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7], "pixel_values": None,
         "gen_input_ids": [5], "answer": "x", "question_type": "cell"}
    b = {"id": "b", "input_ids": [5, 9, 6, 7, 8], "labels": [IGNORE_INDEX] * 3 + [7, 8], "pixel_values": img,
         "gen_input_ids": [5, 9, 6], "answer": "y"}
    out = collate([a, b], pad_id=0)
    assert set(out) == set(TRAIN_KEYS)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 9, 6, 7, 8]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX] * 3 + [7, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert out["visual_items"].tolist() == [[1, 0, 1, 0]] and torch.equal(out["pixel_values"][0], img)
    assert out["ids"] == ["a", "b"]
    assert all(out[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask", "visual_items"))
    gen = collate([a, b], pad_id=0, generation=True)
    assert set(gen) == set(TRAIN_KEYS) | set(GEN_KEYS)
    assert gen["gen_input_ids"].tolist() == [[5, 0, 0], [5, 9, 6]]
    assert gen["gen_attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]
    assert gen["answers"] == ["x", "y"] and gen["question_types"] == ["cell", ""]
    none = collate([a], pad_id=0, image_size=4)
    assert tuple(none["pixel_values"].shape) == (0, 3, 4, 4) and tuple(none["visual_items"].shape) == (0, 4)


# ----------------------------------------------------------------------------- datamodule


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_datamodule_batches_match_contract(tmp_path):
    from vtc.data.datamodule import VTCDataModule
    from vtc.synthetic.shards import generate

    root = tmp_path / "ds"
    generate(root, seed=1, n_train=64, n_val=10, n_test=6, image_size=42, grid=3, shard_size=16,
             workers=1, verbose=False)
    dm = VTCDataModule(root=str(root), template="vicuna_v1", image_size=28, batch_size=8,
                       eval_batch_size=4, num_workers=0, shuffle_buffer=16, seed=0, max_length=96,
                       val_max_samples=7)
    dm.setup("fit")
    image_id, pad = dm.image_token_id, dm.pad_token_id
    assert image_id == 4 and pad == 0
    train = dm.train_dataloader()
    assert len(train) == 64 // 8
    batches = list(train)
    assert len(batches) == 8
    for b in batches:
        assert set(b) == set(TRAIN_KEYS)
        B, T = b["input_ids"].shape
        assert B == 8 and b["labels"].shape == (B, T) and b["attention_mask"].shape == (B, T)
        assert b["pixel_values"].shape == (8, 3, 28, 28) and b["pixel_values"].dtype == torch.float32
        assert b["visual_items"].tolist() == [[i, i, 1, 0] for i in range(8)]
        assert ((b["input_ids"] == image_id).sum(1) == 1).all()
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert ((b["labels"] != IGNORE_INDEX).sum(1) >= 2).all()  # answer + </s>
        assert (b["input_ids"][b["attention_mask"] == 0] == pad).all()
    second = [i for b in train for i in b["ids"]]
    assert second != [i for b in batches for i in b["ids"]]  # the next epoch draws anew

    val = list(dm.val_dataloader())
    assert [len(b["ids"]) for b in val] == [4, 3]
    assert [i for b in val for i in b["ids"]] == [f"val_{k:06d}" for k in range(7)]
    for b in val:
        assert set(b) == set(TRAIN_KEYS) | set(GEN_KEYS)
        assert b["gen_input_ids"].shape[0] == len(b["answers"]) == len(b["question_types"])
        assert all(q in ("cell", "count", "relation") for q in b["question_types"])
    test_ids = [i for b in dm.test_dataloader() for i in b["ids"]]
    assert test_ids == [f"test_{k:06d}" for k in range(6)]
    assert dm.skipped == 0

    # data.system_prompt reaches every split's decoder: "" drops Vicuna's system prompt
    dm0 = VTCDataModule(root=str(root), template="vicuna_v1", system_prompt="", image_size=28, batch_size=8,
                        eval_batch_size=4, num_workers=0, shuffle_buffer=16, seed=0, max_length=96,
                        val_max_samples=7)
    dm0.setup("fit")
    n_sys = len(dm.tokenizer(VICUNA_SYSTEM, add_special_tokens=False)["input_ids"])
    for b0, b in zip(dm0.val_dataloader(), val):
        assert b0["ids"] == b["ids"]
        for k in ("input_ids", "gen_input_ids"):
            assert (b0[k] != pad).sum(1).tolist() == [n - n_sys for n in (b[k] != pad).sum(1).tolist()]

    # explicit shards: a broken image is skipped and counted; a .pyd member is never unpickled
    src = tarfile.open(root / "val" / "val-00000.tar")
    members = {m.name: src.extractfile(m).read() for m in src.getmembers()}
    bad = tmp_path / "bad-000.tar"
    with tarfile.open(bad, "w") as tar:
        _member(tar, "ok.jpg", members["val_000000.jpg"])
        _member(tar, "ok.json", members["val_000000.json"])
        _member(tar, "ok.pyd", b"\x80\x05 not a pickle")
        _member(tar, "broken.jpg", b"\xff\xd8 this is not a jpeg")
        _member(tar, "broken.json", members["val_000001.json"])
        _member(tar, "text.json", json.dumps({"conversations": [
            {"from": "human", "value": "What is the digit?"}, {"from": "gpt", "value": "7"}]}).encode())
    dm2 = VTCDataModule(val_shards=str(tmp_path / "bad-{000..000}.tar"), tokenizer_path=str(root / "tokenizer"),
                        template="plain", image_size=28, eval_batch_size=8)
    dm2.setup("validate")
    with pytest.warns(UserWarning, match="skipped sample"):
        (b,) = list(dm2.val_dataloader())
    assert b["ids"] == ["ok", "text"] and b["visual_items"].tolist() == [[0, 0, 1, 0]]
    assert b["pixel_values"].shape == (1, 3, 28, 28)
    assert dm2.skipped == 1
