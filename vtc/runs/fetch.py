"""Reading runs from the MLflow store for the reports (:mod:`vtc.runs.report`): an experiment's
runs (optionally only one sweep parent's children), the newest sweep parent, and the metrics that
need a run's history rather than its last values.

Every function takes an ``MlflowClient``; the caller makes it, so this module imports no MLflow.
"""
from __future__ import annotations

from vtc.runs.aggregate import RUN_AVG_TOKENS
from vtc.runs.tracking import history_mean


def experiment_id(client, experiment: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment named {experiment!r}")
    return exp.experiment_id


def latest_parent(client, experiment: str, since_ms: int | None = None) -> str:
    """The id of the newest sweep parent run (tag ``vtc.kind`` = ``sweep``) of ``experiment``;
    with ``since_ms``, only one started at or after that time (ms since the epoch) counts."""
    filt = "tags.`vtc.kind` = 'sweep'"
    if since_ms is not None:
        filt += f" and attributes.start_time >= {int(since_ms)}"
    runs = client.search_runs([experiment_id(client, experiment)], filter_string=filt, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        since = f" started since {since_ms} ms" if since_ms is not None else ""
        raise SystemExit(f"no sweep parent run (tag vtc.kind=sweep){since} in experiment {experiment!r}: "
                         "sweep parents come from multiruns (`python train.py -m ...` / `python eval.py -m ...`)")
    return runs[0].info.run_id


def fetch_runs(client, experiment: str, parent: str | None) -> list:
    exp_id = experiment_id(client, experiment)
    filt = f"tags.mlflow.parentRunId = '{parent}'" if parent else ""
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filt, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return [r for r in runs if r.data.tags.get("vtc.kind") != "sweep" and r.info.status not in ("FAILED", "KILLED")]


def run_averages(client, runs) -> dict:
    """run id -> {RUN_AVG_TOKENS: value} for the runs that trained and do not log that running mean
    themselves: the step-weighted mean of their train/equiv_visual_tokens history."""
    todo = [r for r in runs if "train/equiv_visual_tokens" in r.data.metrics and RUN_AVG_TOKENS not in r.data.metrics]
    means = {r.info.run_id: history_mean(client, r.info.run_id, "train/equiv_visual_tokens") for r in todo}
    return {rid: {RUN_AVG_TOKENS: v} for rid, v in means.items() if v is not None}
