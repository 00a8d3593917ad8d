"""Issue 22, item 6: the accounting CLIs' help, the flops table's vocabulary, where MLflow puts
artifacts (and which store `make mlflow` opens), runs that end RUNNING, short runs that logged
no training cost, and where the report places a stage-wise run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, env=None, cwd=ROOT):
    return subprocess.run(list(args), cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def _local(uri: str) -> str:
    """A file URI or a plain path, as a path."""
    return os.path.normpath(unquote(urlparse(uri).path) if uri.startswith("file:") else uri)


# -- 1. --help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, words", [
    ("vtc.cli.flops", ("Hydra overrides", "compressors=", "text_tokens=", "FLOPs")),
    ("vtc.cli.parallel", ("overrides of the train config", "--world N", "FSDP2")),
])
def test_help_prints_usage_and_exits_0(module, words):
    proc = _run(sys.executable, "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: python -m {module}")
    for w in words:
        assert w in proc.stdout, w
    bad = _run(sys.executable, "-m", module, "--no-such-option")
    assert bad.returncode == 2 and "unknown option '--no-such-option'" in bad.stderr


# -- 2. the LM head's vocabulary ------------------------------------------------------------------


def _lm_head(out: str) -> tuple[int, int, int, str]:
    m = re.search(r"^LM head .*?: (\d+) FLOPs .*= 2 x d (\d+) x vocab (\d+); vocabulary: (.*)$", out, re.M)
    assert m, out
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)


def test_flops_table_uses_the_tiny_tokenizers_vocabulary(tmp_path, capsys):
    from vtc.config import compose_conf
    from vtc.data.tokenizer import build_tiny_tokenizer, load_tokenizer
    from vtc.cli.flops import main

    overrides = [f"paths.data_dir={tmp_path}", "compressors=none"]
    main(overrides)  # no tokenizer on disk yet: the vocabulary is a guess, and the table says so
    flops, d, vocab, source = _lm_head(capsys.readouterr().out)
    assert (vocab, d) == (32000, 128) and flops == 2 * d * 32000 and source.startswith("32000, ASSUMED")

    tok_dir = compose_conf("train", overrides[:1]).llm.tokenizer_path
    build_tiny_tokenizer(["What digit is in row 2 , column 3 ?"], tok_dir)
    n = len(load_tokenizer(tok_dir))  # what train.py gives the config-built LLM
    main(overrides)
    flops, d, vocab, source = _lm_head(capsys.readouterr().out)
    assert vocab == n < 100 and flops == 2 * d * n
    assert source == f"{n}, the tokenizer's length ({tok_dir})"


def test_a_released_models_vocab_size_is_kept(tmp_path):
    from vtc.config import compose_conf
    from vtc.assembly.build import meta_vocab

    # Vicuna's config carries vocab_size (its tokenizer path is its unset llm.path): kept.
    assert meta_vocab(compose_conf("train", ["llm=vicuna_7b", "llm.config.vocab_size=32064"])) == (
        32064, "the LLM config's vocab_size")


# -- 3. where artifacts go; which store `make mlflow` opens ---------------------------------------


@pytest.mark.parametrize("relative", [False, True])
def test_experiment_artifacts_lie_beside_the_sqlite_store(tmp_path, monkeypatch, relative):
    from mlflow.tracking import MlflowClient

    from vtc.runs.tracking import ensure_experiment

    store = tmp_path / "store"
    elsewhere = tmp_path / "elsewhere"  # the folder the run happens to start in
    store.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path if relative else elsewhere)
    uri = "sqlite:///store/mlflow.db" if relative else f"sqlite:///{store / 'mlflow.db'}"
    exp_id = ensure_experiment(uri, "train")
    client = MlflowClient(tracking_uri=uri)
    assert _local(client.get_experiment(exp_id).artifact_location) == str(store / "mlartifacts")
    run = client.create_run(exp_id).info.run_id
    (tmp_path / "a.txt").write_text("x")
    client.log_artifact(run, str(tmp_path / "a.txt"))
    assert [p.name for p in (store / "mlartifacts").rglob("*.txt")] == ["a.txt"]
    assert not (elsewhere / "mlruns").exists() and not (tmp_path / "mlruns").exists()


def _make_n(target: str, **env) -> str:
    proc = _run("make", "-n", target, env={"MLFLOW_TRACKING_URI": "", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_mlflow_opens_the_store_the_runs_use():
    line = next(ln for ln in _make_n("mlflow", MLFLOW_TRACKING_URI="sqlite:////data/x/runs.db").splitlines()
                if "mlflow ui" in ln)
    assert "--backend-store-uri 'sqlite:////data/x/runs.db'" in line
    default = _make_n("mlflow")
    assert f"--backend-store-uri 'sqlite:///{ROOT}/mlflow.db'" in default
    assert f"--artifacts-destination '{ROOT}/mlartifacts'" in default
    assert "--artifacts-destination '/data/x/mlartifacts'" in _make_n("mlflow", MLFLOW_TRACKING_URI="sqlite:////data/x/runs.db")
    assert set(_make_n("clean-runs").split()) >= {"rm", "-rf", "mlflow.db", "mlartifacts", "mlruns"}


# -- 4. runs are closed ---------------------------------------------------------------------------


class _Logger:
    """What closed_run reads of an MLFlowLogger: run_id and experiment (an MlflowClient)."""

    def __init__(self, client, run_id):
        self.experiment, self.run_id = client, run_id


@pytest.fixture()
def client(tmp_path):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    c.create_experiment("t", artifact_location=str(tmp_path / "art"))
    return c


def _status(client, run_id):
    return client.get_run(run_id).info.status


def test_closed_run_finishes_fails_or_kills(client):
    from vtc.runs.tracking import closed_run

    exp = client.get_experiment_by_name("t").experiment_id
    ok, bad, stop, done = (client.create_run(exp).info.run_id for _ in range(4))
    with closed_run(_Logger(client, ok)):
        pass
    with pytest.raises(ValueError), closed_run(_Logger(client, bad)):
        raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt), closed_run(_Logger(client, stop)):
        raise KeyboardInterrupt
    client.set_terminated(done, "FAILED")  # Lightning already closed it: left alone
    with closed_run(_Logger(client, done)):
        pass
    with closed_run(None), closed_run(_Logger(client, None)):  # no logger / a rank without the run
        pass
    assert [_status(client, r) for r in (ok, bad, stop, done)] == ["FINISHED", "FAILED", "KILLED", "FAILED"]


@pytest.mark.slow
def test_fast_dev_run_ends_its_mlflow_run(workspace):
    before = {r.info.run_id for r in workspace.runs()}
    workspace.run("train.py", "debug=fdr", "seed=22")
    new = [r for r in workspace.runs() if r.info.run_id not in before]
    assert len(new) == 1
    assert new[0].info.status == "FINISHED" and new[0].info.end_time
    assert new[0].data.params["trainer.fast_dev_run"] == "True"


# -- 5. the last step always logs ------------------------------------------------------------------


def _fit(tmp_path, name: str, steps: int, every: int, callbacks) -> dict:
    """A toy module logging what LMMModule logs per step, fitted for ``steps`` steps; the MLflow
    history {metric: [(step, value)]}."""
    import lightning as L
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

    class Toy(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.cum = 0.0

        def training_step(self, batch, batch_idx):
            loss = (self.w * batch[0]).pow(2).mean()
            self.cum += 0.5
            self.log("train/loss", loss)
            self.log("train/tflops_cum", self.cum)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(16, 1)), batch_size=2)
    # One store for every fit of the test (creating a sqlite store is most of a fit's time).
    logger = MLFlowLogger(experiment_name=name, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          artifact_location=str(tmp_path / "art"))
    trainer = L.Trainer(max_steps=steps, log_every_n_steps=every, logger=logger, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu", devices=1)
    trainer.fit(Toy(), data)
    return {k: sorted((m.step, m.value) for m in logger.experiment.get_metric_history(logger.run_id, k))
            for k in ("train/loss", "train/tflops_cum")}


def test_a_run_shorter_than_the_log_interval_logs_its_last_step(tmp_path):
    from vtc.train.last_step_log import LastStepLog

    assert _fit(tmp_path, "without", 3, 10, [])["train/loss"] == []  # what Lightning alone does
    hist = _fit(tmp_path, "with", 3, 10, [LastStepLog()])
    assert [s for s, _ in hist["train/loss"]] == [2]
    assert hist["train/tflops_cum"] == [(2, 1.5)]  # the whole run's 3 steps
    # Steps Lightning logs itself are not logged twice, and the added one continues its numbering.
    assert [s for s, _ in _fit(tmp_path, "every", 3, 1, [LastStepLog()])["train/loss"]] == [0, 1, 2]
    assert _fit(tmp_path, "odd", 3, 2, [LastStepLog()])["train/tflops_cum"] == [(1, 1.0), (2, 1.5)]


def test_the_last_step_callback_is_configured():
    from vtc.config import compose_conf

    assert compose_conf("train").callbacks.last_step_log._target_ == "vtc.train.last_step_log.LastStepLog"


# -- 6. the report places a stage-wise run at its run average --------------------------------------


def test_report_places_a_stage_wise_run_at_its_run_average_tokens(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    from vtc.runs.report import make_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("stages", artifact_location=str(tmp_path / "art"))
    # arm -> (test/acc, [(step, train/equiv_visual_tokens)], total TFLOPs). Logged every 10 steps,
    # the last step (22) by LastStepLog. The stage-wise arm: 8 tokens for steps 0-19, 64 for 20-22:
    # (20 * 8 + 3 * 64) / 23 = 15.3, though it ends (and is tested) at 64.
    arms = {"none": (0.60, [(9, 64), (19, 64), (22, 64)], 3.0),
            "stages": (0.55, [(9, 8), (19, 8), (22, 64)], 1.2),
            "pool": (0.40, [(9, 16), (19, 16), (22, 16)], 1.5)}
    for arm, (acc, hist, tflops) in arms.items():
        r = c.create_run(exp, run_name=arm).info.run_id
        c.log_param(r, "arm", arm)
        c.log_metric(r, "test/acc", acc)
        c.log_metric(r, "test/visual_tokens", hist[-1][1])
        c.log_metric(r, "test/equiv_visual_tokens", hist[-1][1])
        for step, v in hist:
            c.log_metric(r, "train/equiv_visual_tokens", v, step=step)
            c.log_metric(r, "train/tflops_cum", tflops * (step + 1) / 23, step=step)
        c.set_terminated(r)
    # A run whose module logs the running mean itself: that value is used as it is.
    r = c.create_run(exp, run_name="logged").info.run_id
    c.log_param(r, "arm", "logged")
    for name, v in {"test/acc": 0.3, "train/equiv_visual_tokens": 64, "train/equiv_visual_tokens_avg": 40.0,
                    "train/tflops_cum": 2.0}.items():
        c.log_metric(r, name, v, step=22)
    c.set_terminated(r)

    make_report("stages", out=str(tmp_path / "rep"), tracking_uri=uri)
    conf = {c_["label"]: c_ for c_ in json.loads((tmp_path / "rep" / "report.json").read_text())["configurations"]}
    avg = {k: v["stats"]["train/equiv_visual_tokens_avg"]["mean"] for k, v in conf.items()}
    assert avg["arm=stages"] == pytest.approx((20 * 8 + 3 * 64) / 23)
    assert avg["arm=none"] == 64 and avg["arm=pool"] == 16 and avg["arm=logged"] == 40.0
    assert conf["arm=stages"]["stats"]["train/tflops_cum"]["mean"] == pytest.approx(1.2)  # the run's total
    # At its last stage's 64 tokens it would be dominated by `none` (64, 0.60); at 15.3 it is on the front.
    assert {k for k, v in conf.items() if v["pareto"]["tokens"]} == {"arm=none", "arm=stages"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "equiv. visual tokens (train, run avg)" in md and "`train/equiv_visual_tokens_avg`" in md
