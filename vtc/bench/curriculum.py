"""LLaVolta training time: T steps under a stage-wise schedule vs T steps of constant ``none``.

    python -m vtc.bench.curriculum [--quick] [--steps T] [--repeats R] [--schedule llavolta]

Two models of the same sizes and seed (``common.Sizes`` with a deeper LLM, so LLaVolta's K = 2
and K = 16 of a 32-layer LLM map to different layers): one with ``compressor=vcc`` driven by
``conf/schedule/<schedule>.yaml``, one with ``compressor=none``. Every step is a full training
step (forward + backward + AdamW; encoder frozen) on the same batch.

Stage logic is the ``CompressionCurriculum`` callback's, without a Trainer: the stages come from
``vtc.train.curriculum.parse_stages`` (layer indices scaled to the LLM's depth), the stage of step
``t`` of ``T`` from ``stage_at``, and its knobs are applied by ``CompressionCurriculum._apply``
(``knobs: null`` switches the compressor off) before the step.

Interleaving: the T steps are cut into blocks of ``block`` steps; each block runs on one arm, then
on the other (which arm goes first alternates per block), so both arms see the same machine load
at nearly the same moments. The whole schedule is replayed ``repeats`` times; wall time per arm =
median over repeats of the sum of its T step times. Analytic cost: ``vtc.cost.accounting.batch_flops``
of each step's measured token counts (trainable = projector, compressor, llm), summed over steps.
"""
from __future__ import annotations

import argparse
import gc
import sys

from vtc.bench import common as C
from vtc.compressors.schedule import apply_stage, parse_stages, stage_at
from vtc.config import CONF_DIR
from vtc.cost.schedules import llavolta_cr

TARGET = 0.8  # measured saving / analytic saving


def load_schedule(name: str):
    from omegaconf import OmegaConf


    return OmegaConf.load(CONF_DIR / "schedule" / f"{name}.yaml")


def run(sizes: C.Sizes | None = None, steps: int = 16, repeats: int = 5, block: int = 2, schedule: str = "llavolta",
        threads: int | None = 1, log=print) -> dict:
    with C.torch_threads(threads):
        try:
            return _run(sizes or SIZES, steps, repeats, block, schedule, log)
        finally:
            gc.unfreeze()


