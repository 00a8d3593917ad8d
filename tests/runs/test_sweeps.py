"""Sweeps through the CLI: the compressor ablation (conf/experiment/compressor_ablation.yaml) and
the Optuna search (conf/hparams_search/optuna.yaml), launched at the same moment into one fresh
sqlite store, so the test also shows that concurrent sweeps lose no run."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow


def launch(workspace, env, *overrides):
    args = [sys.executable, str(ROOT / "train.py"), "-m", *workspace.paths(), *TINY,
            "trainer.max_steps=2", *overrides]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ablation_and_optuna_sweeps_at_once_into_a_fresh_store(workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "fresh.db"
    assert not db.exists()
    uri = f"sqlite:///{db}"
    env = {**workspace.env, "MLFLOW_TRACKING_URI": uri}
    procs = {
        "ablation": launch(workspace, env, "experiment=compressor_ablation",
                           "ablation=pool_16,stf_16"),
        "optuna": launch(workspace, env, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                         "hydra.sweeper.sampler.n_startup_trials=2"),
    }
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name} sweep failed:\n{out[-2000:]}\n{err[-5000:]}"

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("train")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = {r.info.run_id: r for r in runs if r.data.tags.get("vtc.kind") == "sweep"}
    assert len(parents) == 2, [r.data.tags for r in runs]
    kids = {pid: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid] for pid in parents}
    assert len(runs) == 2 + 4  # nothing lost, nothing extra
    by_kind = {}
    for pid, children in kids.items():
        kind = "ablation" if "experiment=compressor_ablation" in parents[pid].data.params["sweep.overrides"] else "optuna"
        by_kind[kind] = children
    # The ablation: two options at the same 16-token budget, trained and tested.
    abl = by_kind["ablation"]
    assert len(abl) == 2
    assert {c.data.params["compressor._target_"] for c in abl} == {
        "vtc.compressors.AvgPool2d", "vtc.compressors.stf.SpatialTokenFusion"}
    assert {c.data.metrics["test/visual_tokens"] for c in abl} == {16.0}
    # Optuna: two trials, each a child with its own sampled lr and stride, scored on val/acc.
    opt = by_kind["optuna"]
    assert len(opt) == 2
    for c in opt:
        assert 1e-4 <= float(c.data.params["optim.lr"]) <= 1e-2
        assert c.data.params["compressor.stride"] in {"1", "2", "4"}
        assert "val/acc" in c.data.metrics and "test/acc" not in c.data.metrics
    for children in kids.values():
        assert all(c.info.status == "FINISHED" for c in children)
    dirs = {p.data.tags["vtc.sweep_dir"] for p in parents.values()}
    assert len(dirs) == 2 and all(os.path.isdir(d) for d in dirs)  # no shared job folders
