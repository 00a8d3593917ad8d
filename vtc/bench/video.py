"""Video training speed: step time per video compressor against its FLOPs, and the loader against the step.

    python -m vtc.bench.video [--quick] [--steps S] [--repeats R] [--block K] [--batch B] [--frames T]
                              [--threads N] [--skip-loader] [--loader-steps S] [--loader-batches N] [--out PATH]

1. **Step time vs FLOPs.** One video batch built here: B samples, each one video of T = 8 frames
   of random pixels (``pixel_values`` [B·T, 3, H, W]; ``visual_items`` rows (b, b·T, T, 1), one
   video item per sample), the text of ``common.make_batch`` (one placeholder each). Four models of
   the same sizes and seed (``common.build_lmm``), one per arm:
   ``none``; ``llavolta stage 1`` (compressor ``vcc`` with the first stage's knobs of
   ``conf/schedule/llavolta.yaml``, K scaled to the LLM's depth by ``parse_stages``; the 1-D pooling
   runs over the whole video span); ``temporal stride 2`` and ``temporal stride 4`` (compressor
   ``temporal``: frames averaged in windows of 2 / 4 before the LLM). Every step is a full
   training step (forward + backward + AdamW, encoder frozen; ``common.train_step_phased``) on the
   same batch. The frozen encoder runs on all B·T frames in every arm.

   Interleaving: ``steps`` steps per arm and repeat, cut into blocks of ``block``; each block runs
   on every arm in turn, the order rotated and reversed from block to block, so all arms see the
   same machine load. After one recorded and one warm-up step per arm, ``repeats`` such rounds;
   step time per arm = median over all its timed steps. The encoder forward alone (no grad, all
   frames) is timed once per block.

   Analytic FLOPs: ``vtc.cost.accounting.batch_flops`` of one recorded step per arm (measured
   tokens per sample and LLM layer) via ``common.step_flops``, which counts the tower once per
   frame (``LMMOutput.frames``), as ``LMMModule`` does.
   Verdict per arm: measured speed-up (none / arm step time) >= 0.9 x FLOPs ratio (none / arm).

2. **Loader vs step.** ``data=synthetic_video`` as configured (batch 16 clips of 8 frames, 1
   loader worker, the tiny model) on the cached set under data/, trained ``--loader-steps`` steps by
   Lightning: data wait share of the step (``vtc.bench.loader.data_wait``; target < 5%), then the
   same loader alone (fresh worker, ``--loader-batches`` batches): frames/s it delivers vs frames/s
   the training step consumes (frames per batch / step time).
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

from vtc.bench import common as C
from vtc.bench.curriculum import SIZES as CURRICULUM_SIZES
from vtc.bench.curriculum import load_schedule
from vtc.bench.loader import data_wait
from vtc.compressors.schedule import parse_stages
from vtc.cost.accounting import model_shape
from vtc.cost.flops import forward_flops
from vtc.data.batch import ITEM_VIDEO

TARGET = 0.9  # measured speed-up / FLOPs ratio
WAIT_TARGET = 0.05  # data wait / step
FRAMES = 8
# 112 px / 14 px frames: 64 patches per frame, 512 visual tokens per video; the curriculum's LLM
SIZES = C.replace(CURRICULUM_SIZES, image_size=112)
QUICK = C.replace(C.QUICK, llm_layers=8)


def video_batch(s: C.Sizes, frames: int = FRAMES, seed: int = 0) -> dict:
    """``common.make_batch``'s text; each sample's placeholder takes one video of ``frames`` random frames."""
    b = C.make_batch(s, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.randn(s.batch * frames, 3, s.image_size, s.image_size, generator=g)
    items = torch.tensor([[i, i * frames, frames, ITEM_VIDEO] for i in range(s.batch)])
    return dict({k: v for k, v in b.items() if k != "image_index"}, pixel_values=pixels, visual_items=items)


def arms(s: C.Sizes, schedule: str = "llavolta") -> dict[str, tuple[str, dict]]:
    """arm -> (compressor config, knobs). LLaVolta's first stage with K scaled to the LLM's depth."""
    sched = load_schedule(schedule)
    first = parse_stages(sched.stages, s.llm_layers, sched.get("reference_layers", 32),
                         tuple(sched.get("scale_keys", ["layer"])))[0]
    return {"none": ("none", {}), "llavolta stage 1": ("vcc", dict(first.knobs)),
            "temporal stride 2": ("temporal", {"stride": 2}), "temporal stride 4": ("temporal", {"stride": 4})}


def encoder_flops(model, frames: int) -> float:
    """Forward FLOPs of the frozen tower on ``frames`` frames (1x in a training step: nothing before it trains)."""
    shape = model_shape(model)
    return frames * forward_flops(shape, 0, [0] * shape.llm_layers, projector_tokens=0, lm_head_tokens=0)["vision"]


def run(sizes: C.Sizes | None = None, steps: int = 4, repeats: int = 3, block: int = 2, frames: int = FRAMES,
        threads: int | None = 1, log=print) -> dict:
    with C.torch_threads(threads):
        try:
            return _run(sizes or SIZES, steps, repeats, block, frames, log)
        finally:
            gc.unfreeze()


def _run(s: C.Sizes, steps: int, repeats: int, block: int, T: int, log) -> dict:
    batch = video_batch(s, T)
    spec = arms(s)
    log(f"building {len(spec)} models: {s.describe()}; {T} frames per video")
    models = {}
    for arm, (comp, knobs) in spec.items():
        model = C.build_lmm(s, C.load_compressor(comp, **knobs))
        models[arm] = (model, C.optimizer(model, s.lr))
    gc.collect()
    gc.freeze()

    def step(arm: str) -> dict:
        gc.collect()
        gc.disable()
        try:
            return C.train_step_phased(models[arm][0], batch, models[arm][1])
        finally:
            gc.enable()

    rows = {}
    for arm, (model, opt) in models.items():
        with C.recording_forwards(model) as outs:
            C.train_step(model, batch, opt)
        step(arm)  # warm-up
        o = outs[0]
        rows[arm] = {"arm": arm, "compressor": spec[arm][0], "knobs": spec[arm][1] or None,
                     "describe": model.compressor.describe(), "frames": [int(x) for x in o.frames],
                     "visual_in": float(o.visual_in.float().mean()), "seen": [float(x) for x in o.seen.float().mean(1)],
                     "equiv_tokens": float(o.seen.float().mean()), "llm_tokens": int(o.lengths.sum()),
                     "flops": C.step_flops(model, outs)}
    enc_model = models["none"][0]
    E = encoder_flops(enc_model, int(batch["pixel_values"].shape[0]))

    def encoder_alone() -> float:
        with torch.no_grad():
            return C.timed(lambda: enc_model.encoder(batch["pixel_values"]))

    names = list(models)
    times: dict[str, list[dict]] = {a: [] for a in names}
    enc_times: list[float] = []
    nblocks = -(-steps // block)
    log(f"timing {steps} steps per arm and repeat, blocks of {block}, {repeats} repeats")
    for r in range(repeats):
        for bi in range(nblocks):
            k = r * nblocks + bi
            order = names[k % len(names):] + names[:k % len(names)]
            if k % 2:
                order.reverse()
            for arm in order:
                for _ in range(min(block, steps - bi * block)):
                    times[arm].append(step(arm))
            enc_times.append(encoder_alone())
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(
            f"{a} {1e3 * C.median([x['total'] for x in times[a][-steps:]]):.0f} ms" for a in names))

    enc_s = C.median(enc_times)
    for arm in names:
        ph = {p: C.median([x[p] for x in times[arm]]) for p in ("fwd", "bwd", "opt", "total")}
        rows[arm].update({f"{p}_ms": 1e3 * v for p, v in ph.items()}, step_ms=1e3 * ph["total"],
                         step_ms_all=[round(1e3 * x["total"], 1) for x in times[arm]])
    base = rows["none"]
    for r in rows.values():
        r["speedup"] = base["step_ms"] / r["step_ms"]
        r["flops_ratio"] = base["flops"] / r["flops"]
        r["efficiency"] = r["speedup"] / r["flops_ratio"]
        r["gflops"], r["gflops_per_s"] = r["flops"] / 1e9, r["flops"] / r["step_ms"] / 1e6
        # the same with the fixed costs out: AdamW step and frozen encoder from the time, encoder from the FLOPs
        rest_none, rest = (x["step_ms"] - x["opt_ms"] - 1e3 * enc_s for x in (base, r))
        r["efficiency_llm"] = (rest_none / rest) / ((base["flops"] - E) / (r["flops"] - E))
        r["passed"] = None if r is base else bool(r["efficiency"] >= TARGET)
    return {"benchmark": "video", "sizes": C.sizes_dict(s), "sizes_text": s.describe(), "frames": T, "steps": steps,
            "block": block, "repeats": repeats, "environment": C.environment(), "encoder_ms": 1e3 * enc_s,
            "encoder_ms_all": [round(1e3 * x, 2) for x in enc_times], "encoder_flops": E, "rows": list(rows.values()),
            "verdict": {"target": f"measured speed-up / FLOPs ratio >= {TARGET}",
                        "passed": {a: r["passed"] for a, r in rows.items() if r["passed"] is not None}}}


def loader_part(steps: int = 20, batches: int = 40, threads: int | None = 1, fresh: bool = False, log=print) -> dict:
    """``vtc.bench.loader.data_wait`` on ``data=synthetic_video`` as configured (the set built or
    found under data/; ``fresh``: a small new one in a temporary folder)."""
    log(f"loader: data=synthetic_video, {steps} Lightning steps, then {batches} batches of the loader alone")
    with C.torch_threads(threads), tempfile.TemporaryDirectory(prefix="vtc-bench-video-") as tmp:
        w = data_wait(steps, Path(tmp), data="synthetic_video", fresh=fresh, batches=batches)
    w["step_frames_per_s"] = w["frames_per_batch"] / w["step_s"]
    w["headroom"] = w["loader_frames_per_s"] / w["step_frames_per_s"]
    w["passed"] = bool(w["share"] < WAIT_TARGET)
    return w


COLUMNS = [("arm", "arm"), ("describe", "compressor"), ("visual_in", "visual tokens into the LLM"),
           ("equiv_tokens", "equiv. tokens (mean over layers)"), ("step_ms", "step ms"), ("fwd_ms", "fwd ms"),
           ("bwd_ms", "bwd ms"), ("opt_ms", "AdamW ms"), ("gflops", "step GFLOPs"), ("gflops_per_s", "GFLOP/s"),
           ("speedup", "speed-up"),
           ("flops_ratio", "FLOPs ratio none/arm"), ("efficiency", "speed-up / FLOPs ratio"),
           ("efficiency_llm", "same, fixed costs out")]


def to_markdown(res: dict) -> str:
    env, rows = res["environment"], res["rows"]
    none = rows[0]
    lines = [
        "# Video training step: LLaVolta stage 1 and temporal pooling vs none", "",
        (f"Model: {res['sizes_text']}; each sample one video of {res['frames']} frames "
         f"({res['sizes']['num_patches']} patches per frame, {res['frames'] * res['sizes']['num_patches']} visual "
         f"tokens per video uncompressed). {res['steps']} steps per arm and repeat in blocks of {res['block']}, "
         f"arms interleaved, {res['repeats']} repeats; step ms = median over all timed steps; {env['threads']} torch "
         f"thread(s), torch {env['torch']}, {env['cpus']} CPUs (shared), {env['when']}."), "",
        C.md_table(rows, COLUMNS), "",
        (f"Step FLOPs count the frozen tower once per frame ({none['frames'][0]} per sample): "
         f"{res['encoder_flops'] / 1e9:.2f} GFLOPs of none's {none['flops'] / 1e9:.1f} G "
         f"({res['encoder_flops'] / none['flops']:.1%}). Encoder forward alone: {res['encoder_ms']:.0f} ms "
         f"({res['encoder_ms'] / none['step_ms']:.1%} of none's step). \"Fixed costs out\": AdamW and the encoder "
         "taken out of the times, the encoder out of the FLOPs."), "",
        "## Verdicts", ""]
    for r in rows[1:]:
        lines.append(f"- {r['arm']}: speed-up {r['speedup']:.2f}x vs FLOPs ratio {r['flops_ratio']:.2f}x: "
                     f"{r['efficiency']:.2f} of it (target >= {TARGET}): **{'PASS' if r['passed'] else 'FAIL'}**"
                     f" (fixed costs out: {r['efficiency_llm']:.2f}).")
    w = res.get("loader")
    if w:
        lines += [
            (f"- Data wait, `data=synthetic_video` ({w['batch_size']} clips x {w['frames_per_batch'] / w['batch_size']:.0f} "
             f"frames per batch, {w['num_workers']} loader worker, tiny model, {w['steps']} Lightning steps): "
             f"{w['share']:.1%} of {1e3 * w['step_s']:.0f} ms/step (target < {WAIT_TARGET:.0%}): "
             f"**{'PASS' if w['passed'] else 'FAIL'}**."),
            (f"- Loader alone: {w['loader_frames_per_s']:.0f} frames/s ({w['loader_batches_per_s']:.2f} batches/s) vs "
             f"{w['step_frames_per_s']:.0f} frames/s the training step consumes: {w['headroom']:.1f}x headroom; a "
             f"step faster than {1e3 / w['loader_batches_per_s']:.0f} ms would wait for data with "
             f"{w['num_workers']} worker.")]
    return "\n".join(lines)


def _log(m: str) -> None:
    print(m, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 1 repeat (a smoke test)")
    p.add_argument("--steps", type=int, default=None, help="steps per arm and repeat")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--block", type=int, default=2)
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--batch", type=int, default=None, help="videos per batch (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared cores, see README)")
    p.add_argument("--skip-loader", action="store_true", help="leave out part 2 (loader vs step)")
    p.add_argument("--loader-steps", type=int, default=None)
    p.add_argument("--loader-batches", type=int, default=None)
    p.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    a = p.parse_args(argv)
    sizes = QUICK if a.quick else SIZES
    res = run(C.replace(sizes, batch=a.batch or sizes.batch), a.steps or (2 if a.quick else 8),
              a.repeats or (1 if a.quick else 5),
              a.block, a.frames, threads=a.threads, log=_log)
    if not a.skip_loader:
        res["loader"] = loader_part(a.loader_steps or (3 if a.quick else 20),
                                    a.loader_batches or (4 if a.quick else 60), a.threads, _log)
    md = to_markdown(res)
    print(md)
    paths = C.write_outputs(a.out or C.default_out("video_quick" if a.quick else "video"), md, res)
    print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
