"""Stage-wise compression curriculum (LLaVolta, arXiv 2406.20092, Sec. 3.3).

A schedule is a list of stages; stage i covers the training fraction [end_{i-1}, end_i) and sets
the compressor's knobs (``knobs: null`` = uncompressed). The stage is a pure function of the
global step and the total steps, computed before every batch on every rank alike, so ranks never
disagree and a resumed run lands in the same stage at the same step. LLaVolta's own code counts
forward calls per process and restarts at stage 1 after a resume; here the stage is also stored
in the checkpoint and checked on load.

Layer indices in a schedule are written for ``reference_layers`` (32: Vicuna-7B) and scaled to
the LLM's depth N as round(K · N / reference_layers) for the knobs named in ``scale_keys``
(Python's round: halves go to the even integer). A 4-layer LLM maps K=2 -> 0 (the input
embeddings) and K=16 -> 2.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import lightning as L
from lightning.pytorch.callbacks import Callback

from vtc.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Stage:
    end: float
    knobs: dict | None  # None: compressor switched off


def parse_stages(stages, num_layers: int, reference_layers: int = 32, scale_keys=("layer",)) -> list[Stage]:
    out: list[Stage] = []
    prev = 0.0
    for i, st in enumerate(stages):
        end = float(Fraction(str(st["end"])))  # "1/3" is exact; 0.3333 would shift a boundary step
        if not prev < end <= 1.0:
            raise ConfigError(f"schedule.stages[{i}].end", f"must increase within (0, 1], got {end} after {prev}")
        knobs = st.get("knobs")
        if knobs is not None:
            knobs = dict(knobs)
            for k in scale_keys:
                if knobs.get(k) is not None:
                    knobs[k] = int(round(knobs[k] * num_layers / reference_layers))
                    knobs[k] = min(knobs[k], num_layers - 1)
        out.append(Stage(end, knobs))
        prev = end
    if out and out[-1].end != 1.0:
        raise ConfigError("schedule.stages", f"the last stage must end at 1.0, got {out[-1].end}")
    return out


def stage_at(stages: list[Stage], step: int, total: int) -> int:
    for i, st in enumerate(stages):
        if step < st.end * max(total, 1) - 1e-9:
            return i
    return len(stages) - 1


def compression_ratio(compressor, n_visual: int, num_layers: int) -> float:
    """LLaVolta's CR = N·L / Σ_layers(visual tokens seen); for their pooling this is
    N·L / ((N−K)·L/S + K·L)."""
    per_layer = compressor.tokens_per_layer(n_visual, num_layers)
    return num_layers * n_visual / max(sum(per_layer), 1)


class CompressionCurriculum(Callback):
    def __init__(self, stages, reference_layers: int = 32, scale_keys=("layer",), name: str = ""):
        self.raw_stages = [dict(s) for s in stages]
        self.reference_layers = reference_layers
        self.scale_keys = tuple(scale_keys)
        self.name = name
        self.stages: list[Stage] = []
        self.current = -1
        self.loaded_stage: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = pl_module.model
        self.stages = parse_stages(self.raw_stages, model.llm.num_layers, self.reference_layers, self.scale_keys)
        for i, st in enumerate(self.stages):  # fail now, not hours into the run
            comp = model.compressor
            saved = (comp.get_knobs(), comp.enabled)
            self._apply(comp, st)
            comp.check(model.encoder.info, model.llm.num_layers)
            comp.set_knobs(**saved[0])
            comp.enabled = saved[1]

    @staticmethod
    def _apply(comp, stage: Stage) -> None:
        if stage.knobs is None:
            comp.set_enabled(False)
        else:
            comp.set_enabled(True)
            comp.set_knobs(**stage.knobs)

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
        comp = pl_module.model.compressor
        self._apply(comp, self.stages[idx])
        info = pl_module.model.encoder.info
        n_vis = comp.tokens_out(info.num_patches) if comp.site != "llm" and comp.enabled else info.num_patches
        metrics = {
            "curriculum/stage": float(idx),
            "curriculum/enabled": float(comp.enabled),
            "curriculum/cr": compression_ratio(comp, info.num_patches, pl_module.model.llm.num_layers),
            "curriculum/visual_tokens_in": float(n_vis),
        }
        for k, v in comp.get_knobs().items():
            if isinstance(v, (int, float)) and v is not None:
                metrics[f"curriculum/{k}"] = float(v)
        log.info("curriculum stage %d at step %d: %s", idx, trainer.global_step, comp.describe() if comp.enabled else "uncompressed")
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def state_dict(self) -> dict:
        return {"stage": self.current, "stages": [{"end": s.end, "knobs": s.knobs} for s in self.stages]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded_stage = state_dict.get("stage")
