"""MLflow glue: the store, the experiment, parent runs for sweeps, params and artifacts.

Facts this module is built on (MLflow 3.x): the plain-folder store raises, so the default is a
sqlite file; parallel jobs racing to create a fresh sqlite database or experiment can fail, so
both are created once before any job starts, under a file lock per sqlite file (two sweeps
launched at once into a fresh store otherwise race on the schema migration: "duplicate column"),
with retries on transient store errors; re-logging a param with a new value raises, so a
resumed run logs only the params it has not logged yet.
"""
from __future__ import annotations

import contextlib
import logging
import os

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vtc.config import ROOT, flatten

log = logging.getLogger(__name__)
PARENT_ENV = "VTC_MLFLOW_PARENT_RUN_ID"


def tracking_uri(cfg: DictConfig | None = None) -> str:
    try:
        return cfg.logger.mlflow.tracking_uri
    except Exception:
        return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT}/mlflow.db")


def store_lock(uri: str):
    """A file lock serialising store creation for a sqlite URI (a no-op for other stores). The
    lock lives in the temp folder, keyed by the database's absolute path."""
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


def artifact_root(uri: str) -> str | None:
    """Where a new experiment's run artifacts go: ``mlartifacts/`` beside a sqlite store's file
    (MLflow's own default for a sqlite store is ``./mlruns`` of whatever folder the first run
    started in, so artifacts ended up scattered and out of ``make mlflow``'s sight). None (the
    store's or server's default) for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    db = os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0])  # a relative file is the cwd's, as for sqlite
    return os.path.join(os.path.dirname(db), "mlartifacts")


def ensure_experiment(uri: str, name: str) -> str:
    """Create the store and the experiment if missing; return the experiment id. A new
    experiment keeps its artifacts beside the store (``artifact_root``); an existing one keeps the
    location it was created with (MLflow cannot move it)."""
    from mlflow.tracking import MlflowClient

    def get_or_create():
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_root(uri))
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    with store_lock(uri):
        return with_retries(get_or_create, f"store/experiment creation at {uri}")


def history_mean(client, run_id: str, key: str) -> float | None:
    """Mean of metric ``key`` over the training steps of a run, from its logged history: a value
    stands for the steps since the previous logged one (Lightning logs every
    ``log_every_n_steps``); a step logged twice (a resumed run) counts once, with its last value."""
    history = sorted(with_retries(lambda: client.get_metric_history(run_id, key), "metric history"),
                     key=lambda m: m.timestamp)
    points = sorted({m.step: m.value for m in history}.items())
    if not points:
        return None
    starts = [-1] + [step for step, _ in points[:-1]]
    return sum((step - prev) * v for (step, v), prev in zip(points, starts)) / (points[-1][0] + 1)


def storage_path(sweeper: DictConfig) -> str | None:
    """The study file of an Optuna sweeper kept in vtc.runs.optuna_resume.FileStorage, else None."""
    node = sweeper.get("storage")
    if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("FileStorage"):
        return os.path.abspath(str(node.path))
    return None


def optuna_study_key(sweeper: DictConfig) -> str | None:
    """``<study file>#<study name>`` of a resumable Optuna sweep (the tag its MLflow parent carries)."""
    path = storage_path(sweeper)
    return f"{path}#{sweeper.study_name}" if path else None


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
        study = optuna_study_key(config.hydra.sweeper)
        earlier = with_retries(lambda: client.search_runs(
            [exp_id], f"tags.`vtc.optuna_study` = '{study}'", max_results=1), "sweep parent lookup") if study else []
        if earlier:  # a relaunched Optuna study: its trials stay children of one parent
            self.run_id = earlier[0].info.run_id
            with_retries(lambda: client.update_run(self.run_id, status="RUNNING"), "sweep parent reopen")
            with_retries(lambda: client.set_tag(self.run_id, "vtc.sweep_dir", sweep_dir), "sweep parent tag")
            log.info("MLflow parent run %s continues Optuna study %s", self.run_id, study)
        else:
            tags = {"vtc.sweep_dir": sweep_dir, "vtc.kind": "sweep", **({"vtc.optuna_study": study} if study else {})}
            run = with_retries(lambda: client.create_run(
                exp_id, run_name=f"sweep {os.path.basename(sweep_dir)}", tags=tags), "sweep parent creation")
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


def mlflow_logger(loggers):
    """The MLflow logger among a trainer's ``loggers`` (the first one with a ``run_id``
    attribute), or None: the one lookup train.py and eval.py (benchmarks included) use."""
    return next((lg for lg in loggers if hasattr(lg, "run_id")), None)


def config_params(cfg: DictConfig) -> dict[str, str]:
    """The flattened resolved config (without ``hydra``) as string params: what every logger records."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    return {k: str(v)[:6000] for k, v in flatten(resolved).items()}


def log_config_all(loggers, cfg: DictConfig, output_dir: str | None) -> None:
    """The run's config to each logger: MLflow as params + the config.yaml artifact
    (:func:`log_config`); any other Lightning logger (TensorBoard, W&B, CSV) through its
    ``log_hyperparams``, the same flattened keys and values."""
    for lg in loggers or []:
        if hasattr(lg, "run_id"):
            log_config(lg, cfg, output_dir)
        else:
            lg.log_hyperparams(config_params(cfg))


def log_config(logger, cfg: DictConfig, output_dir: str | None) -> None:
    """Params = the flattened resolved config (only keys not logged yet); artifact = config.yaml."""

    if logger is None or not hasattr(logger, "run_id"):
        return
    client = logger.experiment
    run = client.get_run(logger.run_id)
    already = run.data.params
    params = config_params(cfg)
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


# MLflow run statuses a run is closed with (mlflow.entities.RunStatus names).
_STATUS_OF = {KeyboardInterrupt: "KILLED", SystemExit: "KILLED"}


@contextlib.contextmanager
def closed_run(logger):
    """Leave the MLflow run of ``logger`` terminated whatever happens in the block: FINISHED when
    it ends normally and the run is still RUNNING, FAILED on an exception, KILLED on an interrupt.

    Lightning terminates the runs of its own loggers, but ``fast_dev_run`` (``debug=fdr``) swaps
    them for a DummyLogger after vtc has already opened the run (params, config.yaml), so nothing
    closed it and it stayed RUNNING for good. ``logger``: an MLFlowLogger, or None (no-op); on
    ranks other than 0 it has no run (``run_id`` None) and nothing is done."""
    run_id = getattr(logger, "run_id", None) if logger is not None else None
    try:
        yield
    except BaseException as e:
        if run_id:
            status = next((s for t, s in _STATUS_OF.items() if isinstance(e, t)), "FAILED")
            try:  # never mask the error that ended the run
                with_retries(lambda: logger.experiment.set_terminated(run_id, status), "run termination")
            except Exception as e2:  # noqa: BLE001
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, e2)
        raise
    if run_id:
        client = logger.experiment
        if with_retries(lambda: client.get_run(run_id), "run status").info.status == "RUNNING":
            with_retries(lambda: client.set_terminated(run_id, "FINISHED"), "run termination")
