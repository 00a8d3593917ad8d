"""Shared fixtures. End-to-end tests run the real CLIs (train.py / eval.py) in subprocesses on a
tiny data set and a tiny encoder built once per session, with MLflow in a temporary sqlite."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Small enough to train in seconds; the same override list for every e2e test so the data set
# and the tiny encoder are built once and found in the cache afterwards.
TINY = [
    "data.generate.n_train=192",
    "data.generate.n_val=32",
    "data.generate.n_test=32",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "data.num_workers=0",
    "encoder.pretrain.steps=30",
    "encoder.pretrain.samples=192",
    "encoder.config.hidden_size=32",
    "encoder.config.intermediate_size=64",
    "llm.config.hidden_size=32",
    "llm.config.intermediate_size=64",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
]


class Workspace:
    def __init__(self, root: Path):
        self.root = root
        self.db = root / "mlflow.db"
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{self.db}", "PYTHONUNBUFFERED": "1"}

    def paths(self, data_dir=None) -> list[str]:
        return [f"paths.data_dir={data_dir or self.root / 'data'}", f"paths.log_dir={self.root / 'outputs'}"]

    def run(self, script: str, *overrides: str, tiny: bool = True, check: bool = True, timeout: int = 600,
            data_dir=None):
        flags = [o for o in overrides if o.startswith("-")]  # Hydra's flags (-m) go before overrides
        rest = [o for o in overrides if not o.startswith("-")]
        args = [sys.executable, str(ROOT / script), *flags, *self.paths(data_dir), *(TINY if tiny else []), *rest]
        proc = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} {' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])

    def runs(self, experiment: str = "train"):
        c = self.client()
        exp = c.get_experiment_by_name(experiment)
        return [] if exp is None else c.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("vtc"))


@pytest.fixture(scope="session")
def tiny_ckpt(workspace, tmp_path_factory) -> Path:
    """A tiny model trained by train.py (uncompressed), in the session's data cache, its own logs."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    env = {**workspace.env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    args = [sys.executable, str(ROOT / "train.py"), f"paths.data_dir={workspace.root / 'data'}",
            f"paths.log_dir={root / 'outputs'}", *TINY, "seed=5", "test=false"]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return next((root / "outputs" / "runs").glob("*/checkpoints/last.ckpt"))
