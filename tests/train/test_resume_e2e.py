"""kill -9 in the middle of a stage-wise run, resume from last.ckpt: same step, same stage, same
MLflow run, no param re-logging error (issues: curriculum, reliability)."""
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

STEPS = 24  # llavolta quarters: stages start at steps 0, 6, 12, 18
KILL_AFTER = 8  # a step inside stage 2 (steps 6..11)


def test_kill_in_stage_two_and_resume(workspace):
    run_dir = workspace.root / "outputs" / "resume_run"
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps", "callbacks.model_checkpoint"))] + [
        f"trainer.max_steps={STEPS}",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "schedule=llavolta",  # adds LLaVolta's pooling on top of compressor=none
        "test=false",
        "trainer.val_check_interval=100",
        f"hydra.run.dir={run_dir}",
        "+callbacks.throttle._target_=tests.helpers.Throttle",  # 0.2 s a step: time to kill
    ]
    args = [sys.executable, str(ROOT / "train.py"), *workspace.paths(), *overrides]
    # Prime the shared data/encoder cache first so the kill timing is about training only.
    workspace.run("train.py", "trainer.max_steps=1", "test=false")
    proc = subprocess.Popen(args, cwd=ROOT, env=workspace.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if last.exists() and torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= KILL_AFTER:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    state = torch.load(last, map_location="cpu", weights_only=True)
    killed_step = state["global_step"]
    assert KILL_AFTER <= killed_step < 12, "killed outside stage 2"
    for ck in (run_dir / "checkpoints").glob("*.ckpt"):  # a .tmp may remain; every .ckpt is whole
        torch.load(ck, map_location="cpu", weights_only=True)
    run_id = state["vtc"]["mlflow_run_id"]

    workspace.run("train.py", *overrides, "ckpt_path=last", tiny=False)
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == STEPS
    assert final["vtc"]["mlflow_run_id"] == run_id
    client = workspace.client()
    stages = client.get_metric_history(run_id, "curriculum/stage")
    by_step = {m.step: m.value for m in stages}
    # Stage changes are logged at the steps they happen; the resumed process re-announces the
    # stage it resumes in, at the step it resumes from.
    assert by_step[0] == 0 and by_step[6] == 1 and by_step[12] == 2 and by_step[18] == 3
    assert by_step[killed_step] == (1 if killed_step < 12 else 2)
    strides = {m.step: m.value for m in client.get_metric_history(run_id, "curriculum/stride")}
    assert strides[0] == 8 and strides[6] == 2
    losses = client.get_metric_history(run_id, "train/loss")
    assert max(m.step for m in losses) == STEPS - 1
    assert client.get_run(run_id).info.status == "FINISHED"
