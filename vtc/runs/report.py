"""Reports from MLflow: ``python -m vtc.runs.report --experiment NAME [--parent RUN_ID] [--out DIR]``.

Reads runs from the MLflow store only (``MLFLOW_TRACKING_URI`` or ``--tracking-uri``; default the
repo's sqlite file). Runs are grouped into configurations by their params, ignoring the seed and
every path / run-directory / logger param; each configuration gets one row with mean ± std over
its runs (seeds). Std is the sample standard deviation (ddof=1; 0 for a single run).

Writes into ``--out`` (default ``reports/<experiment>[-<parent>]``):

- ``report.md``: the table (accuracies: ``test/acc``, ``val/acc``, ``test/acc_<question type>``
  and each benchmark's headline numbers from ``eval.py benchmark=...``: ``<bench>/acc``,
  ``pope/f1``, ``scienceqa/img_acc``, ``mme/perception``, ``mme/cognition``; visual tokens: ``test/visual_tokens`` and
  ``test/equiv_visual_tokens``, falling back to the ``val/``, ``train/`` and ``cost/`` ones; a
  trained run's equivalent visual tokens averaged over all its training steps (a stage-wise run's
  token cost); ``train/tflops_cum`` (the run's total); ``train/time_cum_s``; the evaluation cost ``cost/prefill_tflops``,
  ``cost/prefill_ms``, ``cost/decode_tok_s``, ``cost/kv_bytes``), Pareto membership;
- ``report.json``: the same numbers, machine-readable;
- ``acc_vs_tflops.png``, ``acc_vs_tokens.png``: accuracy against cost, the Pareto front marked
  (when the runs trained: ``train/tflops_cum`` and the run-average equivalent tokens; else
  ``cost/prefill_tflops`` and the visual tokens, e.g. for the ``eval`` experiment);
- ``training_curves.png``: ``train/loss`` against step, coloured by the curriculum stage in force
  (the history of ``curriculum/stage``; stage 0 when a run has no curriculum).

With ``--parent`` only the children of that run (tag ``mlflow.parentRunId``) are read and the
files are logged as artifacts of the parent under ``report/``. ``--parent latest`` is the newest
sweep parent run (tag ``vtc.kind`` = ``sweep``, by start time) of the experiment.

The work is split by responsibility: :mod:`vtc.runs.fetch` reads the runs from MLflow,
:mod:`vtc.runs.aggregate` groups them and computes the statistics and Pareto fronts,
:mod:`vtc.runs.render` writes the table and figures; this module puts them together.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from vtc.runs.aggregate import RUN_AVG_TOKENS, summarize, tflops_column, tokens_column
from vtc.runs.fetch import fetch_runs, latest_parent, run_averages
from vtc.runs.render import markdown, plot_curves, plot_pareto
from vtc.runs.tracking import tracking_uri as default_uri


def make_report(experiment: str, parent: str | None = None, out: str | None = None,
                tracking_uri: str | None = None, metric: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri or default_uri()
    client = MlflowClient(tracking_uri=uri)
    if parent == "latest":
        parent = latest_parent(client, experiment)
    runs = fetch_runs(client, experiment, parent)
    if not runs:
        raise SystemExit(f"no runs in experiment {experiment!r}" + (f" under parent {parent}" if parent else ""))
    derived = run_averages(client, runs)
    groups, cols, primary = summarize(runs, metric, derived)
    tokens_col = tokens_column(runs, derived)
    out = out or os.path.join("reports", experiment + (f"-{parent[:8]}" if parent else ""))
    os.makedirs(out, exist_ok=True)
    files = {
        "report.md": markdown(groups, cols, primary, experiment, parent, tflops_column(runs), tokens_col),
    }
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(files["report.md"])
    data = {
        "experiment": experiment, "parent": parent, "primary_metric": primary, "columns": cols,
        "configurations": [
            {"label": g.label, "params": dict(g.key), "run_ids": [r.info.run_id for r in g.runs],
             "stats": {c: {"mean": m, "std": s, "n": n} for c, (m, s, n) in g.stats.items()},
             "pareto": g.pareto}
            for g in groups
        ],
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(data, f, indent=1, default=str)
    if primary:
        tcol = tflops_column(runs)
        xlabel = "training TFLOPs (train/tflops_cum)" if tcol == "train/tflops_cum" else f"prefill TFLOPs per sample ({tcol})"
        plot_pareto(groups, primary, "tflops", os.path.join(out, "acc_vs_tflops.png"), xlabel, col=tcol)
        plot_pareto(groups, primary, "tokens", os.path.join(out, "acc_vs_tokens.png"),
                    "equivalent visual tokens, mean over training steps" if tokens_col == RUN_AVG_TOKENS
                    else "visual tokens per image", col=tokens_col)
    plot_curves(client, groups, os.path.join(out, "training_curves.png"))
    written = sorted(os.path.join(out, f) for f in os.listdir(out)
                     if f in ("report.md", "report.json", "acc_vs_tflops.png", "acc_vs_tokens.png", "training_curves.png"))
    if parent:
        for p in written:
            client.log_artifact(parent, p, artifact_path="report")
    data["files"] = written
    return data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vtc.runs.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experiment", default="train",
                    help="MLflow experiment name (default: train, where train.py logs; eval, a study's name, ...)")
    ap.add_argument("--parent", default=None,
                    help="sweep parent run id, or `latest` (the experiment's newest sweep parent): report its "
                         "children, log files to it")
    ap.add_argument("--out", default=None, help="output folder (default reports/<experiment>[-<parent>])")
    ap.add_argument("--tracking-uri", default=None, help="MLflow store (default $MLFLOW_TRACKING_URI or the repo's sqlite)")
    ap.add_argument("--metric", default=None, help="accuracy for the Pareto fronts (default test/acc, else val/acc)")
    a = ap.parse_args(argv)
    data = make_report(a.experiment, a.parent, a.out, a.tracking_uri, a.metric)
    if a.parent == "latest":
        print(f"sweep parent (latest): {data['parent']}", file=sys.stderr)
    print("\n".join(data["files"]))


if __name__ == "__main__":
    main()