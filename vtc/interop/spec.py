"""What a LLaVA directory says about its model, from its configs alone (no weight is opened):
:func:`read_spec` -> :class:`LlavaSpec`.

Formats (detected from ``config.json``; see :mod:`vtc.interop`):

- ``hf``: transformers ``LlavaForConditionalGeneration``. Weight names in either layout
  transformers has used: ``model.vision_tower.*`` / ``model.multi_modal_projector.linear_{1,2}.*``
  / ``model.language_model.*`` / ``lm_head.*`` (in-memory 5.x) or ``vision_tower[.vision_model].*``
  / ``multi_modal_projector.*`` / ``language_model.model.*`` / ``language_model.lm_head.*`` (the
  layout on disk, llava-hf on the Hub). The image token is ``image_token_index``; the tokenizer
  in the directory must give ``<image>`` that id.
- ``llava``: original LLaVA (haotian-liu/LLaVA): an LLM directory (``model_type`` llava /
  llava_llama / llava_mistral / llava_qwen) with ``mm_vision_tower``, ``mm_projector_type``
  (LLaVA's default ``linear``), ``mm_vision_select_layer``, ``mm_vision_select_feature``
  (``patch``), ``mm_hidden_size``, ``image_aspect_ratio``; weights ``model.*``, ``lm_head.*``,
  ``model.mm_projector.{0,2}.*`` (mlp2x_gelu) or ``model.mm_projector.*`` (linear). The vision
  tower is a separate local CLIP directory: ``vision_tower_path`` (``model.vision_tower_path``),
  or ``mm_vision_tower`` itself when that is a local directory; a Hub id is never fetched.
  LLaVA's image token (-200) is not a vocabulary id: vtc uses the tokenizer's ``<image>``
  (``load_tokenizer`` adds it after the vocabulary; the model never embeds it).
- ``vtc``: written by ``python -m vtc.eval.export --format vtc``; the LMM's own state dict.

What is read from the config rather than from vtc's groups: the vision tower's architecture and
selected layer, the projector type, the LLM's architecture, the image token, and the image
preprocessing (``preprocessor_config.json``: size, crop, mean, std, resample; pad-to-square from
``do_pad`` or LLaVA's ``image_aspect_ratio``).

Strictness. Settings that would silently change the model are errors naming the field: a vision
feature layer list, ``vision_feature_select_strategy`` other than ``default`` for CLIP (``full``
keeps the CLS token) or ``full`` for SigLIP (``default`` drops its first patch),
``mm_vision_select_feature: cls_patch``, a projector activation other than GELU or without bias,
``mm_use_im_start_end``, ``mm_hidden_size`` or a tower name (``patch14-336``) that disagrees with
the vision directory, any-resolution tiling (LLaVA-NeXT), a non-bicubic or crop-after-resize
preprocessor (:mod:`vtc.interop.images`).

How the weights are then read: :mod:`vtc.interop.weights`; the model built: :mod:`vtc.interop.load`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from vtc.errors import ConfigError
from vtc.interop.formats import (
    VTC_FORMAT,
    VTC_FORMAT_VERSION,
    LlavaLoadError,
    config_dict,
    read_json,
    text_config_from_dict,
    vision_config_from_dict,
)
from vtc.interop.images import ImageSettings, image_for_directory
from vtc.model.encoder import _family, load_vision_config

# Original LLaVA model types -> the transformers text model they wrap.
ORIGINAL_TEXT_TYPES = {
    "llava": "llama",
    "llava_llama": "llama",
    "llama": "llama",
    "llava_mistral": "mistral",
    "mistral": "mistral",
    "llava_qwen": "qwen2",
    "llava_qwen2": "qwen2",
    "qwen2": "qwen2",
}
# Original-LLaVA config keys that are not the LLM's (dropped from its text config).
LLAVA_ONLY_KEYS = {
    "image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
    "tune_mm_vision_resampler", "use_mm_proj", "vision_tower", "tokenizer_model_max_length",
    "tokenizer_padding_side", "unfreeze_mm_vision_tower", "image_token_index", "image_crop_resolution",
    "image_split_resolution",
}


@dataclass
class LlavaSpec:
    """Everything about a LLaVA directory that its configs say (no weights read)."""

    format: str  # "hf" | "llava" | "vtc"
    root: str
    vision_kind: str  # "clip" | "siglip"
    vision_config: Any
    text_config: Any
    select_layer: int
    projector: str | None  # linear / mlp2x_gelu; None: the saved compressor is the projector
    image_token_id: int | None  # the checkpoint's image token id, None when not a vocabulary id
    tokenizer_dir: str
    image: ImageSettings
    vision_dir: str | None = None  # original LLaVA: where the vision tower's weights are
    compressor: dict | None = None  # vtc format: the saved compressor's config
    compressor_has_params: bool = False
    frame_embeddings: int = 0  # vtc format: the model's frame embedding (projector.frame_embeddings)
    notes: list[str] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2


def detect_format(raw: dict) -> str:
    """``hf``, ``llava`` or ``vtc``, from the keys of a directory's ``config.json``."""
    if raw.get("format") == VTC_FORMAT:
        return "vtc"
    if "mm_vision_tower" in raw or "mm_hidden_size" in raw or "mm_projector_type" in raw:
        return "llava"
    if raw.get("model_type") == "llava" or ("vision_config" in raw and "text_config" in raw):
        return "hf"
    raise LlavaLoadError(
        f"config.json is neither a transformers Llava config (model_type llava), an original LLaVA one "
        f"(mm_vision_tower, mm_projector_type, ...) nor a vtc export (format {VTC_FORMAT}); "
        f"model_type={raw.get('model_type')!r}")


