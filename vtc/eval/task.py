"""The evaluation task behind ``eval.py``: rebuild a trained model (``ckpt_path``) or a released
LLaVA directory (``model.init_from``, :mod:`vtc.eval.init_from`), optionally swap its compressor
(training-free compression), generate answers, score, log to MLflow."""
from __future__ import annotations

import logging
import os

import lightning as L
from omegaconf import DictConfig, OmegaConf

from vtc.assembly.build import build_datamodule
from vtc.assembly.checkpoint import load_checkpoint, load_weights
from vtc.assembly.checks import check_config
from vtc.data.tokenizer import load_tokenizer
from vtc.eval.bench import benchmark_spec, cost_meter, log_benchmark_params, log_cost, run_benchmark
from vtc.eval.init_from import apply_eval_choices, check_zero_shot, eval_source, init_from_config, prompt_settings
from vtc.runs.tracking import log_config_all, mlflow_logger
from vtc.train.console import route_lightning_logs
from vtc.train.task import build_loggers, build_module, write_predictions

log = logging.getLogger(__name__)


def eval_config(cfg: DictConfig, ckpt: dict) -> DictConfig:
    """The training config from the checkpoint with this evaluation's choices on top."""

    return apply_eval_choices(cfg, OmegaConf.create(ckpt["vtc"]["config"]))


def evaluate(cfg: DictConfig) -> float | None:
    kind, source = eval_source(cfg)  # exactly one of ckpt_path / model.init_from
    ckpt = None
    if kind == "ckpt":
        ckpt = load_checkpoint(source)
        run_cfg = eval_config(cfg, ckpt)
    else:
        run_cfg = init_from_config(cfg)
    OmegaConf.set_struct(run_cfg, False)
    run_cfg.paths = cfg.paths
    info, _ = check_config(run_cfg, training=False)

    bench = benchmark_spec(cfg)  # a LLaVA benchmark's files, checked before anything is built
    if ckpt is None:
        check_zero_shot(run_cfg, bench, info)


    tokenizer = load_tokenizer(run_cfg.llm.tokenizer_path)
    module = build_module(run_cfg, tokenizer)  # init_from: the weights are read from the directory here
    if ckpt is not None:
        load_weights(module, ckpt["state_dict"], compressor_changed=cfg.get("compressor") is not None)
    # A LLaVA benchmark only needs the prompt and image settings; a released model has no data split.
    datamodule = prompt_settings(run_cfg) if ckpt is None and bench is not None else build_datamodule(run_cfg)

    tags = {"vtc.source": os.path.abspath(source)}  # MLflow: where the evaluated weights come from
    if ckpt is not None:
        tags.update({"vtc.source_run_id": ckpt["vtc"].get("mlflow_run_id") or "", "vtc.ckpt_path": tags["vtc.source"]})
    else:  # a released model: no training run to point at
        tags["vtc.init_from"] = tags["vtc.source"]
    loggers = build_loggers(cfg, tags=tags)
    route_lightning_logs()
    trainer = L.Trainer(logger=loggers or False, enable_checkpointing=False, enable_model_summary=False,
                        **OmegaConf.to_container(cfg.trainer, resolve=True))
    out_dir = cfg.paths.output_dir
    os.makedirs(out_dir, exist_ok=True)
    log_config_all(loggers, run_cfg, out_dir)

    meter = cost_meter(cfg, module.model)
    if bench is not None:
        return run_benchmark(bench, cfg, module, datamodule, loggers, meter)
    with meter:
        trainer.test(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    path = os.path.join(out_dir, "predictions.jsonl")
    write_predictions(path, module.predictions)
    logger = mlflow_logger(loggers)
    if logger is not None:
        logger.experiment.log_artifact(logger.run_id, path)
    metrics.update(log_cost(cfg, meter, loggers))
    log_benchmark_params(cfg, loggers)
    log.info("eval metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics.get("test/acc")
