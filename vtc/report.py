"""Reports from MLflow: ``python -m vtc.report --experiment NAME [--parent RUN_ID] [--out DIR]``.

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
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

# Params that never distinguish configurations: the seed (and what interpolates it), paths,
# run directories, the logger (its run name carries the seed override) and checkpoints.
IGNORE_KEYS = {"seed", "data.seed", "ckpt_path", "callbacks.model_checkpoint.dirpath",
               "trainer.default_root_dir", "sweep.overrides"}
IGNORE_PREFIXES = ("paths.", "logger.", "hydra.")
# Metric prefixes that are not benchmark scores.
NON_BENCH = {"train", "val", "test", "curriculum", "cost", "lr", "epoch", "trainer", "data"}
# The headline numbers of a benchmark (vtc.data.eval_files.score_benchmark's keys); the rest (per
# category, n, n_missing) stay in MLflow.
HEADLINE = ("acc", "f1", "img_acc", "perception", "cognition")
TOKEN_KEYS = ("visual_tokens", "equiv_visual_tokens")
# Evaluation cost (vtc.eval_cost), in table order.
COST_SHOWN = ("cost/prefill_tflops", "cost/prefill_ms", "cost/decode_tok_s", "cost/kv_bytes")


def ignored(key: str, value: str, run_dirs: tuple[str, ...]) -> bool:
    if key in IGNORE_KEYS or key.startswith(IGNORE_PREFIXES):
        return True
    return any(d and str(value).startswith(d) for d in run_dirs)


def config_key(params: dict) -> tuple:
    run_dirs = tuple(params[k] for k in ("paths.output_dir", "paths.log_dir") if params.get(k))
    return tuple(sorted((k, v) for k, v in params.items() if not ignored(k, v, run_dirs)))


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


@dataclass
class Group:
    key: tuple
    runs: list = field(default_factory=list)
    label: str = ""
    stats: dict = field(default_factory=dict)  # column -> (mean, std, n)
    pareto: dict = field(default_factory=dict)  # cost column -> bool


def accuracy_columns(runs) -> list[str]:
    keys = set().union(*(r.data.metrics for r in runs)) if runs else set()
    cols = [k for k in ("test/acc", "val/acc") if k in keys]
    # The synthetic benchmark's per-question-type accuracies (test/acc_cell, ...): which skill a
    # compressor costs.
    cols += sorted(k for k in keys if k.startswith("test/acc_"))
    cols += sorted(k for k in keys if k.count("/") == 1 and k.split("/")[0] not in NON_BENCH
                   and k.split("/")[1] in HEADLINE)
    return cols


def metric_value(run, col: str, derived: dict | None = None):
    m = {**run.data.metrics, **((derived or {}).get(run.info.run_id) or {})}
    if col in ("visual_tokens", "equiv_visual_tokens"):
        for split in ("test", "val", "train", "cost"):
            if f"{split}/{col}" in m:
                return m[f"{split}/{col}"]
        return None
    return m.get(col)


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


def group_runs(runs) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        key = config_key(r.data.params)
        groups.setdefault(key, Group(key)).runs.append(r)
    out = list(groups.values())
    # Label each configuration by the params that differ between configurations.
    if len(out) > 1:
        all_keys = set().union(*(dict(g.key) for g in out))
        differing = sorted(k for k in all_keys if len({dict(g.key).get(k) for g in out}) > 1)
    else:
        differing = []
    def label(g: Group, compact: bool) -> str:
        d = dict(g.key)
        return ", ".join(f"{k.removesuffix('._target_')}={short(d.get(k, '–'))}" for k in differing
                         if not compact or k in d)

    # Compact labels leave out the keys a configuration does not have (a pool row need not list
    # STF's knobs as "–"), unless that makes two rows read the same.
    compact = len({label(g, True) for g in out}) == len(out)
    for g in out:
        # One configuration: its run's name, or "all runs" when seeds were merged (a run name
        # such as "seed=0" would misname the row).
        single = g.runs[0].data.tags.get("mlflow.runName") if len(g.runs) == 1 else None
        g.label = label(g, compact) or single or "all runs"
    return out


def short(v: str) -> str:
    return v.rsplit(".", 1)[-1] if isinstance(v, str) and v.startswith("vtc.") else v


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """points = (cost, accuracy); a point is on the front if no other point has cost <= and
    accuracy >= with one of them strict. NaNs are never on it."""
    flags = []
    for i, (c, a) in enumerate(points):
        if math.isnan(c) or math.isnan(a):
            flags.append(False)
            continue
        dominated = any(
            j != i and not (math.isnan(c2) or math.isnan(a2)) and c2 <= c and a2 >= a and (c2 < c or a2 > a)
            for j, (c2, a2) in enumerate(points)
        )
        flags.append(not dominated)
    return flags


COST_COLS = {"tflops": "train/tflops_cum", "tokens": "visual_tokens"}
# A trained run's visual-token cost: the mean over its training steps of the equivalent tokens. A
# stage-wise run changes them by stage, so its last (often uncompressed) stage's value misplaced it.
RUN_AVG_TOKENS = "train/equiv_visual_tokens_avg"


def run_averages(client, runs) -> dict:
    """run id -> {RUN_AVG_TOKENS: value} for the runs that trained and do not log that running mean
    themselves: the step-weighted mean of their train/equiv_visual_tokens history."""
    from vtc.tracking import history_mean

    todo = [r for r in runs if "train/equiv_visual_tokens" in r.data.metrics and RUN_AVG_TOKENS not in r.data.metrics]
    means = {r.info.run_id: history_mean(client, r.info.run_id, "train/equiv_visual_tokens") for r in todo}
    return {rid: {RUN_AVG_TOKENS: v} for rid, v in means.items() if v is not None}


def tokens_column(runs, derived: dict | None = None) -> str:
    """The tokens cost axis: the run average when the runs trained, else the test-time visual
    tokens (as ``tflops_column`` picks training TFLOPs when the runs trained)."""
    trained = derived or any(RUN_AVG_TOKENS in r.data.metrics for r in runs)
    return RUN_AVG_TOKENS if trained else COST_COLS["tokens"]


def tflops_column(runs) -> str:
    """Training TFLOPs when the runs trained, else measured-model prefill TFLOPs (eval runs)."""
    if any("train/tflops_cum" in r.data.metrics for r in runs):
        return "train/tflops_cum"
    return "cost/prefill_tflops" if any("cost/prefill_tflops" in r.data.metrics for r in runs) else "train/tflops_cum"


def summarize(runs, metric: str | None = None, derived: dict | None = None) -> tuple[list[Group], list[str], str | None]:
    """``derived``: per run id, metrics computed from histories (``run_averages``)."""
    groups = group_runs(runs)
    acc_cols = accuracy_columns(runs)
    present = {k for r in runs for k in r.data.metrics}
    cost_keys = [k for k in COST_SHOWN if k in present]
    tokens_col = tokens_column(runs, derived)
    cols = (acc_cols + list(TOKEN_KEYS) + ([tokens_col] if tokens_col == RUN_AVG_TOKENS else [])
            + ["train/tflops_cum", "train/time_cum_s"] + cost_keys)
    cost_cols = {"tflops": tflops_column(runs), "tokens": tokens_col}
    for g in groups:
        for col in cols:
            vals = [metric_value(r, col, derived) for r in g.runs]
            vals = [v for v in vals if v is not None]
            m, s = mean_std(vals)
            g.stats[col] = (m, s, len(vals))
    primary = metric or (acc_cols[0] if acc_cols else None)
    if primary:
        for name, col in cost_cols.items():
            flags = pareto_front([(g.stats[col][0], g.stats.get(primary, (float("nan"),))[0]) for g in groups])
            for g, f in zip(groups, flags):
                g.pareto[name] = f
    return groups, cols, primary


def fmt(mean: float, std: float, n: int, digits: int | str) -> str:
    if n == 0 or math.isnan(mean):
        return "–"
    spec = f".{digits}f" if isinstance(digits, int) else digits
    if n == 1:  # one run has no spread: "± 0.0000" would claim one
        return f"{mean:{spec}}"
    return f"{mean:{spec}} ± {std:{spec}}"


DIGITS = {"train/tflops_cum": 4, "train/time_cum_s": 1, "visual_tokens": 1, "equiv_visual_tokens": 1,
          RUN_AVG_TOKENS: 1, "cost/prefill_tflops": ".4g", "cost/prefill_ms": 2, "cost/decode_tok_s": 1, "cost/kv_bytes": 0}
HEADERS = {"visual_tokens": "visual tokens", "equiv_visual_tokens": "equiv. visual tokens",
           RUN_AVG_TOKENS: "equiv. visual tokens (train, run avg)",
           "train/tflops_cum": "TFLOPs (train)", "train/time_cum_s": "train time (s)",
           "cost/prefill_tflops": "prefill TFLOPs/sample", "cost/prefill_ms": "prefill ms (TTFT)",
           "cost/decode_tok_s": "decode tok/s", "cost/kv_bytes": "KV bytes"}


def markdown(groups, cols, primary, experiment, parent, tflops_col: str = "train/tflops_cum",
             tokens_col: str = "visual_tokens") -> str:
    lines = [f"# Report: experiment `{experiment}`" + (f", sweep parent `{parent}`" if parent else ""), ""]
    lines.append(f"{sum(len(g.runs) for g in groups)} runs in {len(groups)} configurations; "
                 "mean ± std (sample std, ddof=1) over seeds; n = runs per configuration.")
    if primary:
        lines.append(f"Pareto fronts: maximise `{primary}`, minimise TFLOPs (`{tflops_col}`) / visual tokens "
                     f"(`{tokens_col}`; ✓ = on the front).")
    lines.append("")
    head = ["configuration", "n"] + [HEADERS.get(c, c) for c in cols] + ["Pareto TFLOPs", "Pareto tokens"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for g in groups:
        cells = [g.label.replace("|", "\\|"), str(len(g.runs))]
        cells += [fmt(*g.stats[c], DIGITS.get(c, 4)) for c in cols]
        cells += ["✓" if g.pareto.get(k) else "" for k in ("tflops", "tokens")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![accuracy vs TFLOPs](acc_vs_tflops.png)", "",
              "![accuracy vs visual tokens](acc_vs_tokens.png)", "",
              "![training curves](training_curves.png)", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(groups, primary, cost: str, path: str, xlabel: str, col: str | None = None) -> None:
    plt = _plt()
    col = col or COST_COLS[cost]
    fig, ax = plt.subplots(figsize=(7, 5))
    pts = [(g.stats[col][0], g.stats[primary][0], g.stats[primary][1], g) for g in groups
           if primary and not math.isnan(g.stats[col][0]) and not math.isnan(g.stats[primary][0])]
    for x, y, s, g in pts:
        on = g.pareto.get(cost)
        ax.errorbar([x], [y], yerr=[s], fmt="o", color="tab:red" if on else "tab:blue", capsize=3)
        ax.annotate(g.label[:40], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((x, y) for x, y, _, g in pts if g.pareto.get(cost))
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:red",
                label="Pareto front", linestyle="--")
        ax.legend()
    if not pts:
        ax.text(0.5, 0.5, "no runs with both metrics", ha="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(primary or "accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_at(steps: list[int], stages: list[float], step: int) -> int:
    i = bisect.bisect_right(steps, step) - 1
    return int(stages[i]) if i >= 0 else (int(stages[0]) if stages else 0)


def plot_curves(client, groups, path: str, max_panels: int = 16) -> None:
    plt = _plt()
    shown = groups[:max_panels]
    n = max(1, len(shown))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    seen_stages = set()
    for ax, g in zip(axes.flat, shown):
        for r in g.runs:
            loss = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train/loss"))
            st = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "curriculum/stage"))
            if not loss:
                continue
            st_steps, st_vals = [s for s, _ in st], [v for _, v in st]
            stages = [stage_at(st_steps, st_vals, s) for s, _ in loss]
            ax.plot([s for s, _ in loss], [v for _, v in loss], color="0.8", linewidth=0.8, zorder=1)
            for k in sorted(set(stages)):
                xs = [s for (s, _), k2 in zip(loss, stages) if k2 == k]
                ys = [v for (_, v), k2 in zip(loss, stages) if k2 == k]
                ax.scatter(xs, ys, s=6, color=cmap(k % 10), zorder=2)
                seen_stages.add(k)
        ax.set_title(g.label[:50] or "run", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("train/loss")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if seen_stages:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(k % 10), label=f"stage {k}")
                   for k in sorted(seen_stages)]
        fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def make_report(experiment: str, parent: str | None = None, out: str | None = None,
                tracking_uri: str | None = None, metric: str | None = None) -> dict:
    from mlflow.tracking import MlflowClient

    from vtc.tracking import tracking_uri as default_uri

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
    ap = argparse.ArgumentParser(prog="python -m vtc.report", description=__doc__.split("\n\n")[0])
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
