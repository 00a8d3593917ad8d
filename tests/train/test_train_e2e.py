"""The platform end to end through its CLIs: train.py -> MLflow -> eval.py, sweeps, bad input."""
import glob
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(workspace):
    proc = workspace.run("train.py", "seed=3")
    runs = [r for r in workspace.runs() if r.data.params.get("seed") == "3"]
    assert len(runs) == 1, proc.stdout[-2000:]
    # This run's own folder: the shared workspace holds other tests' runs too.
    out_dir = runs[0].data.params["paths.output_dir"]
    ckpts = glob.glob(os.path.join(out_dir, "checkpoints", "last.ckpt"))
    return runs[0], ckpts


def test_run_lands_in_mlflow_with_params_metrics_artifacts(workspace, trained):
    run, _ = trained
    params = run.data.params
    assert params["compressor._target_"] == "vtc.compressors.NoCompression"
    assert params["llm.config.hidden_size"] == "32"
    for key in ("train/loss", "val/loss", "val/acc", "train/visual_tokens", "train/samples_per_sec",
                "train/tflops_cum", "test/acc"):
        assert key in run.data.metrics, key
    # The tiny encoder reads 112 px with 14 px patches: 8x8 = 64 visual tokens.
    assert run.data.metrics["train/visual_tokens"] == 64
    arts = {a.path for a in workspace.client().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "predictions.jsonl"} <= arts
    history = workspace.client().get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == 4 and all(h.value > 0 for h in history)


def test_checkpoint_loads_weights_only_and_eval_applies_a_compressor(workspace, trained):
    run, ckpts = trained
    assert ckpts
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert ckpt["vtc"]["mlflow_run_id"] == run.info.run_id
    workspace.run("eval.py", f"ckpt_path={ckpts[0]}", "compressor=pool", "compressor.stride=2", tiny=False)
    evals = workspace.runs("eval")
    assert evals, "eval run missing"
    ev = evals[0]
    assert ev.data.tags["vtc.source_run_id"] == run.info.run_id
    assert ev.data.metrics["test/visual_tokens"] == 16  # 8x8 pooled 2x2
    assert 0.0 <= ev.data.metrics["test/acc"] <= 1.0


