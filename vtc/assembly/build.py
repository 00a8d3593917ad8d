"""Build what a config describes: the ``LMM`` from the Hydra config groups (encoder, llm,
projector, compressor; or a LLaVA directory, ``model.init_from``), the same model on the meta
device (shapes only: FLOPs tables, FSDP plans), and the data module."""
from __future__ import annotations

import functools
import os

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vtc.assembly.compressors import build_compressors
from vtc.assembly.lora import apply_lora
from vtc.config import compose_conf, node_kwargs
from vtc.data.tokenizer import load_tokenizer
from vtc.interop.init_from import build_lmm_from_cfg
from vtc.lmm import LMM

# Keys of the encoder/llm groups that describe how to obtain the part, not how to build it.
ENCODER_META = ("pretrain", "image_size")
LLM_META = ("tokenizer_path", "lora")  # lora: adapters added to the built LLM (vtc.assembly.lora)


def build_lmm(cfg: DictConfig, tokenizer, training: bool = False) -> LMM:
    """``training``: also attach the member the schedule adds (``vtc.assembly.compressors``); eval and export
    build the deployed model, which never has it. With ``llm.lora.r`` set, the LLM gets its LoRA
    adapters last, whichever way it was built (so a LoRA checkpoint's keys fit)."""
    model = _build_lmm(cfg, tokenizer, training)
    apply_lora(model, cfg)
    return model


def _build_lmm(cfg: DictConfig, tokenizer, training: bool) -> LMM:
    compressor, added = build_compressors(cfg, training=training)
    if (cfg.get("model") or {}).get("init_from"):  # a LLaVA / exported directory (vtc.interop.init_from)
        model = build_lmm_from_cfg(cfg, tokenizer)
        n = int(cfg.projector.get("frame_embeddings") or 0)
        if n:  # a released LLaVA has none: a new one, fine-tuned with the projector
            model.add_frame_embedding_table(n)
        if added is not None:
            model.stage_compressor = added
            model.pipeline.check(model.encoder.info, model.llm.num_layers)
        return model
    enc_kwargs = node_kwargs(cfg.encoder, drop=ENCODER_META)
    if cfg.encoder.get("pretrain"):
        enc_kwargs["config"] = None  # the pre-trained copy at `path` is the model
    encoder = instantiate(enc_kwargs)
    llm_kwargs = node_kwargs(cfg.llm, drop=LLM_META)
    if llm_kwargs.get("path") is None:
        # A config-built LLM gets exactly the tokenizer's vocabulary.
        llm_kwargs["config"]["vocab_size"] = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            llm_kwargs["config"].setdefault(name, getattr(tokenizer, name))
    llm = instantiate(llm_kwargs)
    return LMM(
        encoder,
        llm,
        compressor,
        projector=cfg.projector.kind,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        stage_compressor=added,
        frame_embeddings=int(cfg.projector.get("frame_embeddings") or 0),
    )


def build_datamodule(cfg: DictConfig):
    """The configured ``VTCDataModule`` (``data.generate`` describes how the synthetic set was made,
    not how to read it)."""
    return instantiate(node_kwargs(cfg.data, drop=("generate",)))


# -- on the meta device ---------------------------------------------------------------------------

ASSUMED_VOCAB = 32000  # LLaMA / Vicuna's vocabulary: the guess when nothing on disk says otherwise


@functools.lru_cache(maxsize=8)
def _tokenizer_len(path: str) -> int:
    return len(load_tokenizer(path))  # with <image> added, exactly as train.py sizes the LLM


def meta_vocab(cfg) -> tuple[int, str]:
    """(vocabulary of the configured LLM's LM head, where that number comes from), decided as
    ``build_lmm`` decides it: a config-built LLM (no ``llm.path``, no ``model.init_from``) gets
    exactly its tokenizer's length, whatever its config says; an LLM read from a directory (or a
    released model's config, copied in by ``resolve_init_from``) has its config's ``vocab_size``."""
    given = OmegaConf.select(cfg, "llm.config.vocab_size", default=None)
    from_dir = (OmegaConf.is_missing(cfg.llm, "path") or cfg.llm.get("path") is not None
                or bool(OmegaConf.select(cfg, "model.init_from", default=None)))
    if from_dir and given is not None:
        return int(given), "the LLM config's vocab_size"
    try:
        tok_path = OmegaConf.select(cfg, "llm.tokenizer_path", default=None)
    except Exception:  # noqa: BLE001 - it interpolates a mandatory path left unset (llm.path=???)
        tok_path = None
    if tok_path and os.path.isdir(str(tok_path)):
        return _tokenizer_len(str(tok_path)), f"the tokenizer's length ({tok_path})"
    if given is not None:
        return int(given), f"the LLM config's vocab_size (no tokenizer at {tok_path})"
    return ASSUMED_VOCAB, (f"ASSUMED: no tokenizer at {tok_path} (`python train.py` with the same data "
                           "config builds it), so the LM head's FLOPs are a guess")


def build_meta(cfg, compressor_cfg):
    """An LMM on the meta device from the config's own fields; only the tokenizer is read (its
    length is the vocabulary of a config-built LLM, ``meta_vocab``)."""
    vocab, _ = meta_vocab(cfg)
    cfg = cfg.copy()
    OmegaConf.update(cfg, "encoder.path", None)  # shapes come from the config fields, not files
    OmegaConf.update(cfg, "llm.path", None)
    enc_kw = node_kwargs(cfg.encoder, drop=("pretrain", "image_size"))
    llm_kw = node_kwargs(cfg.llm, drop=LLM_META)
    llm_kw["config"]["vocab_size"] = vocab
    llm_kw["attn_implementation"] = "sdpa"
    # Plain dicts for the builders: a released model's config has nested fields (rope_parameters)
    # that transformers' strict config classes refuse as DictConfig.
    enc_kw["_convert_"] = llm_kw["_convert_"] = "all"
    with torch.device("meta"):
        encoder = instantiate(enc_kw)
        llm = instantiate(llm_kw)
        return LMM(encoder, llm, instantiate(compressor_cfg), projector=cfg.projector.kind,
                   frame_embeddings=int(cfg.projector.get("frame_embeddings") or 0))


def meta_lmm(overrides: list[str]):
    """The configured LMM on the meta device (no weights, no files), parts frozen as
    ``train_parts`` says, as LMMModule freezes them."""
    cfg = compose_conf("train", overrides)
    lmm = build_meta(cfg, cfg.compressor)
    for part in ("encoder", "compressor", "projector", "llm"):
        for module in lmm.part_modules(part):
            for p in module.parameters():
                p.requires_grad_(part in cfg.train_parts)
    return lmm
