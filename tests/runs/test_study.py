"""vtc.runs.study: the llavolta_fig1 study end to end at tiny size through its CLI (train 2 seeds ->
eval with test-time pooling at strides 1,2,4,8 -> report), plus its small pieces in-process."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY
from vtc.runs.study import Study, StudyError, check_extras, compose, eval_extras, run_phase


def study_cmd(workspace, out, log_dir=None, name="llavolta_fig1", seeds="0,1", steps=2):
    tiny = [o for o in TINY if not o.startswith(("trainer.max_steps=", "trainer.val_check_interval="))]
    tiny += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    paths = [f"paths.data_dir={workspace.root / 'data'}", f"paths.log_dir={log_dir or workspace.root / 'outputs'}"]
    return [sys.executable, "-m", "vtc.runs.study", name, "--seeds", seeds, "--out", str(out), "--", *tiny, *paths]


@pytest.mark.slow
def test_llavolta_fig1_study_trains_evaluates_and_reports(workspace, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(study_cmd(workspace, out), cwd=ROOT, env=workspace.env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    assert "[study] wall time: train" in proc.stdout and "total" in proc.stdout
    record = json.loads((out / "study.json").read_text())
    assert set(record["wall_s"]) == {"train", "eval", "report", "total"}

    # Training: one sweep parent in experiment llavolta_fig1, one child per seed, checkpoints at the
    # study's fixed path.
    train = workspace.runs("llavolta_fig1")
    parents = [r for r in train if r.data.tags.get("vtc.kind") == "sweep"]
    assert len(parents) == 1 and parents[0].info.run_id == record["mlflow"]["train"]["parent"]
    children = [r for r in train if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2 == len(train) - 1
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert {r.data.params["compressor._target_"] for r in children} == {"vtc.compressors.NoCompression"}
    study_dir = workspace.root / "outputs" / "studies" / "llavolta_fig1"
    assert record["checkpoints"] == [str(study_dir / "train" / f"seed_{s}" / "checkpoints" / "last.ckpt") for s in (0, 1)]
    assert all(os.path.isfile(c) for c in record["checkpoints"])

    # Evaluation: one sweep, 2 checkpoints x 4 strides, pooled test-time to 64/16/4/1 tokens.
    evals = workspace.runs("llavolta_fig1_eval")
    eparents = [r for r in evals if r.data.tags.get("vtc.kind") == "sweep"]
    assert len(eparents) == 1 and eparents[0].info.run_id == record["mlflow"]["eval"]["parent"]
    ev = [r for r in evals if r.data.tags.get("mlflow.parentRunId") == eparents[0].info.run_id]
    assert len(ev) == 8 == len(evals) - 1 and {r.info.status for r in ev} == {"FINISHED"}
    by_source = {}
    for r in ev:
        assert r.data.params["compressor._target_"] == "vtc.compressors.AvgPool2d"
        stride = int(r.data.params["compressor.stride"])
        assert r.data.metrics["test/visual_tokens"] == 64 // stride**2
        by_source.setdefault(r.data.tags["vtc.source_run_id"], []).append(r.data.metrics["test/visual_tokens"])
    assert set(by_source) == {r.info.run_id for r in children}
    assert all(sorted(v) == [1, 4, 16, 64] for v in by_source.values())
    assert all(r.data.tags["vtc.ckpt_path"] in record["checkpoints"] for r in ev)
    # Stride 1 is the identity: the checkpoint's eval equals the training run's own test.
    for r in ev:
        if r.data.params["compressor.stride"] == "1":
            src = next(c for c in children if c.info.run_id == r.data.tags["vtc.source_run_id"])
            assert r.data.metrics["test/acc"] == src.data.metrics["test/acc"]
    assert all(str(r.data.params["paths.output_dir"]).startswith(str(study_dir / "eval")) for r in ev)

    # Report: 4 configurations (one per stride) of 2 runs (seeds), numbers recomputed from MLflow.
    assert (out / "report.md").is_file()
    train_rep = json.loads((out / "train" / "report.json").read_text())
    assert [(c["label"], len(c["run_ids"])) for c in train_rep["configurations"]] == [("all runs", 2)]
    rep = json.loads((out / "report.json").read_text())
    assert rep["experiment"] == "llavolta_fig1_eval" and rep["parent"] == eparents[0].info.run_id
    confs = rep["configurations"]
    assert len(confs) == 4
    runs = {r.info.run_id: r for r in ev}
    seen = set()
    for c in confs:
        assert len(c["run_ids"]) == 2 and c["stats"]["test/acc"]["n"] == 2
        rs = [runs[i] for i in c["run_ids"]]
        assert {r.data.params["seed"] for r in rs} == {"0", "1"}
        strides = {r.data.params["compressor.stride"] for r in rs}
        assert len(strides) == 1
        seen |= strides
        for col in ("test/acc", "cost/prefill_tflops"):
            vals = [r.data.metrics[col] for r in rs]
            assert c["stats"][col]["mean"] == pytest.approx(statistics.fmean(vals), abs=1e-12)
            assert c["stats"][col]["std"] == pytest.approx(statistics.stdev(vals), abs=1e-12)
        assert c["stats"]["visual_tokens"]["mean"] == 64 // int(strides.pop()) ** 2
    assert seen == {"1", "2", "4", "8"}
    md_rows = [ln for ln in (out / "report.md").read_text().splitlines() if ln.startswith("| compressor")]
    assert len(md_rows) == 4 and all(ln.split("|")[2].strip() == "2" for ln in md_rows)

    # A second run refuses to start: the checkpoints and the report of the first stay as they were.
    before = {p: p.stat().st_mtime_ns for p in [out / "report.md", *map(Path, record["checkpoints"])]}
    again = subprocess.run(study_cmd(workspace, tmp_path / "other"), cwd=ROOT, env=workspace.env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr and "[study] phase" not in again.stdout
    again = subprocess.run(study_cmd(workspace, out, log_dir=tmp_path / "logs2"), cwd=ROOT, env=workspace.env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds a report" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(workspace.runs("llavolta_fig1")) == 3


def test_extras_routing_train_only_and_both():
    study = Study(eval_sweep=("compressor=pool", "compressor.stride=1,2,4,8"))
    extras = ["data.batch_size=8", "trainer.max_steps=2", "paths.log_dir=/x", "paths.data_dir=/d",
              "++trainer.limit_test_batches=1", "trainer.accelerator=cpu", "eval_batch_size=4",
              "compressor.stride=2", "llm.config.hidden_size=32", "hydra.job.chdir=false"]
    got = eval_extras(extras, compose("eval", []), study)
    assert got == ["paths.log_dir=/x", "paths.data_dir=/d", "++trainer.limit_test_batches=1",
                   "trainer.accelerator=cpu", "eval_batch_size=4"]
    for bad in ("seed=1", "task_name=x", "experiment=compressor_ablation", "hydra.sweep.dir=/x", "-m"):
        with pytest.raises(StudyError):
            check_extras([bad])


def test_failed_phase_names_itself_and_unknown_study_lists_known(capsys):
    with pytest.raises(StudyError, match=r"phase eval failed \(exit 3"):
        run_phase("eval", [sys.executable, "-c", "raise SystemExit(3)"])
    from vtc.runs.study import main

    with pytest.raises(SystemExit):
        main(["no_such_study"])
    assert "conf/experiment/no_such_study.yaml does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name, arms", [
    ("stf_vs_pool", {"none_64": ("NoCompression", 64), "pool_16": ("AvgPool2d", 16),
                     "stf_16": ("SpatialTokenFusion", 16), "stf_mbtf_16": ("STFMultiBlock", 16)}),
    ("llavolta_stages", {"none_64": ("NoCompression", 64), "llavolta_4stage": ("NoCompression", 64),
                         "vcc_8": ("VisualContextCompressor", 8)}),
])
def test_study_arms_compose(name, arms):
    """Each study's arms are its ablation sweep; every arm composes into the compressor (and, for the
    LLaVolta curriculum, the four-stage schedule) the study README promises."""
    from vtc.runs.study import arms_size

    cfg = compose("train", [f"experiment={name}"], hydra_config=True)
    assert cfg.task_name == name and cfg.hydra.sweeper.params.ablation == ",".join(arms)
    assert arms_size(cfg) == len(arms) and str(cfg.hydra.sweeper.params.seed) == "0,1,2"
    assert cfg.hydra.sweep.subdir == "none_64_seed_0"  # <arm>_seed_<seed>: one folder per job
    for arm, (cls, tokens) in arms.items():
        c = compose("train", [f"experiment={name}", f"ablation={arm}"])
        assert c.compressor._target_.endswith(cls)
        assert c.schedule.name == ("llavolta" if arm == "llavolta_4stage" else "constant")
        if cls == "VisualContextCompressor" and c.schedule.name == "constant":
            assert 64 // c.compressor.stride == tokens and c.compressor.layer == 0


@pytest.mark.slow
def test_multi_arm_study_trains_every_arm_and_seed(workspace, tmp_path):
    """llavolta_stages at tiny size: 3 arms x 1 seed in one sweep, one folder per arm and seed, the
    report one row per arm; the curriculum arm is tested uncompressed, the heavy arm at 8 tokens."""
    out = tmp_path / "results"
    proc = subprocess.run(study_cmd(workspace, out, name="llavolta_stages", seeds="0", steps=4), cwd=ROOT,
                          env=workspace.env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    record = json.loads((out / "study.json").read_text())
    train_dir = workspace.root / "outputs" / "studies" / "llavolta_stages" / "train"
    assert sorted(Path(c).parent.parent.name for c in record["checkpoints"]) == [
        "llavolta_4stage_seed_0", "none_64_seed_0", "vcc_8_seed_0"]
    assert all(Path(c).is_file() and Path(c).is_relative_to(train_dir) for c in record["checkpoints"])
    runs = {r.info.run_id: r for r in workspace.runs("llavolta_stages")}
    children = [runs[i] for i in record["mlflow"]["train"]["runs"]]
    # Run names carry the arm (swept from the yaml) and the seed.
    assert sorted(tuple(sorted(r.data.tags["mlflow.runName"].split(","))) for r in children) == [
        (f"ablation={a}", "seed=0") for a in ("llavolta_4stage", "none_64", "vcc_8")]
    # vcc pools inside the LLM (before layer 0): 64 tokens enter, every layer sees 8.
    tokens = sorted((r.data.params["schedule.name"], r.data.metrics["test/equiv_visual_tokens"]) for r in children)
    assert tokens == [("constant", 8.0), ("constant", 64.0), ("llavolta", 64.0)]
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["configurations"]) == 3 and all(len(c["run_ids"]) == 1 for c in rep["configurations"])
    # Compact row labels: no "–" for knobs an arm's compressor does not have.
    assert all("–" not in c["label"] for c in rep["configurations"]), [c["label"] for c in rep["configurations"]]


def test_the_video_study_arms_compose():
    """llavolta_video: five arms on the 56 px, 2x2-board video set; each
    arm's compressor, schedule and temporal reduction as experiments/llavolta_video/README.md says."""
    from vtc.runs.study import arms_size

    cfg = compose("train", ["experiment=llavolta_video"], hydra_config=True)
    arms = {"none": ("NoCompression", "constant"), "llavolta_4stage": ("NoCompression", "llavolta"),
            "vcc_8": ("VisualContextCompressor", "constant"), "temporal_first_8": ("TemporalPool", "constant"),
            "temporal_8": ("TemporalPool", "constant")}
    assert cfg.hydra.sweeper.params.ablation == ",".join(arms) and arms_size(cfg) == 5
    assert cfg.data.generate.kind == "video" and cfg.encoder.image_size == cfg.data.image_size == 56
    assert cfg.data.generate.grid == 2 and cfg.projector.frame_embeddings == 0 and cfg.data.generate.frames == 8
    for arm, (cls, schedule) in arms.items():
        c = compose("train", ["experiment=llavolta_video", f"ablation={arm}"])
        assert c.compressor._target_.endswith(cls) and c.schedule.name == schedule, arm
    assert compose("train", ["experiment=llavolta_video", "ablation=temporal_first_8"]).compressor.reduce == "first"
    assert compose("train", ["experiment=llavolta_video", "ablation=temporal_8"]).compressor.get("reduce", "mean") == "mean"