def test_multirun_makes_children_of_one_parent(workspace):
    before = {r.info.run_id for r in workspace.runs()}
    workspace.run("train.py", "-m", "compressor=none,pool", "trainer.max_steps=2", "test=false")
    new = [r for r in workspace.runs() if r.info.run_id not in before]
    parents = [r for r in new if r.data.tags.get("vtc.kind") == "sweep"]
    children = [r for r in new if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {c.data.tags["mlflow.runName"] for c in children} == {"compressor=none", "compressor=pool"}
    assert {c.data.metrics["train/visual_tokens"] for c in children} == {64, 16}


def test_bad_stride_fails_before_anything_is_built(workspace, tmp_path):
    proc = workspace.run("train.py", "compressor=pool", "compressor.stride=5", data_dir=tmp_path / "fresh",
                         check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "compressor.stride" in out and "does not divide the 8x8 patch grid" in out
    assert not os.path.exists(tmp_path / "fresh"), "data was generated before the config was checked"


def test_unknown_group_option_lists_valid_ones(workspace):
    proc = workspace.run("train.py", "compressor=nonexistent", check=False)
    assert proc.returncode != 0
    assert "pool" in proc.stderr and "none" in proc.stderr


def test_eval_time_compression_sweep_is_one_multirun(workspace, trained):
    """LLaVolta Fig. 1 style: one checkpoint, compressors applied at test time, one sweep."""
    _, ckpts = trained
    before = {r.info.run_id for r in workspace.runs("eval")}
    workspace.run("eval.py", "-m", f"ckpt_path={ckpts[0]}", "compressor=pool", "compressor.stride=1,8",
                  tiny=False)
    new = [r for r in workspace.runs("eval") if r.info.run_id not in before]
    children = [r for r in new if r.data.tags.get("mlflow.parentRunId")]
    assert len(children) == 2 and len({c.data.tags["mlflow.parentRunId"] for c in children}) == 1
    tokens = sorted(c.data.metrics["test/visual_tokens"] for c in children)
    assert tokens == [1, 64]
    # An in-LLM method (LLaVolta's pooling at K=1, S=4) applies at test time too.
    workspace.run("eval.py", f"ckpt_path={ckpts[0]}", "compressor=vcc", "compressor.layer=1",
                  "compressor.stride=4", tiny=False)
    latest = max(workspace.runs("eval"), key=lambda r: r.info.start_time)
    assert latest.data.metrics["test/visual_tokens"] == 64  # enters the LLM whole ...
    # ... and layers 1..3 see 16: layer average (64 + 3*16) / 4 = 28
    assert latest.data.metrics["test/equiv_visual_tokens"] == 28


def test_first_run_equals_a_run_with_the_caches_warm(workspace, tmp_path):
    """The first run in a data folder builds the synthetic set and pre-trains the tiny tower, in
    process; a second run finds both cached. Same seed and config: the same training, loss for
    loss (the stage used to move the global RNG between seeding and building the model)."""
    def losses():
        before = {r.info.run_id for r in workspace.runs()}
        workspace.run("train.py", "seed=5", "trainer.max_steps=3", "test=false", data_dir=tmp_path / "d")
        (run,) = [r for r in workspace.runs() if r.info.run_id not in before]
        return [h.value for h in sorted(workspace.client().get_metric_history(run.info.run_id, "train/loss"),
                                        key=lambda h: h.step)]

    cold = losses()
    assert (tmp_path / "d" / "encoders").is_dir()
    assert cold == losses() and len(cold) == 3


def test_the_design_cards_command_trains_stagewise_and_ends_as_plain_stf(workspace):
    """`train.py compressor=stf schedule=llavolta`: STF's 16 of 64 tokens with LLaVolta's in-LLM
    pooling on top, four stages over 8 steps (a switch every 2), each stage's tokens per LLM layer
    logged (K scaled to 4 layers: 2 -> 0, 16 -> 2), the last stage plain STF, tested as plain STF."""
    before = {r.info.run_id for r in workspace.runs()}
    proc = workspace.run("train.py", "compressor=stf", "schedule=llavolta", "trainer.max_steps=8")
    (run,) = [r for r in workspace.runs() if r.info.run_id not in before]
    out = proc.stdout + proc.stderr  # the run says where it lands
    assert f"MLflow run {run.info.run_id}" in out and "last checkpoint: " in out, out[-3000:]
    client = workspace.client()
    hist = {m: {h.step: h.value for h in client.get_metric_history(run.info.run_id, f"curriculum/{m}")}
            for m in ("stage", "enabled", "layer_0_tokens", "layer_1_tokens", "layer_2_tokens", "layer_3_tokens")}
    assert hist["stage"] == {0: 0, 2: 1, 4: 2, 6: 3}
    per_layer = {s: [hist[f"layer_{i}_tokens"][s] for i in range(4)] for s in (0, 2, 4, 6)}
    assert per_layer == {0: [2, 2, 2, 2], 2: [8, 8, 8, 8], 4: [16, 16, 8, 8], 6: [16, 16, 16, 16]}
    assert hist["enabled"][6] == 0
    assert run.data.metrics["test/visual_tokens"] == 16 and run.data.metrics["test/equiv_visual_tokens"] == 16
    assert run.info.status == "FINISHED"
    # eval.py rebuilds the deployed model from the checkpoint's config: plain STF, no schedule member.
    ckpt = os.path.join(run.data.params["paths.output_dir"], "checkpoints", "last.ckpt")
    workspace.run("eval.py", f"ckpt_path={ckpt}", tiny=False)
    latest = max(workspace.runs("eval"), key=lambda r: r.info.start_time)
    assert latest.data.tags["vtc.source_run_id"] == run.info.run_id
    assert latest.data.metrics["test/equiv_visual_tokens"] == 16
    assert latest.data.metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"])


def test_a_refused_pair_fails_fast_with_no_data_and_no_mlflow_run(workspace, tmp_path):
    import time

    before = {r.info.run_id for r in workspace.runs()}
    t0 = time.time()
    proc = workspace.run("train.py", "compressor=fastv", "schedule=llavolta", data_dir=tmp_path / "fresh",
                         check=False)
    elapsed = time.time() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "schedule.adds" in out and "one compressor per site" in out, out[-2000:]
    assert not os.path.exists(tmp_path / "fresh"), "data was generated before the config was checked"
    assert {r.info.run_id for r in workspace.runs()} == before, "an MLflow run was created"
    assert elapsed < 60, elapsed  # imports dominate (measured ~10 s on 2 idle cores)


# The training-free methods of the zoo at 4 of the 64 tokens, as the compressor_ablation options set
# them: (option, visual tokens entering the LLM, layer-average visual tokens of the 4 layers).
TEST_TIME = [("random_prune_4", 4, 4), ("divprune_4", 4, 4), ("vispruner_4", 4, 4), ("downsample_4", 4, 4),
             ("m3_4", 4, 4), ("cdpruner_4", 64, 4), ("fastv_4", 64, 4), ("dart_4", 64, 4),
             ("pyramid_drop_4", 64, 7), ("sparsevlm_4", 64, 19)]


def test_every_training_free_method_compresses_an_uncompressed_checkpoint(workspace, trained):
    """`eval.py -m ckpt_path=<uncompressed> +ablation=...`: each method applied at test time only
    (one multirun, one child per method); VoCo, whose tokens are learned, is refused by name."""
    _, ckpts = trained
    before = {r.info.run_id for r in workspace.runs("eval")}
    options = ",".join(o for o, _, _ in TEST_TIME)
    workspace.run("eval.py", "-m", f"ckpt_path={ckpts[0]}", f"+ablation={options}", "cost.measure=false",
                  "++trainer.limit_test_batches=1", tiny=False)
    children = [r for r in workspace.runs("eval") if r.info.run_id not in before and r.data.tags.get("mlflow.parentRunId")]
    got = {c.data.tags["mlflow.runName"].split("=", 1)[1]: c.data.metrics for c in children}
    for option, entering, average in TEST_TIME:
        assert got[option]["test/visual_tokens"] == entering, option
        assert round(got[option]["test/equiv_visual_tokens"]) == average, option
    proc = workspace.run("eval.py", f"ckpt_path={ckpts[0]}", "+ablation=voco_4", tiny=False, check=False)
    assert proc.returncode != 0 and "model.compressor.embeddings" in proc.stderr and "parameter-free" in proc.stderr