def _run(s: C.Sizes, T: int, repeats: int, block: int, schedule: str, log) -> dict:
    sched = load_schedule(schedule)
    N = s.llm_layers
    stages = parse_stages(sched.stages, N, sched.get("reference_layers", 32), tuple(sched.get("scale_keys", ["layer"])))
    batch = C.make_batch(s)
    log(f"building vcc + none models: {s.describe()}")
    arms = {}
    for arm, comp in (("llavolta", "vcc"), ("none", "none")):
        model = C.build_lmm(s, C.load_compressor(comp))
        arms[arm] = (model, C.optimizer(model, s.lr))
    gc.collect()
    gc.freeze()
    vcc = arms["llavolta"][0].compressor
    for st in stages:  # the callback's setup() check: every stage must be valid for this model
        apply_stage(vcc, st.knobs)
        vcc.check(arms["llavolta"][0].encoder.info, N)

    def stage_of(arm: str, t: int) -> int | None:
        return stage_at(stages, t, T) if arm == "llavolta" else None

    def step(arm: str, t: int, record: bool = False):
        model, opt = arms[arm]
        idx = stage_of(arm, t)
        if idx is not None:
            apply_stage(model.compressor, stages[idx].knobs)
        if record:
            with C.recording_forwards(model) as outs:
                C.train_step(model, batch, opt)
            return outs
        gc.collect()
        gc.disable()
        try:
            return C.timed(lambda: C.train_step(model, batch, opt))
        finally:
            gc.enable()

    # analytic FLOPs and token counts of every (arm, step), one recorded step each; also warms
    # up every stage configuration
    flops: dict[tuple[str, int], float] = {}
    seen: dict[tuple[str, int], list[float]] = {}
    L = s.num_patches
    for arm in arms:
        cache: dict = {}
        for t in range(T):
            key = stage_of(arm, t)
            if key not in cache:
                outs = step(arm, t, record=True)
                model = arms[arm][0]
                o = outs[0]
                has = o.visual_in > 0
                cache[key] = (C.step_flops(model, outs), [float(x) for x in o.seen[:, has].float().mean(1)])
            flops[arm, t], seen[arm, t] = cache[key]

    log(f"timing {T} steps per arm, blocks of {block}, {repeats} repeats")
    times: dict[tuple[str, int], list[float]] = {(a, t): [] for a in arms for t in range(T)}
    walls = {a: [] for a in arms}
    for r in range(repeats):
        wall = {a: 0.0 for a in arms}
        for bi, b0 in enumerate(range(0, T, block)):
            order = ["llavolta", "none"] if (bi + r) % 2 == 0 else ["none", "llavolta"]
            for arm in order:
                for t in range(b0, min(b0 + block, T)):
                    dt = step(arm, t)
                    times[arm, t].append(dt)
                    wall[arm] += dt
        for a in arms:
            walls[a].append(wall[a])
        log(f"  repeat {r + 1}/{repeats}: llavolta {wall['llavolta']:.1f} s, none {wall['none']:.1f} s")

    W = {a: C.median(walls[a]) for a in arms}
    W_med = {a: sum(C.median(times[a, t]) for t in range(T)) for a in arms}  # a second estimator
    F = {a: sum(flops[a, t] for t in range(T)) for a in arms}
    measured = 1 - W["llavolta"] / W["none"]
    analytic = 1 - F["llavolta"] / F["none"]
    none_step = C.median([x for t in range(T) for x in times["none", t]])
    none_flops = flops["none", 0]

    stage_rows = []
    for i, st in enumerate(stages):
        ts = [t for t in range(T) if stage_at(stages, t, T) == i]
        if not ts:
            continue
        k = None if st.knobs is None else st.knobs.get("layer")
        sv = None if st.knobs is None else st.knobs.get("stride")
        cr_formula = 1.0 if st.knobs is None else llavolta_cr(N, k, sv)
        per_layer = seen["llavolta", ts[0]]
        cr_measured = N * L / sum(per_layer)
        t_stage = C.median([x for t in ts for x in times["llavolta", t]])
        t_none = C.median([x for t in ts for x in times["none", t]])
        stage_rows.append(dict(
            stage=i + 1, steps=f"{ts[0]}-{ts[-1]}", K=k, S=sv, cr_formula=cr_formula, cr_measured=cr_measured,
            equiv_tokens=sum(per_layer) / N, step_ms=1e3 * t_stage, none_step_ms=1e3 * t_none,
            speedup=t_none / t_stage, flops=flops["llavolta", ts[0]],
            flops_ratio=none_flops / flops["llavolta", ts[0]],
        ))
    ratio = measured / analytic if analytic else float("nan")
    res = dict(
        benchmark="curriculum", schedule=schedule, schedule_stages=[dict(end=st.end, knobs=st.knobs) for st in stages],
        sizes=C.sizes_dict(s), sizes_text=s.describe(), steps=T, block=block, repeats=repeats,
        environment=C.environment(),
        wall_s={a: W[a] for a in arms}, wall_s_all=walls, wall_s_sum_of_step_medians=W_med,
        measured_saving_sum_of_step_medians=1 - W_med["llavolta"] / W_med["none"], flops_total=F,
        measured_saving=measured, analytic_saving=analytic, measured_over_analytic=ratio,
        none_step_ms=1e3 * none_step, stages=stage_rows,
        step_ms={f"{a}:{t}": [1e3 * x for x in times[a, t]] for a in arms for t in range(T)},
        verdict=dict(target=f"measured saving / analytic saving >= {TARGET}", value=ratio,
                     passed=bool(ratio >= TARGET)),
    )
    return res


