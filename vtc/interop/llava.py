"""Read LLaVA checkpoints into vtc's ``LMM``: ``load_llava(dir)`` and ``model.init_from=DIR``.

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
- ``vtc``: written by ``python -m vtc.export --format vtc``; the LMM's own state dict.

What is read from the config rather than from vtc's groups: the vision tower's architecture and
selected layer, the projector type, the LLM's architecture, the image token, and the image
preprocessing (``preprocessor_config.json``: size, crop, mean, std, resample; pad-to-square from
``do_pad`` or LLaVA's ``image_aspect_ratio``).

Strictness. Every weight is accounted for: loaded, ignored for a stated reason (e.g. the CLIP
text tower, rotary ``inv_freq`` buffers), unexpected, or missing. Missing weights and shape
mismatches are always errors (nothing is left randomly initialised), unexpected ones are errors
unless ``strict=False``. Settings that would silently change the model are errors naming the
field: a vision feature layer list, ``vision_feature_select_strategy`` other than ``default`` for
CLIP (``full`` keeps the CLS token) or ``full`` for SigLIP (``default`` drops its first patch),
``mm_vision_select_feature: cls_patch``, a projector activation other than GELU or without bias,
``mm_use_im_start_end``, ``mm_hidden_size`` or a tower name (``patch14-336``) that disagrees with
the vision directory, any-resolution tiling (LLaVA-NeXT), a non-bicubic or crop-after-resize
preprocessor.

A compressor goes on top: a parameter-free one is training-free; one with parameters gets them
freshly initialised (reported as ``new``) unless the directory is a vtc export that holds them.
A compressor that is the projector (STF) replaces LLaVA's projector, whose weights are reported
as ignored.
"""
from __future__ import annotations

import copy
import glob
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from vtc.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor
from vtc.errors import ConfigError
from vtc.model.encoder import VisionEncoder, _family, load_vision_config
from vtc.model.llm import LanguageModel, resolve_attn_implementation
from vtc.model.lmm import LMM

log = logging.getLogger(__name__)

VTC_FORMAT = "vtc-lmm"
VTC_FORMAT_VERSION = 1
IMAGE_TOKEN = "<image>"

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
# Bookkeeping keys of a transformers config that do not describe the architecture.
CONFIG_NOISE = {
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "id2label",
    "label2id", "output_attentions", "output_hidden_states", "return_dict", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "_attn_implementation", "_commit_hash",
}


class LlavaLoadError(ConfigError):
    """A LLaVA directory that cannot be read into vtc without changing the model."""

    def __init__(self, message: str, key: str = "model.init_from"):
        super().__init__(key, message)


# -- what a directory holds ---------------------------------------------------------------------
@dataclass
class ImageSettings:
    """vtc's image preprocessing (:class:`vtc.data.image.ImageProcessor`) for a model."""

    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_to_square: bool = True
    source: str = "default"

    def processor(self) -> ImageProcessor:
        return ImageProcessor(self.size, self.mean, self.std, self.pad_to_square)


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
    notes: list[str] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2


