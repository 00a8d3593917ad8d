"""LLaVA interoperability against transformers itself (vtc.interop).

The tests write their own tiny checkpoints from one random ``LlavaForConditionalGeneration``:
the transformers layout (``save_pretrained``) and the original-LLaVA layout (an LLM directory with
``mm_*`` config fields and ``model.mm_projector.*`` weights, sharded, plus a separate CLIP
directory holding text and vision towers, as openai/clip-vit-large-patch14-336 does). The
reference is always transformers' ``LlavaForConditionalGeneration`` loaded from the transformers
directory. Weights are drawn N(0, 0.2) (norms 1 + N(0, 0.1), LM head N(0, 1)) so that logits are O(1-10) and greedy choices are not ties.

Tolerances (float32, CPU, SDPA on both sides): logits max |diff| < 1e-4 (measured: 0 for loads
and exports; the same kernels run on the same numbers), pixels max |diff| < 1e-5 (measured
~1e-7: vtc divides by 255, transformers multiplies by 1/255; the resized uint8 images are
identical, both are PIL bicubic).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vtc.compressors import AvgPool2d, NoCompression
from vtc.interop import LlavaLoadError, load_llava
from vtc.interop.parity import hf_inputs, max_logit_diff, vtc_logits
from vtc.errors import ConfigError

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


def my_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(97, 61), (40, 130), (300, 200), (56, 57), (31, 31)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) % 256], -1)
        arr = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


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


# -- export ----------------------------------------------------------------------------------------
def image_settings():
    from vtc.interop.images import ImageSettings

    return ImageSettings(SIZE, tuple(MEAN), tuple(STD), True)


@pytest.mark.parametrize("compressor", ["none", "pool"])
def test_export_hf_loads_in_transformers_with_equal_logits(dirs, tmp_path, compressor):
    """A model trained with a parameter-free compressor exports to Llava; Llava runs it
    uncompressed; reading the export back with the same compressor gives the trained model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtc.eval.export import export_hf

    comp = AvgPool2d(2) if compressor == "pool" else NoCompression()
    L = load_llava(dirs["orig"], vision_tower_path=dirs["vision"], compressor=comp)
    m, tok = L.model, L.tokenizer
    with torch.no_grad():  # "training": move the weights away from the source checkpoint
        for p in m.projector.parameters():
            p.add_(0.05)
    out = str(tmp_path / "export")
    meta = export_hf(m, tok, out, image_settings())
    assert any("grown" in n for n in meta["notes"])  # <image> was past the 24-word vocabulary
    assert ("uncompressed" in " ".join(meta["notes"])) == (compressor == "pool")
    assert all(f.endswith(".safetensors") or not f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(out))
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = m.compressor
    m.compressor = NoCompression()
    try:
        assert diff(m, hf.eval(), tok) < TOL
    finally:
        m.compressor = saved
    # Round trip through vtc with the training compressor.
    back = load_llava(out, compressor=AvgPool2d(2) if compressor == "pool" else None)
    b = prompt_batch(tok)
    a, la = vtc_logits(m, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, lc = vtc_logits(back.model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert torch.equal(la, lc)
    V = a.shape[-1]
    assert max(float((a[i, :n] - c[i, :n, :V]).abs().max()) for i, n in enumerate(la.tolist())) < TOL
    # transformers' own processor from the export: <image> -> N tokens, the same pixels as vtc.
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    img = my_images()[0]
    enc = proc(text="USER : <image> what is in the picture ? ASSISTANT :", images=img, return_tensors="pt")
    assert int((enc["input_ids"] == m.image_token_id).sum()) == N
    assert float((enc["pixel_values"][0] - back.image_processor(img)).abs().max()) < 1e-5
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["suppress_tokens"] == [m.image_token_id]


@pytest.mark.parametrize("name", ["stf", "stf_mbtf"])
def test_export_vtc_round_trip_for_compressors_with_parameters(dirs, tmp_path, name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vtc.config import CONF_DIR
    from vtc.eval.export import export_hf, export_vtc, hf_blockers

    comp_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "compressor" / f"{name}.yaml"))
    L = load_llava(dirs["hf"], compressor=instantiate(comp_cfg))
    assert L.report.new and any("is the projector" in r for r in L.report.ignored)
    m, tok = L.model, L.tokenizer
    assert hf_blockers(m)
    with pytest.raises(ValueError, match="use --format vtc"):
        export_hf(m, tok, str(tmp_path / "no"), image_settings())
    out = str(tmp_path / "vtc")
    export_vtc(m, tok, out, image_settings(), comp_cfg)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["format"] == "vtc-lmm" and cfg["compressor"]["_target_"] == comp_cfg["_target_"]
    assert cfg["projector"] is None and cfg["compressor_has_params"]
    assert sorted(f for f in os.listdir(out) if "model" in f) == ["model.safetensors"]
    back = load_llava(out)  # the compressor comes from the directory
    assert type(back.model.compressor) is type(m.compressor) and not back.report.new
    b = prompt_batch(tok)
    a, la = vtc_logits(m, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(back.model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert all(torch.equal(a[i, :n], c[i, :n]) for i, n in enumerate(la.tolist()))
    with pytest.raises(LlavaLoadError, match="cannot replace"):
        load_llava(out, compressor=AvgPool2d(2))


def test_export_vtc_round_trip_keeps_a_frame_embedding(dirs, tmp_path):
    """projector.frame_embeddings: the Llava layout has no place for it (refused); vtc's keeps it."""
    from omegaconf import OmegaConf

    from vtc.config import CONF_DIR
    from vtc.data.batch import ITEM_VIDEO
    from vtc.data.collate import collate
    from vtc.eval.export import export_hf, export_vtc

    L = load_llava(dirs["hf"])
    m, tok = L.model, L.tokenizer
    m.frame_embedding = torch.nn.Embedding(4, m.llm.hidden_size)
    torch.nn.init.normal_(m.frame_embedding.weight)
    with pytest.raises(ValueError, match="frame embedding"):
        export_hf(m, tok, str(tmp_path / "no"), image_settings())
    out = str(tmp_path / "vtc")
    export_vtc(m, tok, out, image_settings(), OmegaConf.to_container(OmegaConf.load(CONF_DIR / "compressor/none.yaml")))
    back = load_llava(out)
    assert torch.equal(back.model.frame_embedding.weight, m.frame_embedding.weight) and not back.report.new
    ids = tok("USER : <image> what is in the picture ? ASSISTANT :")["input_ids"]
    g = torch.Generator().manual_seed(0)
    size = m.encoder.info.image_size
    b = collate([{"id": "v", "input_ids": ids, "labels": ids, "visual": [(ITEM_VIDEO, torch.randn(3, 3, size, size, generator=g))]}],
                pad_id=tok.pad_token_id, image_size=size)
    with torch.no_grad():
        assert torch.equal(m(b).loss, back.model(b).loss)


# -- the Hydra wiring: model.init_from -------------------------------------------------------------
def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vtc.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def test_init_from_rewrites_the_config_and_builds_the_same_model(dirs):
    from vtc.assembly.checks import check_config
    from vtc.data.tokenizer import load_tokenizer
    from vtc.interop.init_from import resolve_init_from
    from vtc.assembly.build import build_lmm

    cfg = compose(f"model.init_from={dirs['orig']}", f"model.vision_tower_path={dirs['vision']}",
                  "compressor=pool", "compressor.stride=2")
    resolve_init_from(cfg)
    assert cfg.encoder.path is None and cfg.encoder.pretrain is None and cfg.encoder.image_size == SIZE
    assert cfg.data.image_size == SIZE and list(cfg.data.image_mean) == MEAN and cfg.data.pad_to_square
    assert cfg.llm.tokenizer_path == dirs["orig"] == cfg.data.tokenizer_path
    assert cfg.projector.kind == "mlp2x_gelu" and cfg.llm.config.num_hidden_layers == 2
    info, depth = check_config(cfg)  # the checks see the real geometry
    assert (info.num_patches, depth) == (N, 2)
    tok = load_tokenizer(cfg.llm.tokenizer_path)
    model = build_lmm(cfg, tok).eval()
    ref = load_llava(dirs["orig"], vision_tower_path=dirs["vision"], compressor=AvgPool2d(2)).model
    b = prompt_batch(tok)
    a, la = vtc_logits(model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(ref, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert la.tolist()[:2] == [12 - 1 + 4, 7 - 1 + 4]  # pooled 4x4 -> 2x2 visual tokens
    assert torch.equal(a, c)
    # projector.frame_embeddings on a released LLaVA: a new table of that size, trained with the projector
    fe = compose(f"model.init_from={dirs['hf']}", "projector.frame_embeddings=4")
    resolve_init_from(fe)
    assert build_lmm(fe, load_tokenizer(fe.llm.tokenizer_path)).frame_embedding.num_embeddings == 4
    with pytest.raises(ConfigError, match="compressor.stride"):  # compressor checks use the loaded geometry
        check_config(resolve_init_from(compose(f"model.init_from={dirs['hf']}", "compressor=pool",
                                               "compressor.stride=3")))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_train_eval_export_through_the_clis(workspace, dirs, tmp_path):
    """train.py from a Llava directory with pool, then python -m vtc.eval.export (auto -> hf, --check)
    that transformers loads with equal logits, and eval.py of the checkpoint and of the export
    (model.init_from=EXPORT) on the same test shards: the same answer to every sample, the same
    test/acc and test/loss."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlavaForConditionalGeneration

    from vtc.eval.export import load_trained
    from vtc.metrics.exact_match import ExactMatchAccuracy

    run_dir = tmp_path / "run"
    workspace.run("train.py", f"model.init_from={dirs['hf']}", "compressor=pool", "compressor.stride=2",
                  "trainer.max_steps=2", "test=false", f"hydra.run.dir={run_dir}")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "vtc.eval.export", "--ckpt", str(ckpt), "--out", str(out), "--check"],
                          cwd=ROOT,
                          env=workspace.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(hf)" in proc.stdout and "max |logit difference|" in proc.stdout
    model, tok, image, cfg = load_trained(str(ckpt))
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    model.compressor = NoCompression()
    assert diff(model, hf, tok) < TOL
    assert json.load(open(out / "vtc_export.json"))["compressor"]["_target_"].endswith("AvgPool2d")

    # eval.py of the checkpoint and of the export agree sample by sample. A real check: the two share
    # no loading code (a Lightning checkpoint's state dict + its stored run config, vs the transformers
    # Llava directory read by vtc.interop with the tokenizer and image settings written by the export),
    # and each builds its own run config (the checkpoint's stored one vs train.yaml + data=llava +
    # the directory's geometry). Like with like: the hf export dropped the compressor (Llava runs
    # uncompressed), so the export is evaluated with the pool 2 the checkpoint was trained and is
    # evaluated with; both read the synthetic test split's shards, given by the same override.
    # The tiny Llava's 24-word vocabulary has no digits, so test/acc is 0 in both (measured); the
    # generated texts (several distinct ones) and the teacher-forced test/loss carry the comparison.
    root = Path(cfg.data.root)
    shards = sorted(str(p) for p in (root / "test").glob("*.tar"))
    n = json.load(open(root / "test" / "index.json"))["total"]
    assert shards and n == 32  # TINY's data.generate.n_test
    same = [f"+override.data.test_shards=[{','.join(shards)}]", "eval_batch_size=16", "cost.measure=false"]
    evals = {"ckpt": tmp_path / "eval_ckpt", "export": tmp_path / "eval_export"}
    workspace.run("eval.py", f"ckpt_path={ckpt}", *same, f"hydra.run.dir={evals['ckpt']}", tiny=False)
    workspace.run("eval.py", f"model.init_from={out}", "compressor=pool", "compressor.stride=2", *same,
                  f"hydra.run.dir={evals['export']}", tiny=False)
    preds = {k: read_jsonl(d / "predictions.jsonl") for k, d in evals.items()}
    assert len(preds["ckpt"]) == n and [p["question_id"] for p in preds["ckpt"]] == sorted(
        p["question_id"] for p in preds["ckpt"])
    assert preds["export"] == preds["ckpt"]  # question id, type, generated text and reference answer
    assert len({p["text"] for p in preds["ckpt"]}) > 1  # not one constant answer: the comparison sees the inputs
    runs = {k: [r for r in workspace.runs("eval") if r.data.tags.get("vtc.source") == os.path.abspath(src)]
            for k, src in (("ckpt", ckpt), ("export", out))}
    assert all(len(r) == 1 for r in runs.values()), {k: len(r) for k, r in runs.items()}
    ckpt_run, export_run = runs["ckpt"][0], runs["export"][0]
    assert export_run.data.tags["vtc.init_from"] == os.path.abspath(out) and "vtc.ckpt_path" in ckpt_run.data.tags
    for key in ("compressor._target_", "compressor.stride"):
        assert export_run.data.params[key] == ckpt_run.data.params[key], key
    m1, m2 = ckpt_run.data.metrics, export_run.data.metrics
    metric = ExactMatchAccuracy()  # the normalised exact match that test/acc logs
    metric.update([p["text"] for p in preds["ckpt"]], [p["answer"] for p in preds["ckpt"]])
    assert m1["test/acc"] == m2["test/acc"] == pytest.approx(float(metric.compute()))
    assert m1["test/visual_tokens"] == m2["test/visual_tokens"] == N // 4  # pooled 4x4 -> 2x2 in both
    assert m2["test/loss"] == pytest.approx(m1["test/loss"], abs=TOL)  # teacher-forced, all 32 answers


def test_export_cli_writes_vtc_for_stf_and_init_from_reads_it_back(dirs, tmp_path):
    """A checkpoint trained with STF (its fusion MLP is the projector): --format auto picks vtc,
    --format hf refuses, and model.init_from=EXPORT rebuilds the same model with STF."""
    from omegaconf import OmegaConf

    from vtc.data.tokenizer import load_tokenizer
    from vtc.eval.export import main
    from vtc.interop.init_from import resolve_init_from
    from vtc.assembly.build import build_lmm
    from vtc.train.task import build_module

    cfg = resolve_init_from(compose(f"model.init_from={dirs['hf']}", "compressor=stf", f"paths.output_dir={tmp_path}"))
    tok = load_tokenizer(cfg.llm.tokenizer_path)
    module = build_module(cfg, tok)
    ckpt = tmp_path / "stf.ckpt"  # what on_save_checkpoint stores, weights and config
    torch.save({"state_dict": module.state_dict(), "vtc": {"config": OmegaConf.to_yaml(cfg, resolve=True)}}, ckpt)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf"])
    out = tmp_path / "export"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--check"]) == 0
    assert json.load(open(out / "config.json"))["format"] == "vtc-lmm"
    with pytest.raises(SystemExit):  # never overwrites silently
        main(["--ckpt", str(ckpt), "--out", str(out)])
    cfg2 = resolve_init_from(compose(f"model.init_from={out}", f"paths.output_dir={tmp_path}"))
    assert cfg2.compressor._target_ == cfg.compressor._target_  # the run asked for none: the export's STF
    model2 = build_lmm(cfg2, load_tokenizer(cfg2.llm.tokenizer_path)).eval()
    b = prompt_batch(tok)
    a, la = vtc_logits(module.model.eval(), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(model2, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert all(torch.equal(a[i, :n], c[i, :n]) for i, n in enumerate(la.tolist()))
    with pytest.raises(ConfigError, match="cannot replace"):
        resolve_init_from(compose(f"model.init_from={out}", "compressor=pool"))


def test_siglip_tower_uses_the_full_strategy_and_exports_back(tmp_path):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from vtc.eval.export import export_hf

    src, out = str(tmp_path / "siglip"), str(tmp_path / "export")
    os.makedirs(src)
    V = make_tokenizer(src)
    torch.manual_seed(1)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=V + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, bos_token_id=2, eos_token_id=3),
        image_token_index=V, image_seq_length=N, vision_feature_select_strategy="full", vision_feature_layer=-1)
    hf = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 1.0 if name.startswith("lm_head") else 0.2)
    save_hf(hf, src, src)
    L = load_llava(src)
    assert L.model.encoder.family == "siglip" and L.model.encoder.info.num_patches == N
    assert diff(L.model, hf.eval(), L.tokenizer) < TOL
    export_hf(L.model, L.tokenizer, out, image_settings())
    assert json.load(open(os.path.join(out, "config.json")))["vision_feature_select_strategy"] == "full"
    back = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert diff(L.model, back, L.tokenizer) < TOL
    cfg_json = json.load(open(os.path.join(src, "config.json")))
    cfg_json["vision_feature_select_strategy"] = "default"
    write_json(os.path.join(src, "config.json"), cfg_json)
    with pytest.raises(LlavaLoadError, match="drops SigLIP's first patch"):
        load_llava(src)
