"""vtc.runs.report on a temporary MLflow store filled with synthetic runs through the client API."""
import json
import math
import re

import numpy as np
import pytest

from vtc.runs.aggregate import pareto_front
from vtc.runs.report import main, make_report


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
            c.log_metric(r, "test/acc_cell", test / 4)
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
    """(mean, std) of a table cell; a configuration of one run shows its value alone (std 0)."""
    if re.fullmatch(r"[-\d.]+", cell):
        return float(cell), 0.0
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
        assert pm(row["test/acc_cell"])[0] == pytest.approx(arr[:, 0].mean() / 4, abs=1e-4)
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
    from vtc.runs.report import main

    main(["--experiment", "abl", "--out", str(tmp_path / "all"), "--tracking-uri", uri])
    rows = parse_table((tmp_path / "all" / "report.md").read_text())
    assert len(rows) == len(CONFIGS) + 1  # the extra run forms its own configuration; the sweep parent none
    assert not client.list_artifacts(parent)


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.55), (3.0, 0.6), (0.5, math.nan)]
    assert pareto_front(pts) == [True, True, False, False, False]


def test_report_of_eval_runs_benchmark_headlines_and_cost(tmp_path):
    """eval.py runs (no training metrics): one row per benchmark and compressor, the headline
    numbers only, the cost columns, Pareto on measured-model prefill TFLOPs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))
    # (benchmark, compressor) -> per seed: (headline metrics, prefill_tflops, prefill_ms, kv_bytes, tokens)
    runs = {
        ("pope", "none"): [({"pope/acc": 0.80, "pope/f1": 0.82, "pope/adversarial/acc": 0.7, "pope/n": 6}, 2.0, 10.0, 4000, 64),
                           ({"pope/acc": 0.84, "pope/f1": 0.80, "pope/adversarial/acc": 0.9, "pope/n": 6}, 2.0, 12.0, 4000, 64)],
        ("pope", "pool"): [({"pope/acc": 0.70, "pope/f1": 0.71, "pope/adversarial/acc": 0.6, "pope/n": 6}, 0.5, 4.0, 1000, 16)],
        ("mme", "none"): [({"mme/perception": 1200.0, "mme/cognition": 300.0, "mme/OCR/acc": 50.0}, 2.1, 11.0, 4100, 64)],
    }
    for (bench, comp), seeds in runs.items():
        for seed, (mets, tfl, ms, kv, tok) in enumerate(seeds):
            r = c.create_run(exp).info.run_id
            for k, v in {"seed": seed, "benchmark.name": bench, "compressor._target_": comp}.items():
                c.log_param(r, k, str(v))
            for k, v in {**mets, "cost/prefill_tflops": tfl * 1e-6, "cost/prefill_ms": ms, "cost/kv_bytes": kv,
                         "cost/decode_tok_s": 100.0, "cost/batch_size": 4, "cost/visual_tokens": tok}.items():
                c.log_metric(r, k, v)
            c.set_terminated(r)
    data = make_report("eval", out=str(tmp_path / "rep"), tracking_uri=uri, metric="pope/acc")
    assert data["columns"][:4] == ["mme/cognition", "mme/perception", "pope/acc", "pope/f1"]
    assert not [col for col in data["columns"] if col.endswith(("/n", "adversarial/acc", "OCR/acc"))]
    assert "cost/batch_size" not in data["columns"]
    rows = parse_table((tmp_path / "rep" / "report.md").read_text())
    assert len(rows) == 3
    row = next(r for k, r in rows.items() if "pope" in k and "none" in k)
    assert pm(row["pope/acc"]) == pytest.approx((0.82, np.std([0.80, 0.84], ddof=1)), abs=1e-4)
    assert pm(row["prefill ms (TTFT)"]) == pytest.approx((11.0, np.std([10.0, 12.0], ddof=1)), abs=0.006)
    assert pm(row["KV bytes"]) == (4000, 0) and pm(row["visual tokens"]) == (64, 0)
    assert row["mme/perception"] == "–"
    by_label = {cfg["label"]: cfg for cfg in data["configurations"]}
    pool = next(v for k, v in by_label.items() if "pool" in k)
    none = next(v for k, v in by_label.items() if "pope" in k and "none" in k)
    assert pool["pareto"]["tflops"] and none["pareto"]["tflops"]  # cheaper-and-worse vs dearer-and-better
    assert "cost/prefill_tflops" in (tmp_path / "rep" / "report.md").read_text()


def test_parent_latest_is_the_newest_sweep_parent(store, tmp_path, capsys):
    """`--parent latest`: the experiment's newest run tagged vtc.kind=sweep (not a newer plain run)."""
    uri, client, parent, ids = store
    from vtc.runs.report import main

    exp = client.get_experiment_by_name("abl").experiment_id
    old = client.create_run(exp, run_name="older sweep", tags={"vtc.kind": "sweep"}, start_time=1000).info.run_id
    client.set_terminated(old)
    client.create_run(exp, run_name="newer plain run")  # newest run, but no sweep parent
    main(["--experiment", "abl", "--parent", "latest", "--out", str(tmp_path / "latest"), "--tracking-uri", uri])
    assert f"sweep parent (latest): {parent}" in capsys.readouterr().err
    js = json.loads((tmp_path / "latest" / "report.json").read_text())
    assert js["parent"] == parent
    assert {tuple(sorted(c["run_ids"])) for c in js["configurations"]} == {tuple(sorted(v)) for v in ids.values()}
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {"report/report.md"}
    assert not client.list_artifacts(old)


def test_parent_latest_without_a_sweep_is_a_clear_error(tmp_path):
    from mlflow.tracking import MlflowClient

    from vtc.runs.report import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("single", artifact_location=str(tmp_path / "artifacts"))
    c.set_terminated(c.create_run(exp).info.run_id)
    with pytest.raises(SystemExit, match=r"no sweep parent run \(tag vtc.kind=sweep\) in experiment 'single'"):
        main(["--experiment", "single", "--parent", "latest", "--out", str(tmp_path / "x"), "--tracking-uri", uri])
    with pytest.raises(SystemExit, match="no MLflow experiment named 'nope'"):
        main(["--experiment", "nope", "--parent", "latest", "--tracking-uri", uri])


def test_one_run_is_shown_without_a_spread():
    from vtc.runs.render import fmt

    assert fmt(0.5, 0.0, 1, 4) == "0.5000"  # not "0.5000 ± 0.0000": one run has no spread
    assert fmt(0.5, 0.1, 3, 4) == "0.5000 ± 0.1000"


def test_experiment_defaults_to_train(tmp_path):
    """`python -m vtc.runs.report` as the README shows it: the train experiment unless told otherwise."""
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(SystemExit, match="'train'"):
        main(["--tracking-uri", uri, "--out", str(tmp_path / "r")])


def test_a_long_param_value_labels_its_row_short_and_apart():
    from vtc.runs.aggregate import LABEL_VALUE_CHARS, short

    a = "[{'end': 0.25, 'knobs': {'layer': 2, 'stride': 8}}, {'end': 0.5, 'knobs': {'layer': 2, 'stride': 2}}]"
    b = a.replace("'stride': 2}}]", "'stride': 4}}]")  # differs only past the cut
    assert len(short(a)) <= LABEL_VALUE_CHARS and short(a) != short(b)
    assert short(a).startswith(a[:LABEL_VALUE_CHARS - 9])
    assert short("vtc.compressors.pool.AvgPool2d") == "AvgPool2d" and short("8") == "8"
