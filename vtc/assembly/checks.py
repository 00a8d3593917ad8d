"""Reject configurations that cannot work before any model is built or any data is read.

Every error is a ``ConfigError`` whose message starts with the key to change.
"""
from __future__ import annotations

import importlib.util
import os

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from vtc.assembly.compressors import check_compression
from vtc.assembly.lora import check_lora
from vtc.distributed.activation_checkpointing import parse_parts
from vtc.errors import ConfigError
from vtc.model.compile import should_compile
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


def check_frame_embeddings(cfg: DictConfig) -> None:
    """``projector.frame_embeddings``: an integer >= 0, and no fewer than a synthetic video set's frames."""
    n = OmegaConf.select(cfg, "projector.frame_embeddings") or 0
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError("projector.frame_embeddings", f"must be an integer >= 0 (frames a video may have), got {n!r}")
    gen = OmegaConf.select(cfg, "data.generate") or {}
    if gen.get("kind") == "video" and n and gen.get("frames", 0) > n:
        raise ConfigError("projector.frame_embeddings", f"embeds {n} frame indices, but the clips have "
                          f"data.generate.frames={gen.get('frames')}; set projector.frame_embeddings="
                          f"{gen.get('frames')} (or 0: no frame embedding)")


def check_config(cfg: DictConfig, training: bool = True) -> tuple[EncoderInfo, int]:
    """``training=False`` (eval.py on a stored run config): the deployed model only, without the
    training schedule's member and the splits only training reads."""
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
    check_frame_embeddings(cfg)
    check_generate(cfg)
    check_data_requirements(cfg, training)
    check_loggers(cfg)
    if "compile_llm" in cfg:
        should_compile(cfg.compile_llm, "cpu", 0)  # a bad value fails here, naming the key

    check_compression(cfg, info, depth, training)  # the chain, the schedule's stages, kernels, strategy
    if training:
        check_activation_checkpointing(cfg)
        check_fsdp1_clipping(cfg)
    check_lora(cfg, training)  # llm.lora: rank, alpha, dropout, target layers, train_parts, strategy
    max_steps = OmegaConf.select(cfg, "trainer.max_steps")
    if max_steps is not None and max_steps != -1 and max_steps <= 0:
        raise ConfigError("trainer.max_steps", f"must be positive (or -1 for epochs), got {max_steps}")
    for key in ("data.batch_size", "data.eval_batch_size"):
        v = OmegaConf.select(cfg, key)
        if v is not None and v <= 0:
            raise ConfigError(key, f"must be positive, got {v}")
    return info, depth


def check_activation_checkpointing(cfg: DictConfig) -> None:
    """``activation_checkpointing``: a list of parts; not the LLM's layers with ``compile_llm`` on
    (the checkpoint would recompute the eager layer in backward, which saves other tensors than the
    compiled one: torch stops the step with a CheckpointError); under FSDPStrategy, a policy that
    reads the knob (conf/trainer/fsdp.yaml), since that strategy checkpoints by itself."""
    parts = parse_parts(cfg.get("activation_checkpointing"))
    if not parts:
        return
    compile_llm = cfg.get("compile_llm", False)
    if "llm" in parts and should_compile(compile_llm, OmegaConf.select(cfg, "trainer.accelerator") or "cpu",
                                         OmegaConf.select(cfg, "trainer.max_steps")):
        raise ConfigError("activation_checkpointing", f"{list(parts)} checkpoints the LLM layers, which "
                          f"compile_llm={compile_llm} compiles (auto: on for CPU runs of >= 500 steps); the two do "
                          "not compose: set compile_llm=false, or drop llm (activation_checkpointing=[])")
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    if target.endswith("FSDPStrategy") and not strategy.get("activation_checkpointing_policy"):
        raise ConfigError("trainer.strategy.activation_checkpointing_policy", f"is not set, so FSDP1 would not "
                          f"checkpoint the activation_checkpointing={list(parts)} layers (it checkpoints by its own "
                          "policy); use trainer=fsdp, whose policy reads activation_checkpointing")


