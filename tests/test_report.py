"""vtc.report on a temporary MLflow store filled with synthetic runs through the client API."""
import json
import math
import re

import numpy as np
import pytest

from vtc.report import make_report, pareto_front


# configuration -> (compressor, stride, visual tokens, per-seed (test/acc, val/acc, tflops, time))
CONFIGS = {
    "none": ("vtc.compressors.NoCompression", "None", 64, [(0.50, 0.48, 4.0, 100.0), (0.54, 0.50, 4.2, 104.0),
                                                           (0.55, 0.49, 4.1, 98.0)]),
    "pool2": ("vtc.compressors.AvgPool2d", "2", 16, [(0.52, 0.47, 1.5, 60.0), (0.50, 0.45, 1.6, 62.0)]),
    "pool4": ("vtc.compressors.AvgPool2d", "4", 4, [(0.30, 0.28, 1.0, 40.0), (0.34, 0.30, 1.1, 41.0)]),
    "pool8": ("vtc.compressors.AvgPool2d", "8", 1, [(0.20, 0.21, 1.2, 45.0)]),  # dominated on TFLOPs
}


@pytest.fixture()
def store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("abl", artifact_location=str(tmp_path / "artifacts"))
    parent = c.create_run(exp, run_name="sweep x", tags={"vtc.kind": "sweep"}).info.run_id
    other = c.create_run(exp, run_name="not in the sweep").info.run_id  # must be left out with --parent
    c.log_metric(other, "test/acc", 0.99)
    c.log_param(other, "seed", "0")
    c.set_terminated(other)
    ids = {}
    for name, (target, stride, tokens, seeds) in CONFIGS.items():
        for seed, (test, val, tfl, t) in enumerate(seeds):
            r = c.create_run(exp, run_name=f"{name} seed={seed}", tags={"mlflow.parentRunId": parent}).info.run_id
            ids.setdefault(name, []).append(r)
            for k, v in {"seed": seed, "data.seed": seed, "compressor._target_": target, "compressor.stride": stride,
                         "optim.lr": "0.001", "paths.output_dir": f"/tmp/runs/{name}{seed}",
                         "trainer.default_root_dir": f"/tmp/runs/{name}{seed}",
                         "logger.mlflow.run_name": f"{name},seed={seed}"}.items():
                c.log_param(r, k, str(v))
            c.log_metric(r, "test/acc", test)
            c.log_metric(r, "val/acc", val)
            c.log_metric(r, "gqa/acc", test / 2)
            c.log_metric(r, "test/visual_tokens", tokens)
            c.log_metric(r, "test/equiv_visual_tokens", tokens)
            c.log_metric(r, "train/tflops_cum", tfl)
            c.log_metric(r, "train/time_cum_s", t)
            for step in range(6):
                c.log_metric(r, "train/loss", 2.0 - 0.1 * step, step=step)
            for step, stage in ((0, 0), (3, 1)):
                c.log_metric(r, "curriculum/stage", stage, step=step)
            c.set_terminated(r)
    return uri, c, parent, ids


def parse_table(md: str) -> dict:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [x.strip() for x in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(head, cells))
    return rows


def pm(cell: str) -> tuple[float, float]:
    m = re.fullmatch(r"([-\d.]+) ± ([-\d.]+)", cell)
    assert m, cell
    return float(m.group(1)), float(m.group(2))


def test_report_table_pareto_plots_and_parent_artifacts(store, tmp_path):
    uri, client, parent, ids = store
    out = tmp_path / "report"
    data = make_report("abl", parent=parent, out=str(out), tracking_uri=uri)

    md = (out / "report.md").read_text()
    rows = parse_table(md)
    assert len(rows) == len(CONFIGS)  # seeds merged, the run outside the sweep left out
    label = {"none": "compressor=NoCompression, compressor.stride=None",
             "pool2": "compressor=AvgPool2d, compressor.stride=2",
             "pool4": "compressor=AvgPool2d, compressor.stride=4",
             "pool8": "compressor=AvgPool2d, compressor.stride=8"}
    for name, (_, _, tokens, seeds) in CONFIGS.items():
        row = rows[label[name]]
        arr = np.array(seeds)
        assert row["n"] == str(len(seeds))
        for col, j, digits in (("test/acc", 0, 4), ("val/acc", 1, 4), ("TFLOPs (train)", 2, 4),
                               ("train time (s)", 3, 1)):
            mean, std = pm(row[col])
            assert mean == pytest.approx(arr[:, j].mean(), abs=0.6 * 10 ** -digits)
            exp_std = arr[:, j].std(ddof=1) if len(arr) > 1 else 0.0
            assert std == pytest.approx(exp_std, abs=0.6 * 10 ** -digits)
        assert pm(row["gqa/acc"])[0] == pytest.approx(arr[:, 0].mean() / 2, abs=1e-4)
        assert pm(row["visual tokens"]) == (tokens, 0.0)

    # Pareto: (cost, mean test/acc). TFLOPs: none (4.1, .53), pool2 (1.55, .51), pool4 (1.05, .32),
    # pool8 (1.2, .20) -> pool8 dominated by pool4. Tokens: every point trades accuracy for tokens.
    tick = {n: rows[label[n]] for n in CONFIGS}
    assert {n for n, r in tick.items() if r["Pareto TFLOPs"] == "✓"} == {"none", "pool2", "pool4"}
    assert {n for n, r in tick.items() if r["Pareto tokens"] == "✓"} == {"none", "pool2", "pool4", "pool8"}

    js = json.loads((out / "report.json").read_text())
    assert {tuple(sorted(c["run_ids"])) for c in js["configurations"]} == {tuple(sorted(v)) for v in ids.values()}
    for name in ("acc_vs_tflops.png", "acc_vs_tokens.png", "training_curves.png"):
        p = out / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    arts = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.json", "report/acc_vs_tflops.png", "report/acc_vs_tokens.png",
            "report/training_curves.png"} <= arts
    assert data["primary_metric"] == "test/acc"


def test_report_without_parent_reads_whole_experiment_and_logs_nothing(store, tmp_path):
    uri, client, parent, _ = store
    from vtc.report import main

    main(["--experiment", "abl", "--out", str(tmp_path / "all"), "--tracking-uri", uri])
    rows = parse_table((tmp_path / "all" / "report.md").read_text())
    assert len(rows) == len(CONFIGS) + 1  # the extra run forms its own configuration; the sweep parent none
    assert not client.list_artifacts(parent)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.6), (0.5, math.nan)]
    assert pareto_front(pts) == [True, True, False, False, False]
