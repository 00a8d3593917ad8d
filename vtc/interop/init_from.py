"""The Hydra side of reading a LLaVA directory: ``model.init_from=DIR`` (+ ``model.vision_tower_path``).

:func:`resolve_init_from` rewrites the run's config to describe the directory's model, before any
check or FLOPs count sees it; :func:`build_lmm_from_cfg` then builds that model with the
directory's weights (:func:`vtc.interop.load.build_from_spec`).
"""
from __future__ import annotations

import logging

from vtc.compressors.base import NoCompression
from vtc.interop.formats import LlavaLoadError, config_dict
from vtc.interop.load import build_from_spec, same_class
from vtc.interop.spec import read_spec
from vtc.lmm import LMM

log = logging.getLogger(__name__)


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
            if run is None or same_class(run, NoCompression()):
                cfg.compressor = OmegaConf.create(spec.compressor)
                log.info("model.init_from: the export's compressor %s (trained parameters) is used", spec.compressor)
            elif not same_class(run, spec.compressor.get("_target_")):
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
