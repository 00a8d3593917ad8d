"""``eval.py model.init_from=DIR``: zero-shot / training-free evaluation of a released LLaVA model
(LLaVolta's Figure 1 experiment) without a vtc checkpoint.

    python eval.py model.init_from=/models/llava-1.5-7b-hf compressor=pool compressor.stride=2 \\
        benchmark=gqa benchmark.root=/data/LLaVA/playground/data/eval

The run config is what ``train.py model.init_from=DIR`` would build (the ``train`` config composed
with that directory, :func:`vtc.interop.init_from.resolve_init_from`), with ``data=llava`` instead of
the synthetic set: a released model has its own tokenizer, so the synthetic digit-grid set (and
its tokenizer) cannot be its test split. The eval's compressor / override / eval_batch_size /
max_new_tokens go on top, as they do for a checkpoint's stored config. Weights come from the
directory only, so a compressor whose parameters the directory does not hold is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from vtc.config import compose_conf
from vtc.data.eval_gt import BENCHMARKS, VIDEO_BENCHMARKS
from vtc.data.image import ImageProcessor
from vtc.errors import ConfigError
from vtc.interop.init_from import resolve_init_from
from vtc.interop.spec import read_spec

SOURCE_KEYS = "ckpt_path / model.init_from"


def eval_source(cfg: DictConfig) -> tuple[str, str]:
    """``("ckpt", path)`` or ``("init_from", dir)``: exactly one of the two keys must be set."""
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None)
    init = OmegaConf.select(cfg, "model.init_from", default=None)
    if ckpt and init:
        raise ConfigError(SOURCE_KEYS, f"give one, not both (ckpt_path={ckpt}, model.init_from={init}): a vtc "
                          "checkpoint carries its own model; model.init_from evaluates a LLaVA directory as released")
    if not ckpt and not init:
        raise ConfigError(SOURCE_KEYS, "nothing to evaluate: give ckpt_path=<vtc checkpoint> or "
                          "model.init_from=<LLaVA directory> (+ model.vision_tower_path for original-LLaVA dirs)")
    return ("ckpt", str(ckpt)) if ckpt else ("init_from", str(init))


def apply_eval_choices(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """The eval's choices on top of a run config (a checkpoint's stored one, or a composed one)."""
    if cfg.get("compressor") is not None:
        run_cfg.compressor = cfg.compressor
    if cfg.get("override"):
        run_cfg = OmegaConf.merge(run_cfg, cfg.override)
    if cfg.get("max_new_tokens"):
        run_cfg.generation.max_new_tokens = cfg.max_new_tokens
    if cfg.get("eval_batch_size"):
        run_cfg.data.eval_batch_size = cfg.eval_batch_size
    return run_cfg


def compose_train() -> DictConfig:
    """The ``train`` config with ``data=llava``: from the running Hydra app (eval.py) when there is
    one, so the same search path and config sources are used, else from vtc's conf directory."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    overrides = ["data=llava"]
    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)

    return compose_conf("train", overrides)


def init_from_config(cfg: DictConfig) -> DictConfig:
    """The run config for ``model.init_from`` (see the module docstring); checked by the caller."""

    run_cfg = compose_train()
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.model.init_from = os.path.abspath(str(cfg.model.init_from))
    tower = OmegaConf.select(cfg, "model.vision_tower_path", default=None)
    run_cfg.model.vision_tower_path = os.path.abspath(str(tower)) if tower else None
    run_cfg.data.train_shards = None  # data=llava's ??? : evaluation trains nothing
    run_cfg.paths = cfg.paths
    run_cfg = apply_eval_choices(cfg, run_cfg)
    OmegaConf.set_struct(run_cfg, False)
    resolve_init_from(run_cfg)  # after the choices: an override cannot contradict the directory's model
    return run_cfg


def has_test_split(run_cfg: DictConfig) -> bool:
    data = run_cfg.get("data") or {}
    return bool(data.get("test_shards") or data.get("root"))


def check_zero_shot(run_cfg: DictConfig, bench: dict | None, encoder_info) -> None:
    """What ``init_from`` evaluation cannot do, refused before the weights are read."""

    if bench is None and not has_test_split(run_cfg):
        raise ConfigError(
            "benchmark",
            f"model.init_from={run_cfg.model.init_from}: the synthetic benchmark is the test split of a vtc-trained "
            f"checkpoint's data, which a released model does not have; choose benchmark="
            f"{'|'.join(BENCHMARKS + VIDEO_BENCHMARKS)} "
            "(with benchmark.root=<LLaVA's playground/data/eval>), or give LLaVA-format test shards with "
            "+override.data.test_shards=<shards>")
    fresh = fresh_compressor_params(run_cfg, encoder_info)
    if fresh:
        raise ConfigError(
            "compressor",
            f"{run_cfg.compressor._target_} has parameters ({', '.join(fresh[:3])}, ...) that "
            f"{run_cfg.model.init_from} does not hold; zero-shot evaluation applies parameter-free compressors only "
            "(train it first: train.py model.init_from=... compressor=...)")


def fresh_compressor_params(run_cfg: DictConfig, encoder_info) -> list[str]:
    """Names of the compressor's parameters that would be initialised afresh (built on the meta
    device, so nothing is allocated). A vtc export that holds its compressor's trained parameters
    provides them (resolve_init_from has already put that compressor in the config)."""
    from hydra.utils import instantiate


    spec = read_spec(run_cfg.model.init_from, run_cfg.model.get("vision_tower_path"))
    if spec.format == "vtc" and spec.compressor_has_params:
        return []
    with torch.device("meta"):
        comp = instantiate(run_cfg.compressor)
        comp.setup(encoder_info, int(run_cfg.llm.config.hidden_size))
    return [n for n, _ in comp.named_parameters()]


@dataclass
class PromptSettings:
    """What :func:`vtc.eval.bench.evaluate_benchmark` reads from a datamodule (prompt template,
    length limit, image preprocessing, batch size): a LLaVA benchmark needs no data split, and
    data=llava's datamodule refuses to exist without one."""

    template: str
    max_length: int | None
    processor: object
    eval_batch_size: int
    image_size: int
    system_prompt: str | None = None


def prompt_settings(run_cfg: DictConfig) -> PromptSettings:
    d = run_cfg.data
    size = int(d.image_size)
    processor = ImageProcessor(size, tuple(d.image_mean), tuple(d.image_std), bool(d.get("pad_to_square", True)))
    batch = int(d.get("eval_batch_size") or d.batch_size)
    return PromptSettings(str(d.template), int(d.max_length) if d.get("max_length") else None, processor, batch, size,
                          d.get("system_prompt"))
