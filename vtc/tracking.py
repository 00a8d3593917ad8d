"""MLflow glue: the store, the experiment, parent runs for sweeps, params and artifacts.

Facts this module is built on (MLflow 3.x): the plain-folder store raises, so the default is a
sqlite file; parallel jobs racing to create a fresh sqlite database or experiment can fail, so
both are created once before any job starts, under a file lock per sqlite file (two sweeps
launched at once into a fresh store otherwise race on the schema migration: "duplicate column"),
with retries on transient store errors; re-logging a param with a new value raises, so a
resumed run logs only the params it has not logged yet.
"""
from __future__ import annotations

import logging
import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
PARENT_ENV = "VTC_MLFLOW_PARENT_RUN_ID"


def tracking_uri(cfg: DictConfig | None = None) -> str:
    try:
        return cfg.logger.mlflow.tracking_uri
    except Exception:
        from vtc.config import ROOT

        return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/mlflow.db")


def store_lock(uri: str):
    """A file lock serialising store creation for a sqlite URI (a no-op for other stores). The
    lock lives in the temp folder, keyed by the database's absolute path."""
    import contextlib
    import hashlib
    import tempfile

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = os.path.abspath(uri[len("sqlite:///"):])
    key = hashlib.sha1(db.encode()).hexdigest()[:16]
    return FileLock(os.path.join(tempfile.gettempdir(), f"vtc-mlflow-{key}.lock"), timeout=300)


def with_retries(fn, what: str, attempts: int = 6, delay: float = 0.5):
    """Call ``fn`` again after transient store errors (sqlite busy/locked, a racing creator)."""
    import random
    import time

    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - MLflow wraps sqlite errors in several types
            if i == attempts - 1:
                raise
            log.warning("MLflow %s failed (%s: %s); retrying", what, type(e).__name__, str(e)[:200])
            time.sleep(delay * (2**i) * (0.5 + random.random()))


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store and the experiment if missing; return the experiment id."""
    from mlflow.tracking import MlflowClient

    def get_or_create():
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    with store_lock(uri):
        return with_retries(get_or_create, f"store/experiment creation at {uri}")


class MLflowSweepParent(Callback):
    """Hydra callback: a multirun gets one parent run; each job's run is tagged as its child."""

    def __init__(self):
        self.run_id = None
        self.uri = None

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        if "mlflow" not in (config.get("logger") or {}):
            return
        from mlflow.tracking import MlflowClient

        self.uri = config.logger.mlflow.tracking_uri
        exp_id = ensure_experiment(self.uri, config.logger.mlflow.experiment_name)
        client = MlflowClient(tracking_uri=self.uri)
        sweep_dir = config.hydra.sweep.dir
        run = with_retries(lambda: client.create_run(
            exp_id,
            run_name=f"sweep {os.path.basename(sweep_dir)}",
            tags={"vtc.sweep_dir": sweep_dir, "vtc.kind": "sweep"},
        ), "sweep parent creation")
        self.run_id = run.info.run_id
        overrides = " ".join(config.hydra.overrides.task)[:6000]
        with_retries(lambda: client.log_param(self.run_id, "sweep.overrides", overrides), "sweep param")
        os.environ[PARENT_ENV] = self.run_id
        log.info("MLflow parent run %s for sweep %s", self.run_id, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.run_id is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        with_retries(lambda: client.set_terminated(self.run_id), "sweep parent termination")
        os.environ.pop(PARENT_ENV, None)


def parent_tags() -> dict:
    pid = os.environ.get(PARENT_ENV)
    return {"mlflow.parentRunId": pid} if pid else {}


def log_config(logger, cfg: DictConfig, output_dir: str | None) -> None:
    """Params = the flattened resolved config (only keys not logged yet); artifact = config.yaml."""
    from vtc.config import flatten

    if logger is None or not hasattr(logger, "run_id"):
        return
    client = logger.experiment
    run = client.get_run(logger.run_id)
    already = run.data.params
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    params = {k: str(v)[:6000] for k, v in flatten(resolved).items()}
    fresh = {k: v for k, v in params.items() if k not in already}
    changed = sorted(k for k, v in params.items() if k in already and already[k] != v)
    if changed:
        log.warning("not re-logging changed params on a resumed run: %s", changed[:10])
    if fresh:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in fresh.items()]
        for i in range(0, len(items), 100):
            client.log_batch(logger.run_id, params=items[i : i + 100])
    if output_dir:
        path = os.path.join(output_dir, "config.yaml")
        OmegaConf.save(cfg, path, resolve=True)
        client.log_artifact(logger.run_id, path)