def read_spec(root: str | os.PathLike, vision_tower_path: str | os.PathLike | None = None) -> LlavaSpec:
    """The configs of a LLaVA directory, checked; no weights are read."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ConfigError("model.init_from", f"directory {root!r} does not exist")
    cfg_path = os.path.join(root, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError("model.init_from", f"{root!r} has no config.json")
    raw = read_json(cfg_path)
    fmt = detect_format(raw)
    if fmt == "vtc":
        return _spec_vtc(root, raw)
    if fmt == "llava":
        return _spec_original(root, raw, None if vision_tower_path is None else os.fspath(vision_tower_path))
    return _spec_hf(root)


def _spec_hf(root: str) -> LlavaSpec:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(root, local_files_only=True)
    if cfg.model_type != "llava":
        raise LlavaLoadError(f"model_type {cfg.model_type!r}: only LlavaForConditionalGeneration directories "
                             "(model_type llava) are read; any-resolution tiling (LLaVA-NeXT) is not supported")
    vcfg = vision_config_from_dict(config_dict(cfg.vision_config))
    kind = _family(vcfg)
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise LlavaLoadError(f"vision_feature_layer={layer!r}: several feature layers concatenated are not supported")
    strategy = cfg.vision_feature_select_strategy
    if kind == "clip" and strategy != "default":
        raise LlavaLoadError(f"vision_feature_select_strategy={strategy!r} keeps CLIP's CLS token among the visual "
                             "tokens; vtc drops it (LLaVA's 'default' / 'patch'), which would change the model")
    if kind == "siglip" and strategy != "full":
        raise LlavaLoadError(f"vision_feature_select_strategy={strategy!r} drops SigLIP's first patch token (SigLIP "
                             "has no CLS); vtc keeps every patch ('full'), which would change the model")
    if cfg.projector_hidden_act != "gelu":
        raise LlavaLoadError(f"projector_hidden_act={cfg.projector_hidden_act!r}: vtc's mlp2x_gelu uses exact GELU")
    if not cfg.multimodal_projector_bias:
        raise LlavaLoadError("multimodal_projector_bias=false: vtc's projector has biases")
    notes: list[str] = []
    image = image_for_directory(root, vcfg, None, notes)
    spec = LlavaSpec("hf", root, kind, vcfg, cfg.text_config, layer, "mlp2x_gelu", int(cfg.image_token_index),
                     root, image, notes=notes)
    if cfg.image_seq_length != spec.num_patches:
        notes.append(f"image_seq_length {cfg.image_seq_length} != {spec.num_patches} patches (only the processor reads it)")
    return spec


_TOWER_RES = re.compile(r"-(\d{3})$")
_TOWER_PATCH = re.compile(r"patch(\d+)")


def _check_tower_name(name: str | None, vcfg) -> None:
    """A Hub id like ``openai/clip-vit-large-patch14-336`` states patch and resolution: a local
    tower that disagrees would change the number of visual tokens."""
    if not name:
        return
    base = str(name).rstrip("/").split("/")[-1]
    m = _TOWER_PATCH.search(base)
    if m and int(m.group(1)) != vcfg.patch_size:
        raise LlavaLoadError(f"mm_vision_tower {name!r} has patch {m.group(1)} but the vision directory's "
                             f"patch_size is {vcfg.patch_size}", key="model.vision_tower_path")
    m = _TOWER_RES.search(base)
    if m and int(m.group(1)) != vcfg.image_size:
        raise LlavaLoadError(f"mm_vision_tower {name!r} takes {m.group(1)} px but the vision directory's "
                             f"image_size is {vcfg.image_size}", key="model.vision_tower_path")


def _spec_original(root: str, raw: dict, vision_tower_path: str | None) -> LlavaSpec:
    model_type = raw.get("model_type", "llava_llama")
    text_type = ORIGINAL_TEXT_TYPES.get(model_type)
    if text_type is None:
        raise LlavaLoadError(f"model_type {model_type!r}: supported LLaVA LLMs are {sorted(ORIGINAL_TEXT_TYPES)}")
    if raw.get("mm_use_im_start_end"):
        raise LlavaLoadError("mm_use_im_start_end=true wraps the image in <im_start>/<im_end> tokens; not supported")
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise LlavaLoadError(f"mm_vision_select_feature={feature!r} keeps the CLS token; vtc drops it ('patch')")
    if "mm_vision_select_layer" not in raw:
        raise LlavaLoadError("config.json lacks mm_vision_select_layer")
    layer = int(raw["mm_vision_select_layer"])
    projector = raw.get("mm_projector_type", "linear")  # LLaVA's own default
    if not (projector in ("linear", "identity") or re.fullmatch(r"mlp\d+x_gelu", projector)):
        raise LlavaLoadError(f"mm_projector_type={projector!r}: supported are linear, identity, mlp<N>x_gelu")
    aspect = raw.get("image_aspect_ratio")
    if aspect not in (None, "pad", "square"):
        raise LlavaLoadError(f"image_aspect_ratio={aspect!r}: only pad (LLaVA-1.5) and square are supported")
    tower = raw.get("mm_vision_tower") or raw.get("vision_tower")
    vdir = vision_tower_path
    if vdir is None and tower and os.path.isdir(tower):
        vdir = tower
    if vdir is None:
        raise ConfigError("model.vision_tower_path",
                          f"{root}/config.json names mm_vision_tower={tower!r}, which is not a local directory; "
                          "give a local copy with model.vision_tower_path=DIR (nothing is fetched)")
    if not os.path.isdir(vdir):
        raise ConfigError("model.vision_tower_path", f"directory {vdir!r} does not exist")
    if not os.path.isfile(os.path.join(vdir, "config.json")):
        raise ConfigError("model.vision_tower_path", f"{vdir!r} has no config.json")
    vcfg = load_vision_config(vdir)
    kind = _family(vcfg)
    if kind != "clip":
        raise LlavaLoadError("original LLaVA drops the first token of its tower's features ('patch'); with a "
                             "SigLIP tower that is a patch, not a CLS token: not supported", key="model.vision_tower_path")
    _check_tower_name(tower, vcfg)
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vcfg.hidden_size:
        raise LlavaLoadError(f"mm_hidden_size={mm_hidden} but the vision tower at {vdir} is {vcfg.hidden_size} wide",
                             key="model.vision_tower_path")
    text_raw = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in LLAVA_ONLY_KEYS}
    text_raw["model_type"] = text_type
    tcfg = text_config_from_dict(text_raw)
    notes: list[str] = []
    image = image_for_directory(vdir, vcfg, aspect == "pad", notes)
    return LlavaSpec("llava", root, kind, vcfg, tcfg, layer, projector, None, root, image, vision_dir=vdir, notes=notes)


def _spec_vtc(root: str, raw: dict) -> LlavaSpec:
    version = raw.get("format_version", 1)
    if version > VTC_FORMAT_VERSION:
        raise LlavaLoadError(f"vtc export format_version {version} is newer than this code ({VTC_FORMAT_VERSION})")
    vcfg = vision_config_from_dict(raw["vision_config"])
    tcfg = text_config_from_dict(raw["text_config"])
    notes: list[str] = []
    image = image_for_directory(root, vcfg, None, notes)
    return LlavaSpec("vtc", root, _family(vcfg), vcfg, tcfg, int(raw["select_layer"]), raw.get("projector"),
                     raw.get("image_token_id"), root, image, compressor=raw.get("compressor"),
                     compressor_has_params=bool(raw.get("compressor_has_params")),
                     frame_embeddings=int(raw.get("frame_embeddings") or 0), notes=notes)
