"""The Pareto plot of experiments/zoo_ranking: accuracy against prefill TFLOPs per sample, one panel
per budget, one labelled point per method (mean ± std over the 3 seeds), from results/report.json.

    python experiments/zoo_ranking/pareto.py      # writes results/pareto.png

The report lists the configurations in the eval sweep's order (vtc/runs/study.py, STUDIES
["zoo_ranking"]): none_64, then the 14 options at 16 tokens, then the 13 at 4 (ToMe reaches 16 only).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
AT_16 = ["random_prune", "downsample", "pool", "m3", "divprune", "vispruner", "visionzip", "cdpruner", "fastv",
         "dart", "pyramid_drop", "sparsevlm", "vcc", "tome"]
AT_4 = [m for m in AT_16 if m != "tome"]
BASELINES = {"random_prune", "downsample"}
IN_LLM = {"cdpruner", "fastv", "dart", "pyramid_drop", "sparsevlm", "vcc"}


def main() -> Path:
    configs = json.loads((HERE / "results" / "report.json").read_text())["configurations"]
    assert len(configs) == 1 + len(AT_16) + len(AT_4), len(configs)

    def point(c):
        s = c["stats"]
        return s["cost/prefill_tflops"]["mean"] * 1e6, s["test/acc"]["mean"] * 100, s["test/acc"]["std"] * 100

    none = point(configs[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, names, rows, budget in ((axes[0], AT_16, configs[1:1 + len(AT_16)], 16),
                                    (axes[1], AT_4, configs[1 + len(AT_16):], 4)):
        for name, c in zip(names, rows):
            x, y, e = point(c)
            color = "tab:red" if name in BASELINES else "tab:blue" if name in IN_LLM else "tab:green"
            ax.errorbar(x, y, yerr=e, fmt="o", color=color, capsize=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
        ax.errorbar(*none[:2], yerr=none[2], fmt="s", color="black", capsize=3)
        ax.annotate("none (64)", none[:2], textcoords="offset points", xytext=(-55, 5), fontsize=8)
        ax.set_title(f"{budget} of 64 visual tokens, test-time only (red: baselines, blue: in-LLM, green: pre-LLM)",
                     fontsize=9)
        ax.set_xlabel("prefill MFLOPs per sample (cost/prefill_tflops x 1e6)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy, % (mean ± std, 3 seeds)")
    fig.tight_layout()
    out = HERE / "results" / "pareto.png"
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
