"""Reproducible studies: ``python -m vtc.runs.study NAME [--seeds 0,1,2] [--out DIR] [-- OVERRIDES...]``.

A study is an experiment config, ``conf/experiment/NAME.yaml`` (the training sweep: its
``task_name`` names the MLflow experiment, its ``hydra.sweeper.params.seed`` the default seeds),
plus an optional test-time evaluation sweep from the ``STUDIES`` table below. Three phases, each a
subprocess whose output streams to the terminal, each timed:

1. train: ``python train.py -m experiment=NAME seed=<seeds> OVERRIDES`` (one MLflow sweep parent,
   one child per seed and arm: the experiment's other ``hydra.sweeper.params``, e.g. ``ablation``,
   are the study's arms, each trained with every seed);
2. eval (studies in ``STUDIES`` with an ``eval_sweep``): one ``python eval.py -m ckpt_path=<every
   checkpoint of phase 1> <eval_sweep> task_name=NAME_eval hydra.sweep.dir=<log_dir>/studies/NAME/eval/<time>
   <the OVERRIDES eval.py accepts>``;
3. report: ``vtc.runs.report`` of the sweep parent phase 2 (else phase 1) made, found in MLflow as the
   newest ``vtc.kind=sweep`` run of that experiment started after the phase began, into ``--out``
   (default ``<paths.log_dir>/studies/NAME/results/``, beside the checkpoints; the committed
   ``experiments/NAME/results/`` are written only when ``--out`` names them); the training sweep's report goes to ``--out``/train/.
   ``study.json`` there records the seeds, commands, MLflow ids, checkpoints and the wall time of
   each phase (also printed at the end).

OVERRIDES (after ``--``) are Hydra overrides of single values. All of them go to train.py; eval.py,
which takes the model and data from the checkpoint, gets those whose key exists in
conf/eval.yaml (``paths.*``, ``trainer.accelerator/devices/precision/limit_test_batches``,
``eval_batch_size``, ``cost.*``, ``logger.*``; ``++trainer.limit_test_batches=N`` reaches both),
except the keys the study sets itself. The study never deletes or overwrites results: it refuses
to start when the training sweep folder already holds checkpoints or ``--out`` already holds a
report, and fails with the phase's name (earlier phases' results kept) when a phase fails.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vtc.config import ROOT, compose_conf
from vtc.runs.fetch import fetch_runs, latest_parent
from vtc.runs.report import make_report
from vtc.runs.tracking import tracking_uri


@dataclass(frozen=True)
class Study:
    """The test-time part of a study. ``eval_sweep``: eval.py overrides (comma lists sweep) applied
    to every trained checkpoint in one eval.py multirun; empty: the study only trains."""

    eval_sweep: tuple[str, ...] = ()


# Studies with a test-time evaluation sweep; any other conf/experiment/NAME.yaml is a train-only study.
STUDIES: dict[str, Study] = {
    # LLaVolta Fig. 1: the uncompressed model, average-pooled at test time (8x8 grid: 64/16/4/1 tokens).
    "llavolta_fig1": Study(eval_sweep=("compressor=pool", "compressor.stride=1,2,4,8")),
    # The zoo, training-free: every parameter-free method at its compressor_ablation options (16 and 4
    # of 64 tokens; ToMe reaches 16 only) on the uncompressed model; none_64 is the reference.
    "zoo_ranking": Study(eval_sweep=("+ablation=none_64," + ",".join(
        f"{m}_{b}" for b in (16, 4) for m in ("random_prune", "downsample", "pool", "m3", "divprune", "vispruner",
                                              "visionzip", "cdpruner", "fastv", "dart", "pyramid_drop",
                                              "sparsevlm", "vcc", "tome") if (m, b) != ("tome", 4)),)),
}

# Keys the study sets itself (refused after `--`).
RESERVED = ("experiment", "seed", "task_name", "ckpt_path", "hydra.sweep", "hydra.sweeper", "hydra/sweeper")
_MISSING = object()


class StudyError(RuntimeError):
    pass


def override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~")


def covers(prefix: str, key: str) -> bool:
    return key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "/")


def check_extras(extras: list[str]) -> None:
    for o in extras:
        if o.startswith("-") or "=" not in o and not o.startswith("~"):
            raise StudyError(f"{o!r}: after `--` only Hydra overrides key=value are accepted (no flags)")
        key = override_key(o)
        if any(covers(r, key) for r in RESERVED):
            raise StudyError(f"{o!r}: the study sets {key} itself (seeds: --seeds; the rest: conf/experiment and "
                             "vtc/runs/study.py)")


def compose(config: str, overrides: list[str], hydra_config: bool = False):
    try:
        return compose_conf(config, overrides, hydra_config)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors come in several types
        raise StudyError(f"{config}.py does not accept the overrides {overrides}: {type(e).__name__}: {e}") from e


def eval_extras(extras: list[str], eval_cfg, study: Study) -> list[str]:
    """The overrides eval.py gets: keys of conf/eval.yaml not set by the study (no hydra.*)."""
    from omegaconf import OmegaConf

    own = ["ckpt_path", "task_name", "hydra"] + [override_key(o) for o in study.eval_sweep]
    out = []
    for o in extras:
        key = override_key(o)
        if any(covers(k, key) or covers(key, k) for k in own):
            continue
        if OmegaConf.select(eval_cfg, key.replace("/", "."), default=_MISSING,
                            throw_on_resolution_failure=False) is not _MISSING:
            out.append(o)
    return out


def hydra_quote(value: str) -> str:
    if "'" in value or "\\" in value or "${" in value:
        raise StudyError(f"cannot pass {value!r} to Hydra (quotes, backslashes and ${{ are not supported)")
    return f"'{value}'"


def arms_size(cfg) -> int:
    """Arms of a study: the jobs per seed of its training sweep (the experiment's sweeper params
    other than the seed, simple comma lists)."""
    params = cfg.hydra.sweeper.get("params") or {}
    return sweep_size(f"{k}={v}" for k, v in params.items() if k != "seed")


def sweep_size(overrides) -> int:
    """Jobs of a sweep over simple comma lists (the STUDIES table's eval sweeps)."""
    return math.prod(len(o.split("=", 1)[1].split(",")) for o in overrides if "=" in o)


def run_phase(name: str, cmd: list[str]) -> float:
    """Run one phase's command (output streamed); its wall time, or StudyError naming the phase."""
    print(f"\n[study] phase {name}: {shlex.join(cmd)}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd)
    wall = time.monotonic() - t0
    if rc != 0:
        raise StudyError(f"phase {name} failed (exit {rc}, after {wall:.1f} s); results of earlier phases are "
                         f"kept. Command: {shlex.join(cmd)}")
    print(f"[study] phase {name} done in {wall:.1f} s", flush=True)
    return wall


def sweep_children(client, experiment: str, since_ms: int, phase: str, expected: int) -> tuple[str, list]:
    """The sweep parent a phase made (newest vtc.kind=sweep run started since since_ms) and its
    finished children, checked to be ``expected`` many."""

    try:
        parent = latest_parent(client, experiment, since_ms=since_ms)
        runs = fetch_runs(client, experiment, parent)  # failed and killed children left out
    except SystemExit as e:
        raise StudyError(f"phase {phase}: {e}") from None
    done = [r for r in runs if r.info.status == "FINISHED"]
    if len(done) != expected:
        raise StudyError(f"phase {phase}: sweep parent {parent} in experiment {experiment!r} has {len(done)} finished "
                         f"child runs, expected {expected}")
    return parent, sorted(done, key=lambda r: r.info.start_time or 0)


def check_fresh(train_dir: str, out: str) -> None:
    ckpts = sorted(str(p) for p in Path(train_dir).rglob("*.ckpt")) if os.path.isdir(train_dir) else []
    if ckpts:
        raise StudyError(f"{train_dir} already holds checkpoints of an earlier run ({ckpts[0]}, ...); the study never "
                         "overwrites results: move that folder away or pass `-- paths.log_dir=<another dir>`")
    old = [f for f in ("report.md", "report.json", "study.json") if os.path.exists(os.path.join(out, f))]
    if old:
        raise StudyError(f"{out} already holds a report ({', '.join(old)}); the study never overwrites results: "
                         "move it away or pass --out <another dir>")


def run_study(name: str, seeds: str | None = None, out: str | None = None, extras: list[str] | None = None) -> dict:
    from mlflow.tracking import MlflowClient


    extras = list(extras or [])
    t_start = time.monotonic()
    if not (ROOT / "conf" / "experiment" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
        raise StudyError(f"no study {name!r}: conf/experiment/{name}.yaml does not exist (there are: {known})")
    study = STUDIES.get(name, Study())
    check_extras(extras)

    # Everything checkable is checked before the first phase: the overrides compose, the
    # results have a fresh place to go.
    cfg = compose("train", [f"experiment={name}", *extras], hydra_config=True)
    if not (cfg.get("logger") or {}).get("mlflow"):
        raise StudyError("the study reads its runs back from MLflow: keep logger=mlflow")
    seeds = seeds or str(cfg.hydra.sweeper.params.get("seed") or "0")
    try:
        seed_list = [int(s) for s in str(seeds).split(",")]
    except ValueError:
        raise StudyError(f"--seeds {seeds!r}: a comma list of integers, e.g. 0,1,2") from None
    if len(set(seed_list)) != len(seed_list):
        raise StudyError(f"--seeds {seeds!r}: repeated seed")
    uri = tracking_uri(cfg)
    train_exp = cfg.task_name
    train_dir = os.path.abspath(cfg.hydra.sweep.dir)
    log_dir = os.path.abspath(cfg.paths.log_dir)
    # Beside the study's checkpoints, never onto the committed experiments/NAME/results/ (a fresh
    # checkout would refuse to run); committing a new result is a deliberate --out.
    out = os.path.abspath(out or os.path.join(log_dir, "studies", name, "results"))
    check_fresh(train_dir, out)
    ev_extras: list[str] = []
    if study.eval_sweep:
        ev_extras = eval_extras(extras, compose("eval", []), study)
        compose("eval", ev_extras)
        left = [o for o in extras if o not in ev_extras]
        print(f"[study] overrides for train.py only: {left}\n[study] overrides for train.py and eval.py: {ev_extras}",
              flush=True)
    client = MlflowClient(tracking_uri=uri)
    record = {"study": name, "seeds": seed_list, "overrides": extras, "tracking_uri": uri,
              "started": dt.datetime.now().isoformat(timespec="seconds"), "commands": {}, "mlflow": {},
              "wall_s": {}}
    wall = record["wall_s"]

    # 1. train
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", f"experiment={name}", f"seed={','.join(map(str, seed_list))}",
           *extras]
    since = int(time.time() * 1000)
    record["commands"]["train"] = shlex.join(cmd)
    wall["train"] = run_phase("train", cmd)
    train_parent, train_runs = sweep_children(client, train_exp, since, "train", len(seed_list) * arms_size(cfg))
    record["mlflow"]["train"] = {"experiment": train_exp, "parent": train_parent,
                                 "runs": [r.info.run_id for r in train_runs]}
    ckpts = []
    for r in sorted(train_runs, key=lambda r: int(r.data.params.get("seed", 0))):
        ckpt = os.path.join(r.data.params.get("callbacks.model_checkpoint.dirpath", ""), "last.ckpt")
        if not os.path.isfile(ckpt):
            raise StudyError(f"phase train: run {r.info.run_id} (seed {r.data.params.get('seed')}) left no {ckpt}")
        ckpts.append(os.path.abspath(ckpt))
    record["checkpoints"] = ckpts
    report_exp, report_parent = train_exp, train_parent

    # 2. eval
    if study.eval_sweep:
        eval_exp = f"{name}_eval"
        eval_dir = os.path.join(log_dir, "studies", name, "eval", dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f"))
        cmd = [sys.executable, str(ROOT / "eval.py"), "-m", "ckpt_path=" + ",".join(hydra_quote(c) for c in ckpts),
               *study.eval_sweep, f"task_name={eval_exp}", f"hydra.sweep.dir={hydra_quote(eval_dir)}", *ev_extras]
        since = int(time.time() * 1000)
        record["commands"]["eval"] = shlex.join(cmd)
        wall["eval"] = run_phase("eval", cmd)
        eval_parent, eval_runs = sweep_children(client, eval_exp, since, "eval", len(ckpts) * sweep_size(study.eval_sweep))
        record["mlflow"]["eval"] = {"experiment": eval_exp, "parent": eval_parent,
                                    "runs": [r.info.run_id for r in eval_runs]}
        report_exp, report_parent = eval_exp, eval_parent

    # 3. report
    print(f"\n[study] phase report: python -m vtc.runs.report --experiment {report_exp} --parent {report_parent} "
          f"--out {out}", flush=True)
    t0 = time.monotonic()
    try:
        data = make_report(report_exp, report_parent, out, uri)
        if report_exp != train_exp:
            make_report(train_exp, train_parent, os.path.join(out, "train"), uri)
    except SystemExit as e:
        raise StudyError(f"phase report failed: {e}") from None
    wall["report"] = time.monotonic() - t0
    wall["total"] = time.monotonic() - t_start
    record["report"] = {"experiment": report_exp, "parent": report_parent, "files": data["files"]}
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump(record, f, indent=1)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in wall.items() if k != "total")
    print(f"\n[study] {name}: report in {out}\n[study] wall time: {phases}; total {wall['total']:.1f} s "
          f"({wall['total'] / 60:.1f} min)", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extras = []
    if "--" in argv:
        i = argv.index("--")
        argv, extras = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m vtc.runs.study", description=__doc__.split("\n\n")[0],
                                 epilog="Hydra overrides for train.py (and, where it accepts them, eval.py) go after `--`.")
    ap.add_argument("name", help="the study: conf/experiment/NAME.yaml (e.g. llavolta_fig1)")
    ap.add_argument("--seeds", default=None, help="training seeds, comma list (default: the experiment's sweep seeds)")
    ap.add_argument("--out", default=None, help="report folder (default outputs/studies/NAME/results/, beside its "
                    "checkpoints; the committed results are experiments/NAME/results/)")
    a = ap.parse_args(argv)
    try:
        run_study(a.name, a.seeds, a.out, extras)
    except StudyError as e:
        print(f"[study] {a.name}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
