"""``llm.lora``: LoRA on the LLM (vtc/model/lora.py), read from the config, checked, applied.

``check_lora`` runs in the config check (before data, model or MLflow run exist) and refuses:
a rank that is not a positive integer, an alpha that is not a positive number, a dropout outside
[0, 1), target names that are not linear layers of this LLM (or the LM head), and, for training,
``train_parts`` without ``llm`` (the adapters would never train) and the FSDP strategies (not
supported with adapters: see ``FSDP_NOTE``). ``apply_lora`` adds the adapters to a built ``LMM``.
"""
from __future__ import annotations

import logging

import torch
from omegaconf import DictConfig, OmegaConf

from vtc.errors import ConfigError
from vtc.model.llm import load_text_config
from vtc.model.lora import add_lora, linear_target_names, lora_parameter_count

log = logging.getLogger(__name__)

FSDP_NOTE = ("LoRA with trainer=fsdp / trainer=fsdp2 is not supported: each decoder layer is one FSDP unit "
             "and would mix frozen base weights with trainable adapters, and the sharded checkpoints and their "
             "consolidation are untested with adapters; use trainer=ddp (or trainer=gpu): with the base frozen, "
             "the optimizer state is the adapters' alone, so a 7B LLM in bf16 fits one GPU per rank")


def lora_settings(cfg: DictConfig) -> dict | None:
    """The ``llm.lora`` node as a plain dict, or None when LoRA is off (``r: null``, or a stored
    config from before LoRA existed, without the node)."""
    node = OmegaConf.select(cfg, "llm.lora", default=None)
    if node is None or node.get("r") is None:
        return None
    return OmegaConf.to_container(node, resolve=True)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _linear_names(cfg: DictConfig) -> list[str]:
    """The linear layers LoRA may adapt in the configured LLM, from a copy built on the meta
    device (no weights: real-size models cost nothing)."""
    from transformers import AutoModelForCausalLM

    path = OmegaConf.select(cfg, "llm.path", default=None)
    config = None if path is not None else OmegaConf.to_container(cfg.llm.config, resolve=True)
    if config is not None:
        config.setdefault("vocab_size", 32)  # the real vocabulary comes from the tokenizer later
    tcfg = load_text_config(path, config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tcfg, trust_remote_code=bool(cfg.llm.get("trust_remote_code")))
    return linear_target_names(model)


def check_lora(cfg: DictConfig, training: bool = True) -> None:
    lora = lora_settings(cfg)
    if lora is None:
        return
    r, alpha, dropout = lora.get("r"), lora.get("alpha"), lora.get("dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ConfigError("llm.lora.r", f"must be a positive integer (the adapters' rank; LLaVA-1.5: 128), or null "
                          f"for no LoRA, got {r!r}")
    if not _number(alpha) or alpha <= 0:
        raise ConfigError("llm.lora.alpha", f"must be a positive number (the adapters' output is scaled by "
                          f"alpha / r; LLaVA-1.5: 256 with r=128), got {alpha!r}")
    if not _number(dropout) or not 0 <= dropout < 1:
        raise ConfigError("llm.lora.dropout", f"must be in [0, 1) (LLaVA-1.5: 0.05), got {dropout!r}")
    targets = lora.get("target_modules")
    if targets is not None:
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError("llm.lora.target_modules", f"must be null (every linear layer but the LM head, as "
                              f"LLaVA) or a non-empty list of layer names, e.g. [q_proj, v_proj]; got {targets!r}")
        names = _linear_names(cfg)
        if "lm_head" in targets:
            raise ConfigError("llm.lora.target_modules", "lm_head: the LM head stays frozen, as LLaVA keeps it (tied "
                              f"to the embedding in some LLMs); choose among {names}")
        unknown = sorted(set(targets) - set(names))
        if unknown:
            raise ConfigError("llm.lora.target_modules", f"{unknown} are not linear layers of this LLM; choose "
                              f"among {names} (or null for all of them)")
    if not training:
        return
    parts = list(cfg.get("train_parts") or [])
    if "llm" not in parts:
        raise ConfigError("llm.lora.r", f"LoRA adapts the LLM, but train_parts={parts} freezes it, so the adapters "
                          "would never train; add llm to train_parts (its base weights stay frozen under LoRA), "
                          "or set llm.lora.r=null")
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    target = str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy or "")
    if "fsdp" in target.lower() or target.endswith("ModelParallelStrategy"):
        raise ConfigError("llm.lora.r", FSDP_NOTE)


def apply_lora(model, cfg: DictConfig) -> None:
    """Add the configured adapters to ``model.llm`` (an ``LMM``), if ``llm.lora.r`` is set."""
    lora = lora_settings(cfg)
    if lora is None:
        return
    targets = add_lora(model.llm, lora["r"], lora["alpha"], lora.get("dropout", 0.0), lora.get("target_modules"))
    log.info("LoRA on the LLM: r=%s, alpha=%s, dropout=%s on %s (%s adapter parameters)", lora["r"], lora["alpha"],
             lora.get("dropout", 0.0), targets, f"{lora_parameter_count(model.llm):,}")
