"""The ``CompressionCurriculum`` callback: LLaVolta's stage-wise compression (arXiv 2406.20092,
Sec. 3.3) applied to any compressor during training. The schedule's rules (stage forms, layer
scaling, what a stage may switch) live in ``vtc.compressors.schedule``; the config check validates
every stage with them before anything is built.

The stage is a pure function of the global step and the total steps, computed before every batch
on every rank alike, so ranks never disagree and a resumed run lands in the same stage at the same
step. LLaVolta's own code counts forward calls per process and restarts at stage 1 after a resume;
here the stage is also stored in the checkpoint and checked on load.
"""
from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback

from vtc.compressors.schedule import (  # noqa: F401  (re-exported: the curriculum's public names)
    Stage, apply_stage, compression_ratio, parse_stages, resolve_stages, stage_at, tokens_entering,
)

log = logging.getLogger(__name__)


class CompressionCurriculum(Callback):
    def __init__(self, stages, reference_layers: int = 32, scale_keys=("layer",), name: str = ""):
        self.raw_stages = [dict(s) for s in stages]
        self.reference_layers = reference_layers
        self.scale_keys = tuple(scale_keys)
        self.name = name
        self.stages: list[Stage] = []
        self.knobs: list[dict | None] = []  # per stage: the target's knobs (None: off)
        self.current = -1
        self.loaded_stage: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        info = model.encoder.info
        self.stages = parse_stages(self.raw_stages, model.llm.num_layers, self.reference_layers, self.scale_keys)
        target = model.schedule_target
        self.knobs = resolve_stages(self.stages, target, tokens_entering(model.pipeline, target, info.num_patches), info)
        saved = (target.get_knobs(), target.enabled)
        for knobs in self.knobs:  # the config check did this already; a model built otherwise fails here
            apply_stage(target, knobs)
            model.pipeline.check(info, model.llm.num_layers)
        target.set_knobs(**saved[0])
        target.enabled = saved[1]

    def total_steps(self, trainer: L.Trainer) -> int:
        return int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        idx = stage_at(self.stages, trainer.global_step, self.total_steps(trainer))
        if idx == self.current:
            return
        if self.loaded_stage is not None and self.current == -1 and idx != self.loaded_stage:
            log.warning("checkpoint was saved in stage %d but step %d falls in stage %d (total steps changed?)",
                        self.loaded_stage, trainer.global_step, idx)
        self.current = idx
        model = pl_module.model
        target = model.schedule_target
        apply_stage(target, self.knobs[idx])
        metrics = stage_metrics(model, idx)
        log.info("curriculum stage %d at step %d: %s", idx, trainer.global_step, model.pipeline.describe())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"stage": self.current, "stages": [{"end": s.end, "knobs": k} for s, k in zip(self.stages, self.knobs)]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded_stage = state_dict.get("stage")


def stage_metrics(model, idx: int) -> dict[str, float]:
    """What a stage leaves: ``curriculum/stage``, whether the target is on, LLaVolta's CR, the visual
    tokens entering the LLM, the equivalent (layer-average) tokens, the tokens each LLM layer sees
    (``curriculum/layer_<i>_tokens``) and the target's numeric knobs."""
    pipeline = model.pipeline
    n = model.encoder.info.num_patches
    layers = model.llm.num_layers
    n_in = pipeline.tokens_in_llm(n)
    per_layer = pipeline.tokens_per_layer(n_in, layers)
    target = model.schedule_target
    metrics = {
        "curriculum/stage": float(idx),
        "curriculum/enabled": float(target.enabled),
        "curriculum/cr": compression_ratio(pipeline, n, layers),
        "curriculum/visual_tokens_in": float(n_in),
        "curriculum/equiv_tokens": sum(per_layer) / max(layers, 1),
    }
    width = len(str(layers - 1))
    metrics.update({f"curriculum/layer_{i:0{width}d}_tokens": float(t) for i, t in enumerate(per_layer)})
    for k, v in target.get_knobs().items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[f"curriculum/{k}"] = float(v)
    return metrics
