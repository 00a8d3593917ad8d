"""Test-only pieces that train.py subprocesses import by ``_target_`` (the repo root is on their
sys.path)."""
import time

from lightning.pytorch.callbacks import Callback


class Throttle(Callback):
    """Sleep after every training batch, so a test can kill a tiny run at a step of its choosing."""

    def __init__(self, seconds: float = 0.2):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class PoisonBatch(Callback):
    """Turn the images of the batches at the given global steps into NaN (a real non-finite loss)."""

    def __init__(self, steps=(3,)):
        self.steps = set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            batch["pixel_values"].fill_(float("nan"))
