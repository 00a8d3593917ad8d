"""Build vtc's ``LMM`` from a LLaVA directory: ``load_llava(dir)``, and :func:`build_from_spec`
under ``model.init_from`` (:mod:`vtc.interop.init_from`).

The vision tower and LLM are built from the :class:`~vtc.interop.spec.LlavaSpec` with uninitialised
weights, the tokenizer is checked against the LLM's vocabulary, and the weights are loaded by
:mod:`vtc.interop.weights`.

A compressor goes on top: a parameter-free one is training-free; one with parameters gets them
freshly initialised (reported as ``new``) unless the directory is a vtc export that holds them.
A compressor that is the projector (STF) replaces LLaVA's projector, whose weights are reported
as ignored.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from vtc.compressors.base import NoCompression
from vtc.data.image import ImageProcessor
from vtc.data.tokenizer import load_tokenizer
from vtc.interop.formats import IMAGE_TOKEN, LlavaLoadError
from vtc.interop.spec import LlavaSpec, read_spec
from vtc.interop.weights import LoadReport, load_weights, weight_sources
from vtc.lmm import LMM
from vtc.model.encoder import VisionEncoder
from vtc.model.llm import LanguageModel, resolve_attn_implementation

log = logging.getLogger(__name__)


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


def same_class(target, other) -> bool:
    """Whether two compressors, each an instance or a ``_target_`` path, are of one class."""
    from hydra.utils import get_class

    a = get_class(target) if isinstance(target, str) else type(target)
    b = get_class(other) if isinstance(other, str) else type(other)
    return a is b


def compressor_for(spec: LlavaSpec, compressor=None):
    """The compressor to put on top: ``compressor`` (an instance or a Hydra config dict), else for
    a vtc export whose compressor has trained parameters that one, else none."""
    from hydra.utils import instantiate

    if isinstance(compressor, dict):
        compressor = instantiate(compressor)
    if spec.format == "vtc" and spec.compressor_has_params:
        saved = spec.compressor or {}
        if compressor is None:
            return instantiate(saved)
        if not same_class(saved.get("_target_"), compressor):
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


def build_from_spec(spec: LlavaSpec, tokenizer, compressor=None, *, vision_dtype=None, llm_dtype=None,
                    vision_attn: str = "sdpa", llm_attn: str = "sdpa", strict: bool = True) -> tuple[LMM, LoadReport]:
    """The LMM ``spec`` describes, its weights loaded; ``report`` says where every tensor went."""
    compressor = compressor_for(spec, compressor)
    encoder = build_encoder(spec, vision_attn, vision_dtype)
    llm = build_llm(spec, llm_attn, llm_dtype)
    image_id = check_tokenizer(spec, tokenizer, llm.config.vocab_size)
    if spec.projector is None and not compressor.owns_projection:
        raise LlavaLoadError(f"{spec.root} holds no projector (its saved compressor {spec.compressor} was the "
                             f"projector); {type(compressor).__name__} needs one", key="compressor")
    model = LMM(encoder, llm, compressor, projector=spec.projector or "mlp2x_gelu", image_token_id=image_id,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                frame_embeddings=spec.frame_embeddings)
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
    directory (formats: :mod:`vtc.interop.spec`; the compressor: this module's docstring).
    ``compressor``: an instance or a Hydra config dict."""
    spec = read_spec(path, vision_tower_path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec.tokenizer_dir)
    model, report = build_from_spec(spec, tokenizer, compressor, vision_dtype=dtype, llm_dtype=dtype,
                                    vision_attn=attn_implementation, llm_attn=attn_implementation, strict=strict)
    log.info("%s", report.summary())
    return LoadedLlava(model.eval(), tokenizer, spec.image.processor(), spec, report)
