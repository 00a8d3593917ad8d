"""What a run prints (vtc/train/console.py): each Lightning line once, no advert, and an epoch label
that never reads ``Epoch 0/-2``."""
from __future__ import annotations

import io
import logging

import lightning  # noqa: F401

from vtc.train.console import LIGHTNING_LOGGERS, epoch_label, progress_bar, route_lightning_logs


def test_epoch_label_for_step_bounded_and_epoch_bounded_runs():
    assert epoch_label(0, -1) == "Epoch 0"  # every vtc trainer: max_epochs -1 (Lightning showed 0/-2)
    assert epoch_label(3, None) == "Epoch 3"
    assert epoch_label(3, 10) == "Epoch 3/9"
    assert epoch_label(12, 5) == "Epoch 12"  # a resumed run past its epoch budget (was 12/4)


def test_progress_bar_uses_the_label():
    bar = progress_bar()
    describe = getattr(bar, "_get_train_description", None)
    if describe is not None:  # rich: the description comes from this method
        bar._trainer = type("T", (), {"max_epochs": -1})()
        assert describe(0).strip() == "Epoch 0"


def test_lightning_records_reach_the_root_handlers_once_without_adverts():
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in LIGHTNING_LOGGERS}
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s|%(message)s"))
    root.addHandler(handler)
    try:
        # What `import lightning` does when nothing configured logging yet (in a run: before Hydra's
        # job logging; here the import order of the test session decides, so do it by hand).
        lightning_own = io.StringIO()
        logging.getLogger("lightning").addHandler(logging.StreamHandler(lightning_own))
        route_lightning_logs()
        assert not [h for n in LIGHTNING_LOGGERS for h in logging.getLogger(n).handlers
                    if type(h) is logging.StreamHandler]
        emitter = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        emitter.setLevel(logging.INFO)
        emitter.info("GPU available: False")
        emitter.info("💡 Tip: try installing something")
        lines = stream.getvalue().splitlines()
        assert lines == ["lightning.pytorch.utilities.rank_zero|GPU available: False"]
        assert lightning_own.getvalue() == ""  # its own handler is gone: the line is printed once
    finally:
        root.removeHandler(handler)
        for n, (handlers, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers[:] = handlers
            logger.propagate = propagate
