"""Aggregation for the MLflow reports (:mod:`vtc.runs.report`): runs grouped into configurations
by their params (ignoring the seed and every path / run-directory / logger param), mean ± std of
each column over a configuration's runs (sample std, ddof=1; 0 for a single run), the columns a
set of runs has, and the Pareto fronts of accuracy against cost.

Works on MLflow run objects (``run.data.params``, ``run.data.metrics``, ``run.info``) that are
already fetched; nothing here talks to the tracking server.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field

# Params that never distinguish configurations: the seed (and what interpolates it), paths,
# run directories, the logger (its run name carries the seed override) and checkpoints.
IGNORE_KEYS = {"seed", "data.seed", "ckpt_path", "callbacks.model_checkpoint.dirpath",
               "trainer.default_root_dir", "sweep.overrides"}
IGNORE_PREFIXES = ("paths.", "logger.", "hydra.")
# Metric prefixes that are not benchmark scores.
NON_BENCH = {"train", "val", "test", "curriculum", "cost", "lr", "epoch", "trainer", "data"}
# The headline numbers of a benchmark (vtc.data.eval_score.score_benchmark's keys); the rest (per
# category, n, n_missing) stay in MLflow.
HEADLINE = ("acc", "f1", "img_acc", "perception", "cognition")
TOKEN_KEYS = ("visual_tokens", "equiv_visual_tokens")
# Evaluation cost (vtc.cost.meter), in table order.
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


LABEL_VALUE_CHARS = 40


def short(v: str) -> str:
    """A param value as a row label shows it: a vtc class by its name, and a long value (a
    schedule's stages, a list of shards) cut to ``LABEL_VALUE_CHARS`` with a digest of the whole,
    so two long values that differ late still label two rows apart."""
    if isinstance(v, str) and v.startswith("vtc."):
        return v.rsplit(".", 1)[-1]
    if isinstance(v, str) and len(v) > LABEL_VALUE_CHARS:
        return f"{v[:LABEL_VALUE_CHARS - 9]}…#{hashlib.sha1(v.encode()).hexdigest()[:6]}"
    return v


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
