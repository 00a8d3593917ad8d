"""Loggers users pick (conf/logger): TensorBoard and W&B (offline) beside MLflow record the same
metrics and the same config; a logger whose package is missing is refused by the config check."""
from __future__ import annotations

import glob
import os
import struct

import pytest
import yaml

from tests.conftest import TINY  # noqa: F401  (the workspace runs with it)

pytestmark = pytest.mark.slow
# Bookkeeping keys each backend adds by itself (not vtc's metrics).
OWN_KEYS = {"epoch", "trainer/global_step", "_runtime", "_step", "_timestamp"}


def wandb_records(path: str):
    """The protobuf Records of a W&B run file, read independently of wandb's (Go) core: a 7-byte
    header (':W&B', magic, version), then LevelDB-log blocks of 32 KiB whose record chunks sit
    behind a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def key(item) -> str:
    """A W&B history/summary item's name: metric names with "/" are stored split (nested_key)."""
    return item.key or "/".join(item.nested_key)


def test_tensorboard_and_wandb_record_what_mlflow_records(workspace):
    pytest.importorskip("tensorboard")  # the [loggers] extra; make test installs it
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace.run("train.py", "logger=[mlflow,tensorboard,wandb]", "task_name=loggers")
    (run,) = workspace.runs("loggers")
    metrics, params = set(run.data.metrics) - OWN_KEYS, run.data.params
    out = params["paths.output_dir"]

    ev = EventAccumulator(f"{out}/tensorboard")
    ev.Reload()
    assert set(ev.Tags()["scalars"]) - OWN_KEYS == metrics, (ev.Tags(), sorted(os.listdir(f"{out}/tensorboard")))
    assert ev.Scalars("train/loss")[-1].value == pytest.approx(run.data.metrics["train/loss"], rel=1e-6)
    hp = yaml.safe_load(open(f"{out}/tensorboard/hparams.yaml"))
    assert hp == params

    (wb,) = glob.glob(f"{out}/wandb/offline-run-*/run-*.wandb")
    config, history, summary = {}, set(), {}
    for rec in wandb_records(wb):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            config.update({it.key: yaml.safe_load(it.value_json) for it in rec.config.update})
        elif kind == "history":
            history |= {key(it) for it in rec.history.item}
        elif kind == "summary":
            summary.update({key(it): yaml.safe_load(it.value_json) for it in rec.summary.update})
    assert history - OWN_KEYS == metrics
    assert {k: v for k, v in config.items() if k in params} == params
    assert summary["test/acc"] == pytest.approx(run.data.metrics["test/acc"], rel=1e-6)


def test_a_logger_without_its_package_is_refused_by_the_config_check(monkeypatch):
    import importlib.util

    from vtc.assembly.checks import check_loggers
    from vtc.config import compose_conf
    from vtc.errors import ConfigError

    cfg = compose_conf("train", ["logger=[mlflow,wandb]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logger\.wandb.*pip install"):
        check_loggers(cfg)
    check_loggers(compose_conf("train", ["logger=[mlflow,tensorboard]"]))  # installed: accepted
