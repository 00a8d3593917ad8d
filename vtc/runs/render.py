"""Rendering the MLflow reports (:mod:`vtc.runs.report`): the markdown table of aggregated
configurations (mean ± std, Pareto membership) and the figures: accuracy against cost with the
Pareto front marked, and training-loss curves coloured by curriculum stage.

matplotlib is imported only when a figure is drawn (``_plt``), headless (Agg).
"""
from __future__ import annotations

import bisect
import math

from vtc.runs.aggregate import COST_COLS, RUN_AVG_TOKENS


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
