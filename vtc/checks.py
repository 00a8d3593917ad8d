"""Reject configurations that cannot work before any model is built or any data is read.

Every error is a ``ConfigError`` whose message starts with the key to change.
"""
from __future__ import annotations

import os

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo, encoder_info, load_vision_config
from vtc.model.llm import load_text_config


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise ConfigError(key, "is required but not set (???); give it on the command line, e.g. "
                          f"{key}=/path/to/model") from None


def encoder_info_from_cfg(cfg: DictConfig) -> EncoderInfo:
    enc = cfg.encoder
    path = _get(cfg, "encoder.path")
    pretrain = OmegaConf.select(cfg, "encoder.pretrain")
    if path is not None and not os.path.isdir(path):
        if not pretrain:
            raise ConfigError("encoder.path", f"directory {path!r} does not exist; point it at a local model folder")
        path = None  # produced by the pre-training stage from encoder.config
    vcfg = load_vision_config(path, OmegaConf.to_container(enc.config, resolve=True) if path is None else None, enc.kind)
    info = encoder_info(vcfg, enc.select_layer)
    if enc.get("image_size") is not None and enc.image_size != info.image_size:
        raise ConfigError(
            "encoder.image_size",
            f"{enc.image_size} differs from the model's own {info.image_size} px; set encoder.image_size={info.image_size}",
        )
    return info


def llm_depth_from_cfg(cfg: DictConfig) -> int:
    path = _get(cfg, "llm.path")
    config = None if path is not None else OmegaConf.to_container(cfg.llm.config, resolve=True)
    if config is not None:
        config.setdefault("vocab_size", 32)  # the real vocabulary comes from the tokenizer later
    return load_text_config(path, config).num_hidden_layers


def _local(url: str) -> str | None:
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url or url.startswith("pipe:") else url


def check_data_paths(cfg: DictConfig) -> None:
    """Local shard patterns and data roots must exist (URLs are left to the loader)."""
    from braceexpand import braceexpand

    data = cfg.get("data") or {}
    if data.get("root") and not data.get("generate") and not os.path.isdir(data.root):
        raise ConfigError("data.root", f"directory {data.root!r} does not exist")
    for key in ("train_shards", "val_shards", "test_shards"):
        pattern = OmegaConf.select(cfg, f"data.{key}", throw_on_missing=False)
        if pattern in (None, "???"):
            continue
        patterns = list(pattern) if not isinstance(pattern, str) else [pattern]
        for pat in patterns:
            for url in braceexpand(pat):
                path = _local(url)
                if path is not None and not os.path.exists(path):
                    raise ConfigError(f"data.{key}", f"shard {path!r} does not exist (from {pat!r})")


def check_generate(cfg: DictConfig) -> None:
    """The synthetic set's training rounds: train_turns >= 1, 0 <= train_readout < train_turns
    (readouts are follow-up rounds), checked here so a bad value fails before data is generated."""
    gen = OmegaConf.select(cfg, "data.generate")
    if not gen:
        return
    turns, readout = gen.get("train_turns", 1), gen.get("train_readout", 0)
    if turns < 1:
        raise ConfigError("data.generate.train_turns", f"must be >= 1, got {turns}")
    if not 0 <= readout < turns:
        raise ConfigError("data.generate.train_readout",
                          f"must be in 0..{turns - 1} (readouts are follow-up rounds of the "
                          f"data.generate.train_turns={turns} rounds), got {readout}")


def check_config(cfg: DictConfig) -> tuple[EncoderInfo, int]:
    info = encoder_info_from_cfg(cfg)
    depth = llm_depth_from_cfg(cfg)
    data_size = OmegaConf.select(cfg, "data.image_size")
    if data_size is not None and data_size != info.image_size:
        raise ConfigError(
            "data.image_size",
            f"{data_size} px images cannot go into an encoder built for {info.image_size} px; "
            f"set data.image_size={info.image_size}",
        )
    check_data_paths(cfg)
    check_generate(cfg)
    if "compile_llm" in cfg:
        from vtc.model.compile import should_compile

        should_compile(cfg.compile_llm, "cpu", 0)  # a bad value fails here, naming the key
    compressor = instantiate(cfg.compressor)
    compressor.check(info, depth)
    if compressor.needs_cls and not info.has_cls:
        raise ConfigError(
            "compressor",
            f"{type(compressor).__name__} reads the CLS token, which encoder={cfg.encoder.kind} does not have",
        )
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if max_steps is not None and max_steps != -1 and max_steps <= 0:
        raise ConfigError("trainer.max_steps", f"must be positive (or -1 for epochs), got {max_steps}")
    for key in ("data.batch_size", "data.eval_batch_size"):
        v = OmegaConf.select(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(key, f"must be positive, got {v}")
    return info, depth
