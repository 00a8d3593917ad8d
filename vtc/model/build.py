"""Assemble an ``LMM`` from the Hydra config groups (encoder, llm, projector, compressor)."""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig

from vtc.config import node_kwargs
from vtc.model.lmm import LMM

# Keys of the encoder/llm groups that describe how to obtain the part, not how to build it.
ENCODER_META = ("pretrain", "image_size")
LLM_META = ("tokenizer_path",)


def build_lmm(cfg: DictConfig, tokenizer, training: bool = False) -> LMM:
    """``training``: also attach the member the schedule adds (``vtc.compose``); eval and export
    build the deployed model, which never has it."""
    from vtc.compose import build_compressors

    compressor, added = build_compressors(cfg, training=training)
    if (cfg.get("model") or {}).get("init_from"):  # a LLaVA / exported directory (vtc.interop.llava)
        from vtc.interop.llava import build_lmm_from_cfg

        model = build_lmm_from_cfg(cfg, tokenizer)
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
    )