@dataclass
class LoadReport:
    """Where every weight went. ``check`` raises on anything that would change the model."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # model tensors no file provided
    unexpected: list[str] = field(default_factory=list)  # file tensors with no place in the model
    mismatched: list[str] = field(default_factory=list)  # same place, other shape
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> file tensors skipped for it
    new: list[str] = field(default_factory=list)  # compressor parameters initialised afresh
    notes: list[str] = field(default_factory=list)

    def check(self, strict: bool = True) -> None:
        problems = []
        if self.mismatched:
            problems.append(f"{len(self.mismatched)} shape mismatches: {_names(self.mismatched)}")
        if self.missing:
            problems.append(f"{len(self.missing)} missing weights: {_names(self.missing)}")
        if strict and self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected weights: {_names(self.unexpected)}")
        if problems:
            raise LlavaLoadError(f"{self.source} does not fit the model it describes; " + "; ".join(problems))

    def ignore(self, name: str, reason: str) -> None:
        self.ignored.setdefault(reason, []).append(name)

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        for name in ("missing", "unexpected", "mismatched", "new", "notes"):
            items = getattr(self, name)
            if items:
                lines.append(f"  {name} ({len(items)}): {_names(items)}")
        for reason, items in self.ignored.items():
            lines.append(f"  ignored, {reason} ({len(items)}): {_names(items, 5)}")
        return "\n".join(lines)


def _names(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# -- configs ------------------------------------------------------------------------------------
def config_dict(config, keep_type: bool = True) -> dict:
    """A transformers config as plain JSON data (architecture fields only)."""
    d = json.loads(config.to_json_string(use_diff=False))
    for k in CONFIG_NOISE:
        d.pop(k, None)
    if not keep_type:
        d.pop("model_type", None)
    return d


def vision_config_from_dict(d: dict):
    d = dict(d)
    model_type = d.pop("model_type", "clip_vision_model")
    if "vision_config" in d:  # a full CLIP / SigLIP config
        return vision_config_from_dict(d["vision_config"])
    kind = "siglip" if "siglip" in model_type else "clip" if "clip" in model_type else None
    if kind is None:
        raise LlavaLoadError(f"vision model_type {model_type!r} is not supported; vtc runs CLIP or SigLIP towers")
    for k in CONFIG_NOISE:
        d.pop(k, None)
    return load_vision_config(None, d, kind)


def text_config_from_dict(d: dict):
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if k not in CONFIG_NOISE}
    model_type = d.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, **d)


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def read_preprocessor(root: str) -> dict | None:
    """``preprocessor_config.json``, else the ``image_processor`` of ``processor_config.json``."""
    p = os.path.join(root, "preprocessor_config.json")
    if os.path.isfile(p):
        return _read_json(p)
    p = os.path.join(root, "processor_config.json")
    if os.path.isfile(p):
        return _read_json(p).get("image_processor")
    return None


def _edge(value, key: str, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value and not value.get("longest_edge"):
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise LlavaLoadError(f"{where}: {key}={value!r} is not a square size or a shortest edge")


def image_settings(pp: dict, image_size: int | None = None, pad_to_square: bool | None = None,
                   source: str = "preprocessor config") -> ImageSettings:
    """vtc image settings equal to a CLIP/Llava image processor config, or an error naming the
    field vtc's :class:`ImageProcessor` cannot reproduce. ``pad_to_square``: None = the config's
    ``do_pad`` (True when absent: LLaVA-1.5's ``image_aspect_ratio=pad``)."""
    where = source
    resample = pp.get("resample", 3)
    if int(resample) != 3:
        raise LlavaLoadError(f"{where}: resample={resample}; vtc's ImageProcessor resizes with PIL bicubic (3) only")
    if not pp.get("do_resize", True):
        raise LlavaLoadError(f"{where}: do_resize=false is not supported (images are always resized)")
    short = _edge(pp.get("size", {"shortest_edge": image_size or 224}), "size", where)
    crop = _edge(pp.get("crop_size", short), "crop_size", where) if pp.get("do_center_crop", True) else short
    if crop != short:
        raise LlavaLoadError(
            f"{where}: size {short} and crop_size {crop} differ: the processor resizes to {short} then crops "
            f"{crop}, vtc resizes straight to {crop}; the pixels would differ")
    if not pp.get("do_rescale", True) or not math.isclose(float(pp.get("rescale_factor", 1 / 255)), 1 / 255, rel_tol=1e-6):
        raise LlavaLoadError(f"{where}: pixels must be rescaled by 1/255 (do_rescale, rescale_factor)")
    if not pp.get("do_normalize", True):
        raise LlavaLoadError(f"{where}: do_normalize=false is not supported")
    if image_size is not None and crop != image_size:
        raise LlavaLoadError(f"{where}: images come out at {crop} px but the vision tower takes {image_size} px")
    mean = tuple(float(x) for x in pp.get("image_mean", CLIP_MEAN))
    std = tuple(float(x) for x in pp.get("image_std", CLIP_STD))
    pad = bool(pp.get("do_pad", True)) if pad_to_square is None else bool(pad_to_square)
    return ImageSettings(crop, mean, std, pad, source)  # type: ignore[arg-type]


def image_processor_from_config(pp: dict | str | os.PathLike, image_size: int | None = None,
                                pad_to_square: bool | None = None) -> ImageProcessor:
    """vtc's ImageProcessor from a ``preprocessor_config.json`` (a path, its directory, or the
    dict). See :func:`image_settings`."""
    source = "preprocessor config"
    if not isinstance(pp, dict):
        path = os.fspath(pp)
        source = path
        pp = read_preprocessor(path) if os.path.isdir(path) else _read_json(path)
        if pp is None:
            raise LlavaLoadError(f"{path} has no preprocessor_config.json or processor_config.json")
    return image_settings(pp, image_size, pad_to_square, source).processor()


def _image_for(root: str, vcfg, pad_to_square: bool | None, notes: list[str]) -> ImageSettings:
    pp = read_preprocessor(root)
    if pp is None:
        notes.append(f"no image processor config in {root}: CLIP mean/std at {vcfg.image_size} px")
        return ImageSettings(vcfg.image_size, pad_to_square=True if pad_to_square is None else pad_to_square)
    return image_settings(pp, vcfg.image_size, pad_to_square, os.path.join(root, "preprocessor_config.json"))


# -- reading a directory's configs ----------------------------------------------------------------
def detect_format(raw: dict) -> str:
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
    raw = _read_json(cfg_path)
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
    image = _image_for(root, vcfg, None, notes)
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
    image = _image_for(vdir, vcfg, aspect == "pad", notes)
    return LlavaSpec("llava", root, kind, vcfg, tcfg, layer, projector, None, root, image, vision_dir=vdir, notes=notes)


def _spec_vtc(root: str, raw: dict) -> LlavaSpec:
    version = raw.get("format_version", 1)
    if version > VTC_FORMAT_VERSION:
        raise LlavaLoadError(f"vtc export format_version {version} is newer than this code ({VTC_FORMAT_VERSION})")
    vcfg = vision_config_from_dict(raw["vision_config"])
    tcfg = text_config_from_dict(raw["text_config"])
    notes: list[str] = []
    image = _image_for(root, vcfg, None, notes)
    return LlavaSpec("vtc", root, _family(vcfg), vcfg, tcfg, int(raw["select_layer"]), raw.get("projector"),
                     raw.get("image_token_id"), root, image, compressor=raw.get("compressor"),
                     compressor_has_params=bool(raw.get("compressor_has_params")), notes=notes)


# -- weights --------------------------------------------------------------------------------------
def checkpoint_files(root: str) -> list[str]:
    """Weight files of a directory: safetensors preferred, then PyTorch ``.bin`` (read with
    ``weights_only=True``: tensors only, never code)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(root, index)
        if os.path.isfile(p):
            names = sorted(set(_read_json(p)["weight_map"].values()))
            return [os.path.join(root, n) for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(root, single)
        if os.path.isfile(p):
            return [p]
    shards = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if shards:
        return shards
    raise LlavaLoadError(f"{root} holds no weights (model.safetensors, shards with an index, or pytorch_model.bin)")


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, so memory holds the model plus one tensor."""
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
            yield from sd.items()
            del sd


Mapper = Callable[[str], tuple[str | None, str | None]]  # name -> (target, reason ignored)
ROTARY = "rotary buffer, recomputed from the config"


def _strip(s: str, prefix: str) -> str:
    return s[len(prefix):] if s.startswith(prefix) else s


def map_hf(name: str) -> tuple[str | None, str | None]:
    if name.endswith("rotary_emb.inv_freq"):
        return None, ROTARY
    for p in ("model.vision_tower.", "vision_tower."):
        if name.startswith(p):
            return "encoder.model." + _strip(name[len(p):], "vision_model."), None
    for p in ("model.multi_modal_projector.", "multi_modal_projector."):
        if name.startswith(p):
            rest = name[len(p):]
            for theirs, ours in (("linear_1.", "projector.0."), ("linear_2.", "projector.2.")):
                if rest.startswith(theirs):
                    return ours + rest[len(theirs):], None
            return None, None
    for p in ("model.language_model.", "language_model.model."):
        if name.startswith(p):
            return "llm.model.model." + name[len(p):], None
    for p in ("lm_head.", "language_model.lm_head."):
        if name.startswith(p):
            return "llm.model.lm_head." + name[len(p):], None
    return None, None


def map_original(name: str) -> tuple[str | None, str | None]:
    if name.endswith("rotary_emb.inv_freq"):
        return None, ROTARY
    if name.startswith("model.mm_projector."):
        return "projector." + name[len("model.mm_projector."):], None
    if name.startswith("model.vision_tower.vision_tower."):
        return "encoder.model." + _strip(name[len("model.vision_tower.vision_tower."):], "vision_model."), None
    if name.startswith(("model.vision_tower.", "model.vision_resampler.")):
        return None, None
    if name.startswith(("model.", "lm_head.")):
        return "llm.model." + name, None
    return None, None


VISION_TOP = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")


def map_vision_dir(name: str) -> tuple[str | None, str | None]:
    if name.startswith("vision_model."):
        return "encoder.model." + name[len("vision_model."):], None
    if name.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")):
        return None, "CLIP text tower / contrastive projection, not part of the vision tower"
    if name.startswith(VISION_TOP):
        return "encoder.model." + name, None
    return None, None


def map_vtc(name: str) -> tuple[str | None, str | None]:
    return name, None


def _fit(target: str, names) -> str:
    """Our name for ``target`` whichever way this transformers version nests the vision model."""
    if target in names or not target.startswith("encoder.model."):
        return target
    alt = "encoder.model.vision_model." + target[len("encoder.model."):]
    return alt if alt in names else target


def load_weights(model: LMM, sources: list[tuple[str, list[str], Mapper]], report: LoadReport) -> LoadReport:
    """Copy every mapped tensor into ``model`` (shape-checked), account for all the others."""
    sd = model.state_dict(keep_vars=True)
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    for n, t in sd.items():  # tied weights (lm_head = embed_tokens) count once
        canonical[n] = first.setdefault(id(t), n)
    filled: dict[str, str] = {}
    owns = model.compressor.owns_projection
    overridden = 0
    for label, files, mapper in sources:
        for name, tensor in iter_tensors(files):
            target, why = mapper(name)
            if target is None:
                report.ignore(name, why) if why else report.unexpected.append(name)
                continue
            if target.startswith("projector.") and owns:
                report.ignore(name, f"{type(model.compressor).__name__} is the projector")
                continue
            target = _fit(target, sd)
            if target not in sd:
                report.unexpected.append(name)
                continue
            dest = sd[target]
            if tuple(tensor.shape) != tuple(dest.shape):
                report.mismatched.append(f"{name} {tuple(tensor.shape)} vs {target} {tuple(dest.shape)}")
                continue
            with torch.no_grad():
                dest.data.copy_(tensor.to(dest.dtype))
            key = canonical[target]
            if key in filled and filled[key] != label:
                overridden += 1
            filled[key] = label
            report.loaded += 1
    if overridden:
        report.notes.append(f"{overridden} tensors of an earlier source replaced by a later one (e.g. a vision "
                            "tower fine-tuned inside the LLaVA checkpoint)")
    for n in sorted(set(canonical.values()) - set(filled)):
        (report.new if n.startswith("compressor.") else report.missing).append(n)
    return report


# -- building -------------------------------------------------------------------------------------
def _dtype(x) -> torch.dtype:
    if x is None:
        return torch.float32
    return x if isinstance(x, torch.dtype) else getattr(torch, str(x))


def build_encoder(spec: LlavaSpec, attn_implementation: str = "sdpa", dtype=None) -> VisionEncoder:
    """The vision tower of ``spec`` with uninitialised weights (they are loaded next)."""
    from transformers import CLIPVisionModel, SiglipVisionModel
    from transformers.initialization import no_init_weights

    cls = SiglipVisionModel if spec.vision_kind == "siglip" else CLIPVisionModel
    with no_init_weights():
        model = cls._from_config(copy.deepcopy(spec.vision_config),
                                 attn_implementation=resolve_attn_implementation(attn_implementation),
                                 dtype=_dtype(dtype))
    return VisionEncoder(model, spec.select_layer)


def build_llm(spec: LlavaSpec, attn_implementation: str = "sdpa", dtype=None) -> LanguageModel:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(spec.text_config), attn_implementation=resolve_attn_implementation(attn_implementation),
            dtype=_dtype(dtype))
    return LanguageModel(model)


