"""``LastStepLog``: the final training step always reaches the loggers.

Lightning sends step metrics to the loggers only every ``trainer.log_every_n_steps`` steps, so a
run of 3 steps with the default 10 logged no ``train/*`` metric at all (the report then had no
training cost for it), and a 2005-step run's ``train/tflops_cum`` stopped 5 steps short of the
run's total. This callback logs the last step's values when Lightning skipped that step.
"""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class LastStepLog(Callback):
    """At the end of fit, log the latest values of the metrics whose names start with one of
    ``prefixes`` (the module's per-step ``self.log`` calls), at the step Lightning would have
    logged them at, unless Lightning already logged that step."""

    def __init__(self, prefixes=("train/", "lr")):
        self.prefixes = tuple(prefixes)
        self.last_step_logged = True  # nothing to add before any step ran

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning's own decision for this batch, taken right after this hook with the same state
        # (its LearningRateMonitor asks the same property). fast_dev_run logs every step.
        conn = trainer._logger_connector
        self.last_step_logged = bool(trainer.fast_dev_run) or conn.should_update_logs

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.last_step_logged or not trainer.loggers or trainer.log_every_n_steps == 0:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(self.prefixes) and getattr(v, "numel", lambda: 1)() == 1}
        if not metrics:
            return
        # Lightning logs a training step at the count of batches stepped before it: step N's
        # metrics (global_step N after its optimizer step) go to step N - 1.
        step = max(trainer.global_step - 1, 0)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
