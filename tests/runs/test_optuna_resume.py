"""Optuna searches that continue when relaunched (vtc/runs/optuna_resume.py): the study kept in a
file, the trials counted over launches, one MLflow parent for the whole study."""
from __future__ import annotations

import pickle

import optuna
import pytest
from omegaconf import OmegaConf

from vtc.runs.optuna_resume import FileStorage, OptunaResume, study_progress


def objective(trial):
    x = trial.suggest_float("x", -3, 3)
    return (x - 1) ** 2


def test_the_file_storage_keeps_a_study_across_processes(tmp_path):
    path = tmp_path / "s.pkl"
    study = optuna.create_study(study_name="q", storage=FileStorage(path), sampler=optuna.samplers.RandomSampler(0))
    study.optimize(objective, n_trials=3)
    values = [t.value for t in study.trials]
    # A fresh storage object (another launch) reads back the same study and goes on from it.
    again = optuna.create_study(study_name="q", storage=FileStorage(path), load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler(1))
    assert [t.value for t in again.trials] == values
    again.optimize(objective, n_trials=2)
    assert [t.number for t in optuna.load_study(study_name="q", storage=FileStorage(path)).trials] == [0, 1, 2, 3, 4]
    assert study_progress(str(path), "q") == (5, [])
    assert study_progress(str(path), "other") == (0, [])
    pickle.loads(path.read_bytes())  # written whole (renamed into place), never half


def sweeper_config(path, total, seed=0):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(path.parent / "sweep")}, "sweeper": {
        "study_name": "q", "n_trials": total, "sampler": {"seed": seed},
        "storage": {"_target_": "vtc.runs.optuna_resume.FileStorage", "path": str(path)}}}})


def test_a_relaunch_runs_only_the_missing_trials_and_fails_stale_ones(tmp_path):
    path = tmp_path / "s.pkl"
    cfg = sweeper_config(path, 5)
    OptunaResume().on_multirun_start(cfg)
    assert cfg.hydra.sweeper.n_trials == 5 and cfg.hydra.sweeper.sampler.seed == 0  # a new study: all of it

    study = optuna.create_study(study_name="q", storage=FileStorage(path))
    study.optimize(objective, n_trials=3)
    study.ask()  # a trial a killed launch left RUNNING
    cfg = sweeper_config(path, 5, seed=7)
    OptunaResume().on_multirun_start(cfg)
    assert cfg.hydra.sweeper.n_trials == 2  # 3 of 5 done; the stale one runs again
    assert cfg.hydra.sweeper.sampler.seed == 7 + 4  # the continuation does not redraw the first launch's samples
    states = [t.state for t in optuna.load_study(study_name="q", storage=FileStorage(path)).trials]
    assert states[-1] == optuna.trial.TrialState.FAIL
    cfg = sweeper_config(path, 2)
    OptunaResume().on_multirun_start(cfg)
    assert cfg.hydra.sweeper.n_trials == 0  # done: the sweeper only reports the best


@pytest.mark.slow
def test_a_relaunched_optuna_sweep_continues_its_study_and_its_mlflow_parent(workspace, tmp_path):
    from tests.runs.test_sweeps import launch

    env = {**workspace.env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'optuna.db'}"}
    common = ["hparams_search=optuna", "task_name=optuna_resume", "hydra.sweeper.sampler.n_startup_trials=1",
              f"paths.log_dir={tmp_path / 'out'}"]
    for total in (2, 3, 3):  # the third launch finds the study complete
        p = launch(workspace, env, *common, f"hydra.sweeper.n_trials={total}")
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-4000:]}"
    study = optuna.load_study(study_name="vtc_lr_stride", storage=FileStorage(tmp_path / "out/optuna/vtc_lr_stride.pkl"))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert len({(t.params["optim.lr"], t.params["compressor.stride"]) for t in study.trials}) == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("optuna_resume")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("vtc.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 4 and len(children) == 3 and parent.info.status == "FINISHED"
    assert sorted(float(c.data.metrics["val/acc"]) for c in children) == sorted(t.value for t in study.trials)
