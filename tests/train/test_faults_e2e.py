"""Fault injection through the real CLI: a NaN loss stops the run naming the step (the last good
checkpoint survives) or is skipped by config."""
import pytest
import torch

pytestmark = pytest.mark.slow


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(workspace, tmp_path):
    run_dir = tmp_path / "nan_run"
    proc = workspace.run("train.py", "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=1",
                         "+callbacks.poison._target_=tests.helpers.PoisonBatch", "+callbacks.poison.steps=[3]",
                         f"hydra.run.dir={run_dir}", "test=false", check=False)
    assert proc.returncode != 0
    assert "non-finite training loss" in proc.stderr and "global step 3" in proc.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3  # the checkpoint written after step 3's predecessor
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nan_loss_skipped_by_config(workspace, tmp_path):
    run_dir = tmp_path / "skip_run"
    workspace.run("train.py", "trainer.max_steps=6", "on_nonfinite_loss=skip",
                  "+callbacks.poison._target_=tests.helpers.PoisonBatch", "+callbacks.poison.steps=[2]",
                  f"hydra.run.dir={run_dir}", "test=false")
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    runs = [r for r in workspace.runs() if r.data.params.get("on_nonfinite_loss") == "skip"]
    assert runs and runs[0].data.metrics["train/nonfinite_skipped"] == 1
