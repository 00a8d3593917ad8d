"""What a run prints: each log line once, no warning that says nothing to a vtc user, and a
progress bar that does not read ``Epoch 0/-2``.

Lightning gives its loggers (``lightning.pytorch``, ``lightning.fabric``) a console handler of their
own when it is imported before logging is configured, while Hydra's job logging sends every record
to the root logger's console and file handlers too: each Lightning line appeared twice on the
console. ``route_lightning_logs`` drops Lightning's own handlers so its records reach the console
once, formatted like vtc's, and still reach the run's log file.
"""
from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")  # where its handlers may sit
# A logger's filters see only the records logged to it by name, so the advert filter goes on the
# loggers that emit them (rank_zero_info's).
ADVERT_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

# Lightning's warnings that hold for every vtc run and that nobody can act on: vtc keeps the frozen
# encoder in eval mode on purpose (LLaVA's recipe), and the pytree deprecation is Lightning's own
# call into torch. Matched by message, so any other warning still shows.
QUIET_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def route_lightning_logs() -> None:
    """Lightning's records through the root logger's handlers only (once each), its adverts
    dropped, and the warnings of ``QUIET_WARNINGS`` silenced. A no-op for the handlers when
    nothing configured the root logger (Lightning's own console output is then all there is)."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ADVERT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
    root_configured = bool(logging.getLogger().handlers)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if root_configured:
            for h in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(h)
            logger.propagate = True


def epoch_label(current_epoch: int, max_epochs: int | None) -> str:
    """``Epoch 3`` for step-bounded training (``max_epochs: -1``, every vtc trainer config), or
    ``Epoch 3/9`` when an epoch budget exists and the run is inside it (a resumed run past it, as
    after raising max_steps, shows the epoch alone rather than ``12/4``)."""
    if max_epochs is not None and max_epochs > 0 and current_epoch < max_epochs:
        return f"Epoch {current_epoch}/{max_epochs - 1}"
    return f"Epoch {current_epoch}"


class RichBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        text = epoch_label(current_epoch, self.trainer.max_epochs)
        if len(self.validation_description) > len(text):  # Lightning's padding against flicker
            text = f"{text:{len(self.validation_description)}}"
        return text


class TQDMBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_label(trainer.current_epoch, trainer.max_epochs))


def progress_bar():
    """The bar Lightning would pick (rich when installed), with ``epoch_label``'s description."""
    return RichBar() if _RICH_AVAILABLE else TQDMBar()