def _same_class(target, other) -> bool:
    from hydra.utils import get_class

    a = get_class(target) if isinstance(target, str) else type(target)
    b = get_class(other) if isinstance(other, str) else type(other)
    return a is b


def compressor_for(spec: LlavaSpec, compressor=None):
    """The compressor to put on top: ``compressor`` (an instance or a Hydra config dict), else for
    a vtc export whose compressor has trained parameters that one, else none."""
    from hydra.utils import instantiate

    from vtc.compressors.base import NoCompression

    if isinstance(compressor, dict):
        compressor = instantiate(compressor)
    if spec.format == "vtc" and spec.compressor_has_params:
        saved = spec.compressor or {}
        if compressor is None:
            return instantiate(saved)
        if not _same_class(saved.get("_target_"), compressor):
            raise LlavaLoadError(
                f"{spec.root} was exported with {saved.get('_target_')}, whose trained parameters are part of the "
                f"model; {type(compressor).__name__} cannot replace it", key="compressor")
        return compressor
    return compressor if compressor is not None else NoCompression()


def check_tokenizer(spec: LlavaSpec, tokenizer, vocab_size: int) -> int:
    """The image placeholder id; the tokenizer must fit the LLM's vocabulary."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise LlavaLoadError(f"the tokenizer of {spec.tokenizer_dir} has no {IMAGE_TOKEN} token; load it with "
                             "vtc.data.tokenizer.load_tokenizer (which adds it)")
    if spec.image_token_id is not None and image_id != spec.image_token_id:
        raise LlavaLoadError(f"the tokenizer gives {IMAGE_TOKEN} id {image_id} but the config's image token is "
                             f"{spec.image_token_id}")
    beyond = [i for i in range(vocab_size, len(tokenizer)) if i != image_id]
    if beyond:
        raise LlavaLoadError(f"the tokenizer has {len(tokenizer)} ids but the LLM only {vocab_size} embeddings; "
                             f"ids {beyond[:5]} would have none")
    return image_id


def weight_sources(spec: LlavaSpec) -> list[tuple[str, list[str], Mapper]]:
    if spec.format == "hf":
        return [("llava-hf", checkpoint_files(spec.root), map_hf)]
    if spec.format == "llava":
        return [("vision tower", checkpoint_files(spec.vision_dir), map_vision_dir),
                ("llava", checkpoint_files(spec.root), map_original)]
    return [("vtc", checkpoint_files(spec.root), map_vtc)]


def build_from_spec(spec: LlavaSpec, tokenizer, compressor=None, *, vision_dtype=None, llm_dtype=None,
                    vision_attn: str = "sdpa", llm_attn: str = "sdpa", strict: bool = True) -> tuple[LMM, LoadReport]:
    compressor = compressor_for(spec, compressor)
    encoder = build_encoder(spec, vision_attn, vision_dtype)
    llm = build_llm(spec, llm_attn, llm_dtype)
    image_id = check_tokenizer(spec, tokenizer, llm.config.vocab_size)
    if spec.projector is None and not compressor.owns_projection:
        raise LlavaLoadError(f"{spec.root} holds no projector (its saved compressor {spec.compressor} was the "
                             f"projector); {type(compressor).__name__} needs one", key="compressor")
    model = LMM(encoder, llm, compressor, projector=spec.projector or "mlp2x_gelu", image_token_id=image_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    report = LoadReport(source=spec.root + (f" + {spec.vision_dir}" if spec.vision_dir else ""), notes=list(spec.notes))
    load_weights(model, weight_sources(spec), report)
    report.check(strict)
    return model, report


@dataclass
class LoadedLlava:
    model: LMM
    tokenizer: Any
    image_processor: ImageProcessor
    spec: LlavaSpec
    report: LoadReport


def load_llava(path: str | os.PathLike, vision_tower_path: str | os.PathLike | None = None, compressor=None, *,
               tokenizer=None, dtype=None, attn_implementation: str = "sdpa", strict: bool = True) -> LoadedLlava:
    """Build vtc's LMM (eval mode) from a transformers Llava, original-LLaVA or vtc-export
    directory; see the module docstring. ``compressor``: an instance or a Hydra config dict."""
    from vtc.data.tokenizer import load_tokenizer

    spec = read_spec(path, vision_tower_path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_dir)
    model, report = build_from_spec(spec, tokenizer, compressor, vision_dtype=dtype, llm_dtype=dtype,
                                    vision_attn=attn_implementation, llm_attn=attn_implementation, strict=strict)
    log.info("%s", report.summary())
    return LoadedLlava(model.eval(), tokenizer, spec.image.processor(), spec, report)


# -- the Hydra side: model.init_from --------------------------------------------------------------
def resolve_init_from(cfg):
    """With ``model.init_from`` set, rewrite the config (in place) to describe that directory's
    model, so every later step (checks, FLOPs, data, MLflow params) sees the real geometry:
    ``encoder`` (kind, select_layer, image_size, config; path/pretrain cleared), ``llm`` (config,
    tokenizer_path; path cleared), ``projector.kind``, ``data`` (tokenizer_path, image_mean,
    image_std, and pad_to_square unless given). The weights are read by :func:`build_lmm_from_cfg`. A vtc export
    whose compressor has parameters also sets ``compressor`` (when the run asked for none)."""
    from omegaconf import OmegaConf, open_dict

    root = OmegaConf.select(cfg, "model.init_from", default=None)
    if not root:
        return cfg
    spec = read_spec(root, OmegaConf.select(cfg, "model.vision_tower_path", default=None))
    with open_dict(cfg):
        enc = cfg.encoder
        enc.kind = spec.vision_kind
        enc.path = None
        enc.pretrain = None
        enc.select_layer = spec.select_layer
        enc.image_size = spec.vision_config.image_size
        enc.config = config_dict(spec.vision_config, keep_type=False)
        cfg.llm.path = None
        cfg.llm.config = config_dict(spec.text_config, keep_type=True)
        cfg.llm.tokenizer_path = spec.tokenizer_dir
        if spec.projector:
            cfg.projector.kind = spec.projector
        if cfg.get("data") is not None:
            cfg.data.tokenizer_path = spec.tokenizer_dir
            cfg.data.image_mean = list(spec.image.mean)
            cfg.data.image_std = list(spec.image.std)
            if cfg.data.get("pad_to_square") is None:  # +data.pad_to_square=... on the command line wins
                cfg.data.pad_to_square = spec.image.pad_to_square
        if spec.format == "vtc" and spec.compressor_has_params:
            run = OmegaConf.select(cfg, "compressor._target_", default=None)
            from vtc.compressors.base import NoCompression

            if run is None or _same_class(run, NoCompression()):
                cfg.compressor = OmegaConf.create(spec.compressor)
                log.info("model.init_from: the export's compressor %s (trained parameters) is used", spec.compressor)
            elif not _same_class(run, spec.compressor.get("_target_")):
                raise LlavaLoadError(f"{root} was exported with {spec.compressor.get('_target_')}, whose trained "
                                     f"parameters are part of the model; {run} cannot replace it", key="compressor")
    return cfg


def build_lmm_from_cfg(cfg, tokenizer) -> LMM:
    """``build_lmm`` for ``model.init_from``: architecture and weights from the directory, the
    compressor from ``cfg.compressor``, dtypes and attention kernels from ``cfg.encoder`` /
    ``cfg.llm``."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    spec = read_spec(cfg.model.init_from, OmegaConf.select(cfg, "model.vision_tower_path", default=None))
    model, report = build_from_spec(
        spec, tokenizer, instantiate(cfg.compressor),
        vision_dtype=cfg.encoder.get("dtype"), llm_dtype=cfg.llm.get("dtype"),
        vision_attn=cfg.encoder.get("attn_implementation") or "sdpa",
        llm_attn=cfg.llm.get("attn_implementation") or "sdpa",
    )
    log.info("model.init_from: %s", report.summary())
    return model