COLUMNS = [("stage", "stage"), ("steps", "steps"), ("K", "K"), ("S", "S"), ("cr_formula", "CR (formula)"),
           ("cr_measured", "CR (measured tokens)"), ("equiv_tokens", "equiv. tokens"), ("step_ms", "step ms"),
           ("none_step_ms", "none step ms (same steps)"), ("speedup", "speed-up"), ("flops", "step FLOPs"),
           ("flops_ratio", "FLOPs ratio none/stage")]


def to_markdown(res: dict) -> str:
    W, F = res["wall_s"], res["flops_total"]
    v = res["verdict"]
    lines = [f"# Curriculum: {res['schedule']} vs constant none, training time", "",
             f"Model: {res['sizes_text']}; compressor vcc (LLaVolta 1-D pooling before layer K).", "",
             f"{res['steps']} training steps per arm, interleaved in blocks of {res['block']}, schedule replayed "
             f"{res['repeats']} times (wall = median over repeats of the summed step times); "
             f"{res['environment']['threads']} torch thread(s), torch {res['environment']['torch']}, "
             f"{res['environment']['when']}. Stages: "
             + ", ".join(f"until {st['end']:g}: {st['knobs'] or 'uncompressed'}" for st in res["schedule_stages"])
             + " (K scaled to the LLM's depth as round(K·N/32)).", "",
             "| arm | wall s | summed FLOPs |", "|---|---|---|",
             f"| {res['schedule']} (vcc) | {W['llavolta']:.1f} | {F['llavolta'] / 1e12:.3f} T |",
             f"| none | {W['none']:.1f} | {F['none'] / 1e12:.3f} T |", "",
             f"Measured saving: **{res['measured_saving']:.1%}**; analytic saving (summed FLOPs): "
             f"**{res['analytic_saving']:.1%}**; measured / analytic = **{res['measured_over_analytic']:.2f}** "
             f"(target >= {TARGET}: **{'PASS' if v['passed'] else 'FAIL'}**). Second estimator (sum over steps of "
             f"each step's median over repeats): saving {res['measured_saving_sum_of_step_medians']:.1%}, "
             f"measured / analytic {res['measured_saving_sum_of_step_medians'] / res['analytic_saving']:.2f}; "
             "per-repeat walls (llavolta / none): "
             + ", ".join(f"{a:.1f} / {b:.1f} s" for a, b in zip(res["wall_s_all"]["llavolta"], res["wall_s_all"]["none"]))
             + ".", "",
             "## Per stage", "", C.md_table(res["stages"], COLUMNS), "",
             "CR (formula) = N·L / ((N−K)·L/S + K·L) (LLaVolta); CR (measured tokens) = N·L / Σ over layers of "
             "the visual tokens each layer saw in the step."]
    return "\n".join(lines)


SIZES = C.replace(C.Sizes(), llm_width=256, llm_ffn=688, llm_heads=4, llm_kv_heads=4, llm_layers=16, batch=2)
QUICK = C.replace(C.QUICK, llm_layers=8)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 4 steps, 1 repeat (a smoke test)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--block", type=int, default=2)
    p.add_argument("--schedule", default="llavolta")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on shared cores 2 OpenMP threads wait on each other, see README)")
    p.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    a = p.parse_args(argv)
    sizes = QUICK if a.quick else SIZES
    steps = a.steps or (4 if a.quick else 16)
    repeats = a.repeats or (1 if a.quick else 5)
    res = run(sizes, steps, repeats, a.block, a.schedule, threads=a.threads,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    md = to_markdown(res)
    print(md)
    out = a.out or (C.default_out("curriculum_quick") if a.quick else C.default_out("curriculum"))
    paths = C.write_outputs(out, md, res)
    print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
