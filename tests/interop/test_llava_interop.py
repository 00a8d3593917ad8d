"""LLaVA interoperability against transformers itself (vtc.interop): loading, refusals, the image processor.

The tiny checkpoints (transformers and original-LLaVA layouts of one random Llava) and the
reference model are tests/interop/llava_dirs.py's; exports are tests/interop/test_llava_export.py.

Tolerances (float32, CPU, SDPA on both sides): logits max |diff| < 1e-4 (measured: 0 for loads
and exports; the same kernels run on the same numbers), pixels max |diff| < 1e-5 (measured
~1e-7: vtc divides by 255, transformers multiplies by 1/255; the resized uint8 images are
identical, both are PIL bicubic).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from PIL import Image

from tests.interop.llava_dirs import (
    my_images, SIZE, N, TOL, MEAN, STD, preprocessor, write_json, save_original, prompt_batch, diff, load
)
from tests.interop.llava_dirs import dirs, reference  # noqa: F401  (fixtures)
from vtc.errors import ConfigError
from vtc.interop import LlavaLoadError, load_llava
from vtc.interop.parity import hf_inputs, vtc_logits


# -- loading: logits and generation equal transformers' ------------------------------------------
@pytest.mark.parametrize("which", ["hf", "orig"])
def test_loaded_logits_equal_transformers_on_a_padded_batch(dirs, reference, which):
    L = load(dirs, which)
    m = L.model
    assert m.encoder.info.select_layer == -2 and m.projector_kind == "mlp2x_gelu"
    assert m.image_token_id == dirs["V"]  # in the vocabulary (hf) / just past it (original LLaVA's -200)
    assert not L.report.missing and not L.report.unexpected and not L.report.mismatched
    if which == "orig":
        assert m.llm.config.vocab_size == dirs["V"]
        assert any("rotary" in reason for reason in L.report.ignored)
        ignored = [n for names in L.report.ignored.values() for n in names]
        assert any(n.startswith("text_model.") for n in ignored)  # the CLIP text tower
    b = prompt_batch(L.tokenizer)
    assert diff(m, reference, L.tokenizer, b) < TOL
    # Both inputs come from one prompt: vtc's single placeholder = transformers' N image tokens.
    ids, mask, _ = hf_inputs(b["input_ids"], b["attention_mask"], b["image_index"], N, m.image_token_id, 0)
    assert (ids == m.image_token_id).sum(1).tolist() == [N, N, 0]
    logits, lengths = vtc_logits(m, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert lengths.tolist() == mask.sum(1).tolist()
    assert float(logits.abs().max()) > 1.0  # a test with near-zero logits would prove nothing


@pytest.mark.parametrize("which", ["hf", "orig"])
def test_greedy_generation_equals_transformers_generate(dirs, reference, which):
    L = load(dirs, which)
    tok, m = L.tokenizer, L.model
    b = prompt_batch(tok, seed=1)
    ours, _ = m.generate(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], max_new_tokens=8)
    ids, mask, order = hf_inputs(b["input_ids"], b["attention_mask"], b["image_index"], N, m.image_token_id,
                                 tok.pad_token_id)
    for i in range(3):
        n = int(mask[i].sum())
        img = int(b["image_index"][i])
        extra = {"pixel_values": b["pixel_values"][[img]]} if img >= 0 else {}  # no None: transformers 5.23 runs it
        out = reference.generate(input_ids=ids[i:i + 1, :n], attention_mask=mask[i:i + 1, :n], **extra,
                                 max_new_tokens=8, do_sample=False, suppress_tokens=[m.image_token_id],
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        theirs = out[0, n:].tolist()
        if tok.eos_token_id in theirs:
            theirs = theirs[:theirs.index(tok.eos_token_id)]
        assert ours[i] == theirs, (i, ours[i], theirs)
    assert any(len(t) >= 3 for t in ours)


def test_vision_layer_comes_from_the_config(dirs, tmp_path):
    """vision_feature_layer=-1 (not vtc's default -2) is used, and still matches transformers."""
    from transformers import LlavaForConditionalGeneration

    out = str(tmp_path / "hf_last")
    shutil.copytree(dirs["hf"], out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg["vision_feature_layer"] = -1
    write_json(os.path.join(out, "config.json"), cfg)
    L = load_llava(out)
    assert L.model.encoder.info.select_layer == -1
    hf = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert diff(L.model, hf, L.tokenizer) < TOL


@pytest.mark.parametrize("fmt", ["bin", "linear"])
def test_original_variants_pytorch_bin_and_linear_projector(dirs, reference, tmp_path, fmt):
    out = str(tmp_path / fmt)
    os.makedirs(out)
    save_original(reference, out, dirs["vision"], dirs["V"], projector="linear" if fmt == "linear" else "mlp2x_gelu",
                  fmt="bin" if fmt == "bin" else "safetensors")
    L = load_llava(out, vision_tower_path=dirs["vision"])
    if fmt == "bin":  # read with weights_only=True; same model as the safetensors copy
        assert diff(L.model, reference, L.tokenizer) < TOL
    else:
        proj = L.model.projector
        assert isinstance(proj, torch.nn.Linear)
        assert torch.equal(proj.weight, reference.model.multi_modal_projector.linear_1.weight)


# -- what would change the model is an error -----------------------------------------------------
def edited_hf(dirs, tmp_path, **fields):
    out = str(tmp_path / "edited")
    shutil.copytree(dirs["hf"], out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg.update(fields)
    write_json(os.path.join(out, "config.json"), cfg)
    return out


@pytest.mark.parametrize("fields, match", [
    ({"vision_feature_select_strategy": "full"}, "keeps CLIP's CLS"),
    ({"vision_feature_layer": [-2, -5]}, "several feature layers"),
    ({"projector_hidden_act": "gelu_pytorch_tanh"}, "exact GELU"),
    ({"multimodal_projector_bias": False}, "biases"),
    ({"model_type": "llava_next"}, "model_type"),
])
def test_hf_config_mismatch_is_an_error(dirs, tmp_path, fields, match):
    with pytest.raises((LlavaLoadError, ValueError), match=match):
        load_llava(edited_hf(dirs, tmp_path, **fields))


@pytest.mark.parametrize("fields, match", [
    ({"mm_vision_select_feature": "cls_patch"}, "CLS"),
    ({"mm_hidden_size": 64}, "mm_hidden_size=64"),
    ({"mm_use_im_start_end": True}, "im_start"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
    ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "336 px"),
    ({"mm_projector_type": "linear"}, "does not fit"),  # config says linear, weights are mlp2x_gelu
    ({"mm_projector_type": "mlp3x_gelu"}, "missing weights: projector.4"),
])
def test_original_config_mismatch_is_an_error(dirs, tmp_path, fields, match):
    out = str(tmp_path / "orig")
    shutil.copytree(dirs["orig"], out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    cfg.update(fields)
    write_json(os.path.join(out, "config.json"), cfg)
    with pytest.raises(LlavaLoadError, match=match):
        load_llava(out, vision_tower_path=dirs["vision"])


def test_original_needs_a_local_vision_tower(dirs):
    with pytest.raises(ConfigError, match="model.vision_tower_path: .*not a local directory"):
        load_llava(dirs["orig"])


def test_missing_and_unexpected_weights_are_named(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    out = edited_hf(dirs, tmp_path)
    path = os.path.join(out, "model.safetensors")
    sd = load_file(path)
    gone = next(k for k in sd if k.endswith("layers.1.mlp.down_proj.weight"))
    del sd[gone]
    sd["model.multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(LlavaLoadError) as e:
        load_llava(out)
    msg = str(e.value)
    assert "missing weights: llm.model.model.layers.1.mlp.down_proj.weight" in msg
    assert "unexpected weights: model.multi_modal_projector.linear_3.weight" in msg or "linear_3" in msg


def test_shape_mismatch_is_an_error(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    out = edited_hf(dirs, tmp_path)
    path = os.path.join(out, "model.safetensors")
    sd = load_file(path)
    k = next(k for k in sd if "linear_1.weight" in k)
    sd[k] = sd[k][:, :16].contiguous()
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(LlavaLoadError, match="shape mismatch"):
        load_llava(out)


# -- the image processor -------------------------------------------------------------------------
def expand2square(pil_img, background_color):
    """LLaVA's own (llava/mm_utils.py), copied for an independent reference."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


@pytest.mark.parametrize("which", ["hf", "orig"])
def test_image_processor_equals_clip_processor_after_llava_padding(dirs, which):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    L = load(dirs, which)
    proc = L.image_processor
    assert (proc.size, list(proc.mean), list(proc.std), proc.pad_to_square) == (SIZE, MEAN, STD, True)
    src = dirs["hf"] if which == "hf" else dirs["vision"]
    clip = CLIPImageProcessorPil.from_pretrained(src, local_files_only=True)
    worst = 0.0
    for img in my_images():
        ref = clip(expand2square(img, tuple(int(x * 255) for x in clip.image_mean)), return_tensors="pt")
        worst = max(worst, float((proc(img) - ref["pixel_values"][0]).abs().max()))
    assert worst < 1e-5, worst


def test_image_processor_rejects_what_it_cannot_reproduce():
    from vtc.interop import image_processor_from_config

    assert image_processor_from_config(preprocessor(), image_size=SIZE).size == SIZE
    for bad, match in [({"resample": 2}, "bicubic"), ({"size": {"shortest_edge": 64}}, "differ"),
                       ({"do_normalize": False}, "do_normalize")]:
        with pytest.raises(LlavaLoadError, match=match):
            image_processor_from_config({**preprocessor(), **bad}, image_size=SIZE)
    with pytest.raises(LlavaLoadError, match="vision tower takes 112"):
        image_processor_from_config(preprocessor(), image_size=112)