def check_data_requirements(cfg: DictConfig, training: bool = True) -> None:
    """What the data, the tiny encoder and the tokenizer need from each other (issue 22): each of
    these used to fail only after data generation, encoder pre-training or a whole training run."""

    def has_split(split: str) -> bool:
        """Whether the datamodule will find ``split``: explicit shards, a root the synthetic
        generator fills (all three splits), or an existing root holding ``split/index.json``."""
        if data.get(f"{split}_shards"):
            return True
        if not root:
            return False
        return bool(data.get("generate")) or os.path.isfile(os.path.join(str(root), split, "index.json"))

    def sweeper_needs_metric() -> bool:
        """An Optuna sweep scores each job by its return value (optimized_metric); None fails it."""
        try:
            from hydra.core.hydra_config import HydraConfig

            if not HydraConfig.initialized():
                return False
            return "optuna" in str(OmegaConf.select(HydraConfig.get(), "sweeper._target_", default="") or "")
        except Exception:  # no Hydra app running (tests, python -c): no sweeper either
            return False

    data = cfg.get("data")
    if not data:
        return
    if OmegaConf.is_missing(data, "train_shards"):
        raise ConfigError("data.train_shards", "is required with data=llava: LLaVA-format webdataset shards, e.g. "
                          "data.train_shards='/data/llava/train-{000000..000099}.tar' (python -m vtc.data.convert "
                          "writes them from LLaVA's JSON and images)")
    root = data.get("root")
    # The tiny encoder pre-trains on the synthetic set's boards (digit under each patch): it needs
    # a synthetic root, which data=llava (root: null) has not. Without this, a TypeError in prepare.
    pre = OmegaConf.select(cfg, "encoder.pretrain")
    enc_path = OmegaConf.select(cfg, "encoder.path", throw_on_missing=False)
    if pre and enc_path is None:
        raise ConfigError("encoder.path", "null while encoder.pretrain is set: the pre-trained tower is cached "
                          "there; keep the default path, or also set encoder.pretrain=null for a random-init "
                          "tower (smoke tests only)")
    if pre and not os.path.isdir(str(enc_path)):
        pre_root = pre.get("data_root")
        real = ("encoder=clip_l14_336 encoder.path=<local CLIP ViT-L/14-336 dir> (or encoder=siglip_so400m "
                "encoder.path=...)")
        if pre_root is None:
            raise ConfigError("encoder", "the tiny encoder is pre-trained (encoder.pretrain) on the synthetic "
                              "set's boards (encoder.pretrain.data_root = data.root), which this data has not "
                              f"(data.root is null, as with data=llava); use a real encoder: {real}, "
                              "or a tiny encoder already pre-trained by a data=synthetic run: "
                              "encoder.path=<data/encoders/tiny-clip-... dir>")
        generated = data.get("generate") and root is not None and str(pre_root) == str(root)
        if not generated and not os.path.isfile(os.path.join(str(pre_root), "train", "index.json")):
            raise ConfigError("encoder.pretrain.data_root", f"{pre_root!r} holds no synthetic training split "
                              "(train/index.json) to pre-train the tiny encoder on; point it at a data=synthetic "
                              f"root (data/synthetic-...), or use a real encoder: {real}")
    # llm=tiny's tokenizer is the synthetic set's own word-level vocabulary (${data.root}/tokenizer):
    # with no data.root it is 'None/tokenizer', which only fails once the model is being built.
    llm = cfg.get("llm")
    raw_tok = OmegaConf.to_container(llm, resolve=False).get("tokenizer_path") if isinstance(llm, DictConfig) else None
    if root is None and isinstance(raw_tok, str) and "data.root" in raw_tok:
        raise ConfigError("llm.tokenizer_path", f"{raw_tok} is the synthetic set's word-level tokenizer, and this "
                          "data has no data.root (data=llava); it would map most words of real data to <unk> anyway. "
                          "Use the real LLM's tokenizer: llm=vicuna_7b llm.path=<local Vicuna dir> (or "
                          "llm=qwen2_0_5b llm.path=...), or with llm=tiny set llm.tokenizer_path=<a local HF "
                          "tokenizer dir>")
    # Splits read after training: a missing one used to stop the run only at its very end. A run
    # with neither train shards nor a root trains nothing (eval.py of a released model, init_from).
    if not training or (data.get("train_shards") is None and root is None):
        return
    if cfg.get("test") and not has_split("test"):
        raise ConfigError("data.test_shards", "test=true evaluates the test split after training, and this data "
                          "has none: give data.test_shards=<LLaVA-format shards>, or set test=false (and evaluate "
                          "later with eval.py ckpt_path=... benchmark=...)")
    # Without val shards the datamodule skips validation (a warning), which is fine unless a sweeper
    # needs the validation metric as each job's score.
    metric = str(cfg.get("optimized_metric") or "")
    if metric.startswith("val/") and not has_split("val") and sweeper_needs_metric():
        raise ConfigError("data.val_shards", f"the sweep optimises optimized_metric={metric}, which needs "
                          "validation, and this data has no val split: give data.val_shards=<LLaVA-format shards>")


# The package each Lightning logger imports when it starts (any of them), and the extra that has it.
LOGGER_PACKAGES = {"TensorBoardLogger": (("tensorboard", "tensorboardX"), "loggers"),
                   "WandbLogger": (("wandb",), "loggers"), "MLFlowLogger": (("mlflow",), "")}


def check_loggers(cfg: DictConfig) -> None:
    """Each ``logger.<name>`` whose package is missing, refused before the run starts (Lightning
    would fail at the first metric, after data and model were built)."""
    for name, node in (cfg.get("logger") or {}).items():
        target = str((node or {}).get("_target_", "")).rsplit(".", 1)[-1]
        packages, extra = LOGGER_PACKAGES.get(target, ((), ""))
        if packages and not any(importlib.util.find_spec(p) for p in packages):
            how = f"pip install -e '.[{extra}]'" if extra else f"pip install {packages[0]}"
            raise ConfigError(f"logger.{name}", f"needs the {' or '.join(packages)} package, which is not installed: "
                              f"{how}, or drop it from logger=[...]")


def check_fsdp1_clipping(cfg: DictConfig) -> None:
    """Lightning's FSDPPrecision (trainer=fsdp) refuses norm clipping at the first training step."""
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val")
    algorithm = OmegaConf.select(cfg, "trainer.gradient_clip_algorithm") or "norm"
    if target.endswith("FSDPStrategy") and clip and algorithm == "norm":
        raise ConfigError("trainer.gradient_clip_val", f"{clip} clips by the gradient norm, which Lightning refuses "
                          "under FSDP1 (trainer=fsdp) at the first step; set trainer.gradient_clip_val=null, or use "
                          "trainer=fsdp2, which clips")
