"""Part 2 of experiments/zoo_ranking against part 1, seed by seed: what fine-tuning with a method
buys over applying it at test time to the same uncompressed model.

    python experiments/zoo_ranking/paired.py --tracking-uri sqlite:///<the studies' store>

Reads, from MLflow, the part-2 training runs (experiment ``zoo_ranking_trained``: every finished
run of it, the newest per method option and seed, unless ``--parent`` names the sweeps to read; a
sweep continued in a second launch, e.g. one more seed, is read whole that way) and part 1's
test-time evaluations (the eval sweep named in results/study.json), pairs them by method option and
seed (part 2 starts from part 1's model of the same seed), and writes results/trained/paired.md and
.json: per method and budget the seeds both parts have, test accuracy (and by question type)
trained, training-free, their paired difference, and the trained method minus random pruning
trained alike at the same budget, seed by seed (with how many seeds it is above).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from vtc.runs.fetch import fetch_runs

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TYPES = ("cell", "count", "relation")


def mean_std(xs: list[float]) -> str:
    xs = [100 * x for x in xs]
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def trained_runs(client, parents: list[str] | None) -> dict[tuple[str, int], dict]:
    """(option, seed) -> test metrics of the finished part-2 runs; the newest run wins a key."""
    runs = [r for p in (parents or [None]) for r in fetch_runs(client, "zoo_ranking_trained", p)]
    out = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        if r.info.status != "FINISHED" or "test/acc" not in r.data.metrics:
            continue
        out[(r.data.params["ablation"] if "ablation" in r.data.params else
             re.search(r"ablation=(\w+)", r.data.tags["mlflow.runName"]).group(1), int(r.data.params["seed"]))] = r.data.metrics
    return out


def budget(option: str) -> int:
    return int(option.rsplit("_", 1)[1])


def ordered(options: set[str]) -> list[str]:
    """The configured arms' order (none_64 first), each method's 16-token arm, then the 4-token ones."""
    arms = yaml.safe_load((ROOT / "conf/experiment/zoo_ranking_trained.yaml").read_text())
    methods = [o.rsplit("_", 1)[0] for o in str(arms["hydra"]["sweeper"]["params"]["ablation"]).split(",")]
    rank = {m: i for i, m in enumerate(methods)}
    return sorted(options, key=lambda o: (-budget(o), rank.get(o.rsplit("_", 1)[0], len(rank)), o))


def training_free_runs(client) -> dict[tuple[str, int], dict]:
    study = json.loads((HERE / "results" / "study.json").read_text())
    out = {}
    for r in fetch_runs(client, study["mlflow"]["eval"]["experiment"], study["mlflow"]["eval"]["parent"]):
        name = r.data.tags["mlflow.runName"]
        option = re.search(r"\+ablation=(\w+)", name).group(1)
        seed = int(re.search(r"seed_(\d+)", r.data.tags["vtc.ckpt_path"]).group(1))
        out[(option, seed)] = r.data.metrics
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--parent", action="append", default=None,
                    help="a part-2 sweep parent run id to read (repeatable; default: every run of the experiment)")
    a = ap.parse_args(argv)
    client = MlflowClient(tracking_uri=a.tracking_uri)
    trained, free = trained_runs(client, a.parent), training_free_runs(client)
    rows, table = [], []
    for option in ordered({o for o, _ in trained}):
        seeds = sorted(s for o, s in trained if o == option)
        t = [trained[(option, s)]["test/acc"] for s in seeds]
        # Methods with parameters (stf, stf_mbtf, voco) have no training-free counterpart.
        f = [free[(option, s)]["test/acc"] for s in seeds] if all((option, s) in free for s in seeds) else None
        row = {"option": option, "seeds": seeds, "trained": t, "training_free": f,
               "trained_by_type": {k: [trained[(option, s)][f"test/acc_{k}"] for s in seeds] for k in TYPES}}
        # Against random pruning at the same budget, fine-tuned alike, seed by seed (same start model).
        rand = f"random_prune_{budget(option)}"
        both = [s for s in seeds if (rand, s) in trained] if option not in ("none_64", rand) else []
        row["vs_random"] = [trained[(option, s)]["test/acc"] - trained[(rand, s)]["test/acc"] for s in both]
        rows.append(row)
        vs = (f"{mean_std(row['vs_random'])} ({sum(d > 0 for d in row['vs_random'])}/{len(both)} above)"
              if both else "-")
        table.append(f"| {option} | {len(seeds)} | **{mean_std(t)}** | {mean_std(f) if f else '-'} | "
                     f"{mean_std([x - y for x, y in zip(t, f)]) if f else '-'} | {vs} | "
                     + " | ".join(mean_std(row["trained_by_type"][k]) for k in TYPES) + " |")
    out = HERE / "results" / "trained"
    out.mkdir(parents=True, exist_ok=True)
    head = ("| option | seeds | trained (200 steps) | training-free (part 1) | gain | vs random pruning, trained "
            "| cell | count | relation |\n|---|---|---|---|---|---|---|---|---|\n")
    (out / "paired.md").write_text(head + "\n".join(table) + "\n")
    (out / "paired.json").write_text(json.dumps(rows, indent=1))
    print(head + "\n".join(table))
    plot(rows, out / "paired.png")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """One panel per budget; per method the training-free accuracy (open) and the fine-tuned one
    (filled), seeds as dots; the fine-tuned uncompressed control and random pruning as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    control = next((r for r in rows if r["option"] == "none_64"), None)
    budgets = sorted({budget(r["option"]) for r in rows if r["option"] != "none_64"}, reverse=True)
    panels = {b: [r for r in rows if budget(r["option"]) == b] for b in budgets}
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 + 0.45 * sum(map(len, panels.values())), 4), squeeze=False,
                             sharey=True, gridspec_kw={"width_ratios": [len(p) for p in panels.values()]})
    for ax, (b, panel) in zip(axes[0], panels.items()):
        for i, row in enumerate(panel):
            t = [100 * x for x in row["trained"]]
            ax.scatter([i + 0.1] * len(t), t, color="C0", s=14, alpha=0.5)
            ax.scatter(i + 0.1, statistics.mean(t), color="C0", s=60, label="fine-tuned with it (200 steps)" if i == 0 else None)
            if row["training_free"]:
                f = [100 * x for x in row["training_free"]]
                ax.scatter([i - 0.1] * len(f), f, color="C1", s=14, alpha=0.5)
                ax.scatter(i - 0.1, statistics.mean(f), facecolors="none", edgecolors="C1", s=60,
                           label="at test time only (part 1)" if i == 0 else None)
        if control:
            ax.axhline(100 * statistics.mean(control["trained"]), color="k", lw=0.8, label="uncompressed, fine-tuned")
        base = next((r for r in panel if r["option"] == f"random_prune_{b}"), None)
        if base:
            ax.axhline(100 * statistics.mean(base["trained"]), color="grey", lw=0.8, ls="--",
                       label="random pruning, fine-tuned")
        ax.set_xticks(range(len(panel)), [r["option"] for r in panel], rotation=40, ha="right")
        ax.set_title(f"{b} of 64 visual tokens")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("zoo_ranking part 2: methods fine-tuned from part 1's model of the same seed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
