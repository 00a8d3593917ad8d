"""The evaluation task behind ``eval.py``: rebuild a trained model (``ckpt_path``) or a released
LLaVA directory (``model.init_from``, :mod:`vtc.eval_init_from`), optionally swap its compressor
(training-free compression), generate answers, score, log to MLflow."""
from __future__ import annotations

import logging
import os

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vtc.checks import check_config
from vtc.errors import ConfigError

log = logging.getLogger(__name__)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        from vtc.parallel import is_sharded_checkpoint

        # trainer=fsdp2 (and fsdp's sharded state dict) save a folder of shards per checkpoint;
        # eval reads one weights-only file, which vtc.consolidate gathers from the shards.
        if is_sharded_checkpoint(path):
            out = path.rstrip("/") + ".consolidated.ckpt"
            raise ConfigError("ckpt_path", f"{path!r} is a sharded checkpoint folder (trainer=fsdp2/fsdp), which "
                              f"eval.py does not read; gather it into one file first: python -m vtc.consolidate "
                              f"--ckpt {path} --out {out}, then eval.py ckpt_path={out}")
        if os.path.isdir(path):
            raise ConfigError("ckpt_path", f"{path!r} is a folder, not a checkpoint file; give a .ckpt file in it "
                              "(e.g. checkpoints/last.ckpt)")
        raise ConfigError("ckpt_path", f"{path!r} is not a file")
    # weights_only: a checkpoint from someone else can hold tensors and plain data, never code.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "vtc" not in ckpt:
        raise ConfigError("ckpt_path", f"{path} has no vtc config; was it written by train.py?")
    return ckpt


def eval_config(cfg: DictConfig, ckpt: dict) -> DictConfig:
    """The training config from the checkpoint with this evaluation's choices on top."""
    from vtc.eval_init_from import apply_eval_choices

    return apply_eval_choices(cfg, OmegaConf.create(ckpt["vtc"]["config"]))


def load_weights(module, state_dict: dict, compressor_changed: bool) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    # A test-time compressor may bring or drop its own parameters; nothing else may differ.
    ok = ("model.compressor.",) if compressor_changed else ()
    bad_missing = [k for k in missing if not k.startswith(ok)] if ok else list(missing)
    bad_unexpected = [k for k in unexpected if not k.startswith(ok)] if ok else list(unexpected)
    if compressor_changed and any(k.startswith("model.compressor.") for k in missing):
        raise ConfigError(
            "compressor",
            "the test-time compressor has parameters the checkpoint lacks "
            f"({[k for k in missing if k.startswith('model.compressor.')][:3]}...); "
            "only parameter-free compressors can be applied without training",
        )
    if bad_missing or bad_unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}")


def evaluate(cfg: DictConfig) -> float | None:
    from vtc.eval_init_from import check_zero_shot, eval_source, init_from_config, prompt_settings

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
    from vtc.eval_bench import benchmark_spec

    bench = benchmark_spec(cfg)  # a LLaVA benchmark's files, checked before anything is built
    if ckpt is None:
        check_zero_shot(run_cfg, bench, info)

    from vtc.data.tokenizer import load_tokenizer
    from vtc.tracking import ensure_experiment, log_config, mlflow_logger, parent_tags
    from vtc.train_task import build_datamodule, build_module, write_predictions

    tokenizer = load_tokenizer(run_cfg.llm.tokenizer_path)
    module = build_module(run_cfg, tokenizer)  # init_from: the weights are read from the directory here
    if ckpt is not None:
        load_weights(module, ckpt["state_dict"], compressor_changed=cfg.get("compressor") is not None)
    # A LLaVA benchmark only needs the prompt and image settings; a released model has no data split.
    datamodule = prompt_settings(run_cfg) if ckpt is None and bench is not None else build_datamodule(run_cfg)

    loggers = []
    if cfg.get("logger") and cfg.logger.get("mlflow"):
        kw = OmegaConf.to_container(cfg.logger.mlflow, resolve=True)
        ensure_experiment(kw["tracking_uri"], kw["experiment_name"])
        kw["tags"] = {**parent_tags(), "vtc.source": os.path.abspath(source)}
        if ckpt is not None:
            kw["tags"].update({"vtc.source_run_id": ckpt["vtc"].get("mlflow_run_id") or "",
                               "vtc.ckpt_path": os.path.abspath(source)})
        else:  # a released model: no training run to point at
            kw["tags"]["vtc.init_from"] = os.path.abspath(source)
        loggers.append(instantiate(kw))
    trainer = L.Trainer(logger=loggers or False, enable_checkpointing=False, enable_model_summary=False,
                        **OmegaConf.to_container(cfg.trainer, resolve=True))
    out_dir = cfg.paths.output_dir
    os.makedirs(out_dir, exist_ok=True)
    logger = mlflow_logger(loggers)  # eval builds only the MLflow logger, or none
    if logger is not None:
        log_config(logger, run_cfg, out_dir)
    from vtc.eval_bench import cost_meter, log_benchmark_params, log_cost, run_benchmark

    meter = cost_meter(cfg, module.model)
    if bench is not None:
        return run_benchmark(bench, cfg, module, datamodule, loggers, meter)
    with meter:
        trainer.test(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    path = os.path.join(out_dir, "predictions.jsonl")
    write_predictions(path, module.predictions)
    if logger is not None:
        logger.experiment.log_artifact(logger.run_id, path)
    metrics.update(log_cost(cfg, meter, loggers))
    log_benchmark_params(cfg, loggers)
    log.info("eval metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics.get("test/acc")
