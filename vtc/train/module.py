"""``LMMModule``: the unit of training. It owns an ``LMM`` and decides what trains and how.

Logged (names are stable; reports read them):
  train/loss, train/visual_tokens (per image sample, entering the LLM),
  train/equiv_visual_tokens (layer average: what FLOPs scale with), train/samples_per_sec, lr;
  data/seen, data/skipped, data/truncated, data/skipped_<reason> (training stream, all ranks);
  val/loss, val/acc, val/acc_<question type>, val/visual_tokens; test/acc, test/acc_<type>.
"""
from __future__ import annotations

import math
import time

import lightning as L
import torch
from torch import nn

from vtc.cost.accounting import batch_flops, model_shape
from vtc.data.collate import visual_items
from vtc.distributed.activation_checkpointing import configure_activation_checkpointing, parse_parts
from vtc.distributed.fsdp2 import configure_fsdp2
from vtc.lmm import LMM
from vtc.metrics.exact_match import ExactMatchAccuracy
from vtc.model.lora import freeze_base, has_lora

PARTS = ("encoder", "compressor", "projector", "llm")


def visual_stats(visual_in: torch.Tensor, seen: torch.Tensor) -> tuple[float, float]:
    """Mean visual tokens entering the LLM and the layer-averaged mean ("equivalent tokens"),
    over the samples that have an image."""
    has = visual_in > 0
    if not bool(has.any()):
        return 0.0, 0.0
    return float(visual_in[has].float().mean()), float(seen[:, has].float().mean())


