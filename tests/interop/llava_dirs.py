"""Tiny LLaVA checkpoints for the interop tests, and the eval / predict tests that read them.

One random ``LlavaForConditionalGeneration`` written in both layouts (fixture ``dirs``): the
transformers layout (``save_pretrained``) and the original-LLaVA layout (an LLM directory with
``mm_*`` config fields and ``model.mm_projector.*`` weights, sharded, plus a separate CLIP
directory holding text and vision towers, as openai/clip-vit-large-patch14-336 does); the
reference (fixture ``reference``) is transformers' own model loaded from the transformers
directory. Weights are drawn N(0, 0.2) (norms 1 + N(0, 0.1), LM head N(0, 1)) so that logits are
O(1-10) and greedy choices are not ties.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.interop import load_llava
from vtc.interop.parity import max_logit_diff

WORDS = ["USER", "ASSISTANT", ":", "what", "is", "in", "the", "picture", "?", "a", "cat", "dog", "red", "blue",
         "car", "tree", ".", "one", "two", "three"]
SIZE, PATCH, N = 56, 14, 16  # 4x4 patches
TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.26, 0.27]  # not CLIP's: proves they are read


def make_tokenizer(out: str) -> int:
    """A word-level Llama-style tokenizer WITHOUT <image> (as Vicuna's); returns its size."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>", padding_side="right")
    hf.save_pretrained(out)
    return len(vocab)


def preprocessor(size_format: str = "dict") -> dict:
    if size_format == "int":  # the openai/clip-vit-*-336 layout
        return {"crop_size": SIZE, "size": SIZE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD, "resample": 3}
    return {"crop_size": {"height": SIZE, "width": SIZE}, "size": {"shortest_edge": SIZE}, "do_center_crop": True,
            "do_normalize": True, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_convert_rgb": True, "image_processor_type": "CLIPImageProcessor", "image_mean": MEAN,
            "image_std": STD, "resample": 3}


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def save_hf(model, out: str, tokenizer_dir: str) -> None:
    from vtc.data.tokenizer import load_tokenizer

    model.save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(out)  # gains <image> at id V
    write_json(os.path.join(out, "preprocessor_config.json"), preprocessor())


def save_original(hf_model, out: str, vdir: str, V: int, projector: str = "mlp2x_gelu", fmt: str = "safetensors",
                  tower: str = "local/clip-vit-tiny-patch14", **extra) -> None:
    """The original-LLaVA layout of ``hf_model``: LLM weights (vocabulary without <image>),
    model.mm_projector.*, rotary buffers as old checkpoints hold them; vision tower elsewhere."""
    from safetensors.torch import save_file

    make_tokenizer(out)
    sd = hf_model.state_dict()
    w = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            w["model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            w[k] = v
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"][:V]
    w["lm_head.weight"] = w["lm_head.weight"][:V]
    if projector == "mlp2x_gelu":
        for i, j in ((1, 0), (2, 2)):
            for p in ("weight", "bias"):
                w[f"model.mm_projector.{j}.{p}"] = sd[f"model.multi_modal_projector.linear_{i}.{p}"]
    else:
        w["model.mm_projector.weight"] = sd["model.multi_modal_projector.linear_1.weight"]
        w["model.mm_projector.bias"] = sd["model.multi_modal_projector.linear_1.bias"]
    w["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    w = {k: v.contiguous().clone() for k, v in w.items()}
    if fmt == "safetensors":  # two shards with an index, as a 7B checkpoint is stored
        names = sorted(w)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        index = {"metadata": {}, "weight_map": {}}
        for i, part in enumerate(halves):
            fname = f"model-0000{i + 1}-of-00002.safetensors"
            save_file({k: w[k] for k in part}, os.path.join(out, fname), metadata={"format": "pt"})
            index["weight_map"].update({k: fname for k in part})
        write_json(os.path.join(out, "model.safetensors.index.json"), index)
    else:
        torch.save(w, os.path.join(out, "pytorch_model.bin"))
    text = hf_model.config.text_config.to_dict()
    text.update(vocab_size=V, model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                mm_vision_tower=tower, mm_projector_type=projector, mm_vision_select_layer=-2,
                mm_vision_select_feature="patch", mm_hidden_size=hf_model.config.vision_config.hidden_size,
                mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad",
                tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, mm_patch_merge_type="flat")
    text.update(extra)
    write_json(os.path.join(out, "config.json"), text)


def save_clip_dir(hf_model, out: str) -> None:
    """A full CLIP checkpoint (text + vision towers) whose vision tower is ``hf_model``'s."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1),
                     vision_config=hf_model.config.vision_config.to_dict(), projection_dim=16)
    clip = CLIPModel(cfg)
    missing, unexpected = clip.vision_model.load_state_dict(hf_model.model.vision_tower.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    clip.save_pretrained(out)
    write_json(os.path.join(out, "preprocessor_config.json"), preprocessor("int"))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """One random Llava in both layouts: {'hf', 'orig', 'vision', 'V', 'hf_model'}."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    root = tmp_path_factory.mktemp("llava")
    orig, hf_dir, vision = str(root / "orig"), str(root / "hf"), str(root / "clip")
    os.makedirs(orig)
    V = make_tokenizer(orig)
    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4)
    tcfg = LlamaConfig(vocab_size=V + 1, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=2, eos_token_id=3, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=V, image_seq_length=N)
    model = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 1.0 if name.startswith("lm_head") else 0.2)
    save_hf(model, hf_dir, orig)
    shutil.rmtree(orig)
    os.makedirs(orig)
    save_original(model, orig, vision, V)
    save_clip_dir(model, vision)
    return {"root": root, "hf": hf_dir, "orig": orig, "vision": vision, "V": V}


@pytest.fixture(scope="module")
def reference(dirs):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(dirs["hf"], local_files_only=True).eval()


def prompt_batch(tokenizer, seed: int = 0) -> dict:
    """Three samples, right-padded: image mid-prompt, image first (shorter), text only."""
    t = tokenizer.convert_tokens_to_ids
    rows = [["<s>", "USER", ":", "<image>", "what", "is", "in", "the", "picture", "?", "ASSISTANT", ":"],
            ["<s>", "<image>", "a", "red", "car", "ASSISTANT", ":"],
            ["<s>", "USER", ":", "two", "blue", "tree", "ASSISTANT", ":"]]
    T = max(map(len, rows))
    ids = torch.full((3, T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor([t(w) for w in r])
        mask[b, :len(r)] = 1
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, attention_mask=mask, image_index=torch.tensor([0, 1, -1]),
                pixel_values=torch.randn(2, 3, SIZE, SIZE, generator=g))


def diff(model, hf, tokenizer, b=None) -> float:
    b = b or prompt_batch(tokenizer)
    return max_logit_diff(model, hf, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"],
                          model.encoder.info.num_patches, tokenizer.pad_token_id)


def load(dirs, which: str, **kw):
    if which == "orig":
        return load_llava(dirs["orig"], vision_tower_path=dirs["vision"], **kw)
    return load_llava(dirs[which], **kw)


def my_images() -> list[Image.Image]:
    """Five odd-sized noisy gradient images (not square: LLaVA's padding matters)."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(97, 61), (40, 130), (300, 200), (56, 57), (31, 31)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
        arr = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out
