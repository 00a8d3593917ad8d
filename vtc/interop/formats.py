"""What vtc's LLaVA interop shares between reading and writing: the vtc export format's name and
version, the image token, :class:`LlavaLoadError`, and transformers configs to and from plain dicts.

Imported by the readers (:mod:`vtc.interop.spec` and the modules after it) and by the writer, :mod:`vtc.eval.export`, so that both sides agree on one spelling.
"""
from __future__ import annotations

import json

from vtc.errors import ConfigError
from vtc.model.encoder import load_vision_config

VTC_FORMAT = "vtc-lmm"
VTC_FORMAT_VERSION = 1
IMAGE_TOKEN = "<image>"

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


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