class LMMModule(L.LightningModule):
    def __init__(
        self,
        model: LMM,
        tokenizer=None,
        train_parts: tuple[str, ...] = ("projector", "compressor", "llm"),
        lr: float = 1e-3,
        projector_lr: float | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.03,
        min_lr_ratio: float = 0.0,
        max_new_tokens: int = 4,
        on_nonfinite_loss: str = "stop",
        activation_checkpointing: tuple[str, ...] = (),
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        unknown = set(train_parts) - set(PARTS)
        if unknown:
            raise ValueError(f"train_parts: unknown parts {sorted(unknown)}; choose from {PARTS}")
        self.train_parts = tuple(train_parts)
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.projector_lr = projector_lr  # LLaVA's mm_projector_lr (its LoRA recipe: 2e-5 beside lr 2e-4)
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio
        self.max_new_tokens = max_new_tokens
        if on_nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite_loss: {on_nonfinite_loss!r}; use stop or skip")
        self.on_nonfinite_loss = on_nonfinite_loss
        self.activation_checkpointing = parse_parts(activation_checkpointing)
        self.nonfinite_skipped = 0
        for part in PARTS:
            for module in model.part_modules(part):
                for p in module.parameters():
                    p.requires_grad_(part in self.train_parts)
        # LoRA (llm.lora.r): the LLM part trains its adapters only, its base weights stay frozen; for
        # the FLOPs count the LLM is then frozen (no weight gradients; the adapters' own are not counted).
        self.lora = has_lora(model.llm)
        if self.lora and "llm" in self.train_parts:
            freeze_base(model.llm)
        self.cost_parts = tuple(p for p in self.train_parts if not (self.lora and p == "llm"))
        self.val_acc = ExactMatchAccuracy()
        self.test_acc = ExactMatchAccuracy()
        self.type_acc = nn.ModuleDict()
        self.predictions: list[dict] = []
        self._t0 = None
        # Cumulative training cost, kept in checkpoints so a resumed run continues the totals.
        self.flops_cum = 0.0
        self.train_time_cum = 0.0
        # Run-average equivalent visual tokens: where a stage-wise run sits on a cost axis (its last
        # stage's count says nothing of what the run cost).
        self.equiv_sum, self.equiv_steps = 0.0, 0
        self._shape = None
        # Set by the task: the resolved run config (YAML) and the MLflow run id, stored in every
        # checkpoint so eval.py can rebuild the model and a resumed run can continue its MLflow run.
        self.run_config_yaml: str | None = None
        self.mlflow_run_id: str | None = None

    def train(self, mode: bool = True):
        super().train(mode)
        # Frozen parts stay in eval mode (no dropout), as LLaVA keeps CLIP.
        for part in PARTS:
            if part not in self.train_parts:
                for module in self.model.part_modules(part):
                    module.eval()
        return self

    def forward(self, batch):
        return self.model(batch)

    def configure_model(self) -> None:
        # Applied from outside the model: activation checkpointing of the layers of
        # ``activation_checkpointing`` (FSDP1 does it itself, from the same policy), then FSDP2 under
        # ModelParallelStrategy (trainer=fsdp2) shards self.model block by block; checkpointing goes
        # first so that FSDP2 also gathers a layer's weights for its recomputation in backward.
        configure_activation_checkpointing(self, self.activation_checkpointing)
        configure_fsdp2(self)

    # -- training --------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._t0 = time.perf_counter()

    @property
    def shape(self):
        if self._shape is None:
            self._shape = model_shape(self.model)
        return self._shape

    def training_step(self, batch, batch_idx):
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        if not bool(torch.isfinite(out.loss)):
            return self._nonfinite(out.loss, batch)
        vis, equiv = visual_stats(out.visual_in, out.seen)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/visual_tokens", vis, batch_size=bs)
        self.log("train/equiv_visual_tokens", equiv, batch_size=bs)
        self.equiv_sum += equiv
        self.equiv_steps += 1
        self.log("train/equiv_visual_tokens_avg", self.equiv_sum / self.equiv_steps, batch_size=bs)
        n = self.model.encoder.info.num_patches
        pipeline = self.model.pipeline
        # Every forward the step ran (M3: one per scale) is counted, at the chain's token counts.
        step_flops = sum(batch_flops(self.shape, o.lengths, o.visual_in, o.seen, o.targets_per_sample,
                                     trainable=self.cost_parts, extra_per_image=pipeline.own_flops(n),
                                     vision_tokens_per_layer=pipeline.encoder_tokens(n), frames_per_sample=o.frames)
                         for o in out.all_passes())
        self.flops_cum += step_flops * self.trainer.world_size
        self.log("train/tflops_step", step_flops / 1e12, batch_size=bs)
        self.log("train/tflops_cum", self.flops_cum / 1e12, batch_size=bs)
        return out.loss

    def _nonfinite(self, loss, batch):
        """A NaN/inf loss never reaches the optimizer: stop with a message naming the step (the
        last checkpoint on disk predates it and is kept), or skip the batch (counted, logged)."""
        step = self.global_step
        ids = batch.get("ids", [])[:4]
        if self.on_nonfinite_loss == "skip":
            self.nonfinite_skipped += 1
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped))
            return None  # Lightning skips backward and the optimizer step for this batch
        raise FloatingPointError(
            f"non-finite training loss ({float(loss)}) at global step {step} (batch sample ids {ids}); "
            "the weights were not updated and the last checkpoint on disk is kept. Set "
            "on_nonfinite_loss=skip to skip such batches, or lower optim.lr / trainer.gradient_clip_val."
        )

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._t0 is not None:
            dt = time.perf_counter() - self._t0
            self.train_time_cum += dt
            self.log("train/samples_per_sec", batch["input_ids"].shape[0] / max(dt, 1e-9))
            self.log("train/time_cum_s", self.train_time_cum)
        sched = self.lr_schedulers()
        if sched is not None:
            self.log("lr", sched.get_last_lr()[0])
        self._log_data_counts()

    def _log_data_counts(self):
        """``data/seen``, ``data/skipped``, ``data/truncated``, ``data/skipped_<reason>`` of the
        training stream (the datamodule's ``skip_counts``), summed over ranks, at logging steps."""
        counts = getattr(getattr(self.trainer, "datamodule", None), "skip_counts", None)
        connector = getattr(self.trainer, "_logger_connector", None)
        if not counts or (connector is not None and not connector.should_update_logs):
            return
        total = self.trainer.strategy.reduce(torch.tensor(list(counts.values()), device=self.device), reduce_op="sum")
        for key, value in zip(counts, total.tolist()):
            if value or key in ("seen", "skipped"):
                self.log(f"data/{key}", float(value), rank_zero_only=True)

    # -- evaluation ------------------------------------------------------------------------------
    def decode(self, tokens: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    def _eval_step(self, batch, stage: str):
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log(f"{stage}/loss", out.loss, batch_size=bs, sync_dist=True)
        tokens, seen = self.model.generate(
            batch["gen_input_ids"],
            batch["gen_attention_mask"],
            batch["pixel_values"],
            visual_items(batch),
            max_new_tokens=self.max_new_tokens,
        )
        preds = self.decode(tokens)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric.update(preds, batch["answers"])
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        vis, equiv = visual_stats(out.visual_in, seen)
        self.log(f"{stage}/visual_tokens", vis, batch_size=bs, sync_dist=True)
        self.log(f"{stage}/equiv_visual_tokens", equiv, batch_size=bs, sync_dist=True)
        for qtype in sorted(set(batch.get("question_types", []))):
            if not qtype:
                continue
            idx = [i for i, t in enumerate(batch["question_types"]) if t == qtype]
            key = f"{stage}_{qtype}"
            if key not in self.type_acc:
                self.type_acc[key] = ExactMatchAccuracy().to(self.device)
            self.type_acc[key].update([preds[i] for i in idx], [batch["answers"][i] for i in idx])
        if stage == "test":
            for i, sid in enumerate(batch["ids"]):
                self.predictions.append(
                    {
                        "question_id": sid,
                        "question_type": batch.get("question_types", [""] * bs)[i],
                        "text": preds[i],
                        "answer": batch["answers"][i],
                    }
                )

    def _log_type_acc(self, stage: str):
        for key, metric in self.type_acc.items():
            if key.startswith(stage + "_"):
                self.log(f"{stage}/acc_{key[len(stage) + 1:]}", metric.compute())
                metric.reset()

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._log_type_acc("val")

    def on_test_epoch_start(self):
        self.predictions = []

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._log_type_acc("test")

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain strings only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["vtc"] = {
            "config": self.run_config_yaml,
            "mlflow_run_id": self.mlflow_run_id,
            "flops_cum": self.flops_cum,
            "train_time_cum": self.train_time_cum,
            "equiv_sum": self.equiv_sum,
            "equiv_steps": self.equiv_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vtc") or {}
        self.flops_cum = float(state.get("flops_cum", 0.0))
        self.train_time_cum = float(state.get("train_time_cum", 0.0))
        self.equiv_sum = float(state.get("equiv_sum", 0.0))
        self.equiv_steps = int(state.get("equiv_steps", 0))

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        projector = {id(p) for m in self.model.part_modules("projector") for p in m.parameters()}
        own_lr = self.projector_lr is not None
        proj_decay, proj_no_decay = [], []  # the projector's, when it has its own lr (projector_lr)
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if own_lr and id(p) in projector:
                (proj_no_decay if p.ndim < 2 else proj_decay).append(p)
            else:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if own_lr:
            groups += [{"params": proj_decay, "weight_decay": self.weight_decay, "lr": self.projector_lr},
                       {"params": proj_no_decay, "weight_decay": 0.0, "lr": self.projector_lr}]
        opt = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(self.warmup_ratio * total)
        floor = self.min_lr_ratio

        def schedule(step: int) -> float:
            # Linear warmup then cosine decay to ``min_lr_ratio`` (LLaVA's recipe uses 0.03 / 0).
            if step < warmup:
                return (step + 1) / max(warmup, 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
