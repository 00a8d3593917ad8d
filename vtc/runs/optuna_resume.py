"""Optuna searches that survive a relaunch (``python train.py -m hparams_search=optuna``).

Why not Optuna's sqlite storage: hydra-optuna-sweeper pins optuna < 3, whose RDB storage cannot
read a database under SQLAlchemy 2 (its schema check fails with a bare AssertionError), and
MLflow's store needs SQLAlchemy 2. So the study lives in :class:`FileStorage`, Optuna's in-memory
storage written to one file after every change (atomically: a temporary file, then a rename).

:class:`OptunaResume`, a Hydra callback, runs before the sweeper is built and turns
``hydra.sweeper.n_trials`` into the trials the study still needs: a relaunch with the same
``study_name`` and storage path continues the study (its sampler sees every earlier trial) and
stops at ``n_trials`` in all; a finished study only reports its best. A trial a killed launch left
RUNNING is marked FAIL (one launcher per study) and its slot runs again. The MLflow parent run of
the first launch is reused (:class:`vtc.runs.tracking.MLflowSweepParent`, tag ``vtc.optuna_study``),
so every trial of the study is one of its children.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState

from vtc.runs.tracking import storage_path

log = logging.getLogger(__name__)
# InMemoryStorage's methods that change what it holds: each one is followed by a save.
_WRITES = ("create_new_study", "delete_study", "set_study_directions", "set_study_user_attr",
           "set_study_system_attr", "create_new_trial", "set_trial_state", "set_trial_param", "set_trial_values",
           "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class FileStorage(InMemoryStorage):
    """Optuna's in-memory storage, loaded from ``path`` when it exists and written back after
    every change. One process writes a file at a time (one launcher per study)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = os.path.abspath(str(path))
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                self.__setstate__(pickle.load(f))
        self.path = os.path.abspath(str(path))  # the file's own record of it may be an older location

    def save(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".optuna-")
        with os.fdopen(fd, "wb") as f:
            pickle.dump(self.__getstate__(), f)
        os.replace(tmp, self.path)


def _saving(name: str):
    base = getattr(InMemoryStorage, name)

    def method(self, *args, **kwargs):
        out = base(self, *args, **kwargs)
        self.save()
        return out

    method.__name__ = name
    return method


for _name in _WRITES:
    setattr(FileStorage, _name, _saving(_name))


def study_progress(path: str, study_name: str) -> tuple[int, list[int]]:
    """(finished trials, numbers of the trials left RUNNING) of ``study_name`` in the file."""
    if not os.path.exists(path):
        return 0, []
    storage = FileStorage(path)
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return 0, []
    trials = storage.get_all_trials(study_id, deepcopy=False)
    return sum(t.state in FINISHED for t in trials), [t.number for t in trials if t.state == TrialState.RUNNING]


def fail_stale(path: str, study_name: str) -> None:
    storage = FileStorage(path)
    study_id = storage.get_study_id_from_name(study_name)
    for t in storage.get_all_trials(study_id, deepcopy=False):
        if t.state == TrialState.RUNNING:
            storage.set_trial_state(t._trial_id, TrialState.FAIL)


class OptunaResume(Callback):
    """Hydra callback (conf/hparams_search/optuna.yaml): ``hydra.sweeper.n_trials`` counts the
    whole study; before the sweeper starts it becomes the trials still missing."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweeper = config.hydra.sweeper
        path = storage_path(sweeper)
        if path is None:
            return
        total, name = int(sweeper.n_trials), str(sweeper.study_name)
        done, stale = study_progress(path, name)
        if stale:
            log.warning("Optuna study %s: trials %s were left RUNNING by an earlier launch; marked FAIL", name, stale)
            fail_stale(path, name)
        left = max(total - done, 0)
        # The sweeper writes optimization_results.yaml there even when no job runs (and makes no folder).
        os.makedirs(str(config.hydra.sweep.dir), exist_ok=True)
        log.info("Optuna study %s (%s): %d of %d trials done, %d to run", name, path, done, total, left)
        with read_write(config):
            OmegaConf.update(config, "hydra.sweeper.n_trials", left, merge=False)
            seed = OmegaConf.select(config, "hydra.sweeper.sampler.seed")
            if seed is not None and done:  # a continuation samples on, not the first launch's draws again
                OmegaConf.update(config, "hydra.sweeper.sampler.seed", int(seed) + done + len(stale), merge=False)
