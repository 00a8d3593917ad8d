"""The training task behind ``train.py``: check, prepare, build, fit, test, log.

Kept out of train.py so tests can call it with a composed config, and so importing train.py
stays cheap until Hydra has parsed the command line.
"""
from __future__ import annotations

import json
import logging
import os

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vtc.assembly.build import build_datamodule, build_lmm
from vtc.assembly.checks import check_config
from vtc.config import node_kwargs
from vtc.data.tokenizer import load_tokenizer
from vtc.distributed.checkpoints import checkpoint_meta, is_sharded_checkpoint
from vtc.errors import ConfigError
from vtc.interop.init_from import resolve_init_from
from vtc.model.compile import should_compile
from vtc.runs.tracking import closed_run, ensure_experiment, log_config_all, parent_tags
from vtc.runs.tracking import mlflow_logger as find_mlflow_logger
from vtc.synthetic.prepare import prepare

log = logging.getLogger(__name__)


def resolve_ckpt(cfg: DictConfig) -> str | None:
    """``ckpt_path``: null, an explicit file, or ``last`` (this run directory's last.ckpt)."""

    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    if ckpt == "last":
        ckpt = os.path.join(cfg.paths.output_dir, "checkpoints", "last.ckpt")
        if not (os.path.isfile(ckpt) or is_sharded_checkpoint(ckpt)):
            raise ConfigError("ckpt_path", f"last: no {ckpt}; pin the run directory with hydra.run.dir=<the run's dir>")
    elif not (os.path.isfile(ckpt) or is_sharded_checkpoint(ckpt)):
        raise ConfigError("ckpt_path", f"{ckpt!r} is not a file")
    return ckpt


def stored_run_id(ckpt: str | None) -> str | None:
    """The MLflow run a checkpoint belongs to, so a resumed run continues it."""
    if ckpt is None:
        return None

    state = checkpoint_meta(ckpt)  # a file: memory-mapped, no full read; a sharded folder: its meta.pt
    return (state.get("vtc") or {}).get("mlflow_run_id")


def build_loggers(cfg: DictConfig, run_id: str | None = None, tags: dict | None = None) -> list:
    """One Lightning logger per ``logger.<name>`` node (``logger=[mlflow,tensorboard]`` gives two).
    MLflow: the experiment made first, the sweep parent's tag and ``tags`` on a new run, or
    ``run_id`` to continue a resumed run's curves."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        kwargs = node_kwargs(node)
        if name == "mlflow":
            ensure_experiment(kwargs["tracking_uri"], kwargs["experiment_name"])
            if run_id:
                kwargs["run_id"] = run_id  # metrics continue on the same curves
            else:
                kwargs["tags"] = {**(kwargs.get("tags") or {}), **parent_tags(), **(tags or {})}
        loggers.append(instantiate(kwargs))
    return loggers


def build_callbacks(cfg: DictConfig) -> list:
    from lightning.pytorch.callbacks.progress import ProgressBar

    from vtc.train.console import progress_bar

    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(progress_bar())
    sched = cfg.get("schedule")
    if sched and sched.get("stages"):
        from vtc.train.curriculum import CompressionCurriculum

        callbacks.append(
            CompressionCurriculum(
                OmegaConf.to_container(sched.stages, resolve=True),
                reference_layers=sched.get("reference_layers", 32),
                scale_keys=tuple(sched.get("scale_keys", ("layer",))),
                name=sched.get("name", ""),
            )
        )
    return callbacks


def build_module(cfg: DictConfig, tokenizer):
    from vtc.train.module import LMMModule

    model = build_lmm(cfg, tokenizer, training=True)
    return LMMModule(
        model,
        tokenizer=tokenizer,
        train_parts=tuple(cfg.train_parts),
        max_new_tokens=cfg.generation.max_new_tokens,
        on_nonfinite_loss=cfg.get("on_nonfinite_loss", "stop"),
        activation_checkpointing=tuple(cfg.get("activation_checkpointing") or ()),
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )


def write_predictions(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def train(cfg: DictConfig) -> float | None:
    resolve_init_from(cfg)  # model.init_from: encoder/llm/projector/data describe that directory
    check_config(cfg)  # fails fast, naming the key, before anything heavy happens
    ckpt_path = resolve_ckpt(cfg)
    torch.set_float32_matmul_precision("high")
    prepare(cfg)
    # Seeded after the data and encoder stages, which draw random numbers only when their caches
    # are cold: seeded before, a first run in a fresh folder built a different model from every
    # later run of the same config (make train's seed 0 ended at val/acc 40.8% instead of 47.6%).
    import lightning as L  # imported after the check: a refused config answers in seconds

    from vtc.train.console import route_lightning_logs

    route_lightning_logs()
    L.seed_everything(cfg.seed, workers=True)
    tokenizer = load_tokenizer(cfg.llm.tokenizer_path)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, tokenizer)

    if should_compile(cfg.get("compile_llm", "auto"), cfg.trainer.get("accelerator", "cpu"), cfg.trainer.get("max_steps")):
        module.model.llm.compile_layers()
    loggers = build_loggers(cfg, run_id=stored_run_id(ckpt_path))
    from vtc.train.checkpoint_io import AtomicCheckpointIO

    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=loggers or False,
                          plugins=[AtomicCheckpointIO()])
    output_dir = cfg.paths.output_dir
    os.makedirs(output_dir, exist_ok=True)
    mlflow_logger = find_mlflow_logger(loggers)
    module.run_config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    module.mlflow_run_id = mlflow_logger.run_id if mlflow_logger is not None else None
    if trainer.is_global_zero:
        log_config_all(loggers, cfg, output_dir)
        where = f"run folder {output_dir}"
        if mlflow_logger is not None:
            where += (f"; MLflow run {mlflow_logger.run_id} (experiment {cfg.logger.mlflow.experiment_name}, "
                      f"store {cfg.logger.mlflow.tracking_uri})")
        log.info(where)

    with closed_run(mlflow_logger):  # FINISHED / FAILED even where Lightning does not (debug=fdr)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        if cfg.get("test"):
            trainer.test(module, datamodule=datamodule)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if trainer.is_global_zero:
                path = os.path.join(output_dir, "predictions.jsonl")
                write_predictions(path, module.predictions)
                if mlflow_logger is not None:
                    mlflow_logger.experiment.log_artifact(mlflow_logger.run_id, path)
    log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    ckpt_cb = getattr(trainer, "checkpoint_callback", None)
    if trainer.is_global_zero and ckpt_cb is not None and ckpt_cb.last_model_path:
        log.info("last checkpoint: %s (evaluate: python eval.py ckpt_path=%s)", ckpt_cb.last_model_path,
                 ckpt_cb.last_model_path)
    return metrics.get(cfg.get("optimized_metric") or "", None)
