"""Compressor zoo speed: one training step of every ``conf/compressor/*.yaml`` side by side.

    python -m vtc.bench.compressors [--quick] [--repeats R] [--out experiments/bench/compressors]

One model (``common.Sizes``: CLIP geometry 336/14 -> 576 patches, a small frozen ViT, a Llama
LLM that dominates the step), one fixed batch, one model per compressor built from the same seed
(same encoder and LLM weights; ``hydra.utils.instantiate`` of the YAML node). Every step is a full
training step: forward + backward + AdamW step over projector, compressor and LLM, encoder frozen.

Measured, in one process:
  * step time: after ``warmup`` steps each, methods are run round-robin (the order rotated every
    repeat), one step per turn, ``repeats`` turns; the median per method. Python's GC is off
    inside each timed step.
  * ``hf_llava``: transformers' ``LlavaForConditionalGeneration`` of the same sizes with vtc's
    weights copied in (same frozen encoder, same projector/LLM values; the two losses are checked
    equal), on the same batch with the placeholder expanded to one token per patch, timed in the
    same round-robin.
  * the compressor's own cost, timed alone (median of ``repeats``, round-robin):
      pre-LLM: ``compressor(features, enc)`` on the step's encoder output, plus its backward when
      the output carries gradients (trainable fusion). For methods whose MLP *is* the projector
      (STF, STF+MBTF) the time of that MLP (forward + backward) is subtracted: ``none`` runs a
      projector too. M3: the call summed over every trained scale.
      in-LLM: ``compress(state, K, layer)`` on the state captured at layer K of a real forward,
      forward + backward (a random cotangent on the new hidden states).
      ToMe: frozen encoder forward with merging minus without (negative = net saving); the time
      inside ``bipartite_merge`` (matching + merge) is reported too.
  * peak memory: the CPU allocator's peak during one step above what it held before the step
    (``torch.profiler`` memory events; weights and optimizer state exist already and are not
    counted; activations, gradients and temporaries are). The same measure for every method.
  * analytic FLOPs of the step: ``vtc.cost.accounting.batch_flops`` of every forward the step ran
    (measured token counts per sample and per LLM layer; trainable = projector, compressor, llm;
    compressor ``own_flops`` and ToMe's merged encoder blocks included).

This module does the measuring (``run``) and the CLI; the models are built in
:mod:`vtc.bench.compressors_build`, the compressor's own work is isolated in
:mod:`vtc.bench.compressors_own_cost`, and the verdicts and markdown come from
:mod:`vtc.bench.compressors_report`.
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch

from vtc.bench import common as C
from vtc.bench.compressors_build import check_same_loss, make_entries
from vtc.bench.compressors_own_cost import own_cost_fn
from vtc.bench.compressors_report import HF_TARGET, judge, to_markdown
from vtc.cost.accounting import model_shape
from vtc.cost.flops import forward_flops


# -- timing ----------------------------------------------------------------------------------------

def round_robin(items, fn, repeats: int, log=None) -> dict:
    """``fn(item)`` -> seconds, each item once per turn, order rotated per turn; lists of times."""
    times = {id(it): [] for it in items}
    n = len(items)
    for r in range(repeats):
        order = items[r % n:] + items[:r % n]
        for it in order:
            times[id(it)].append(fn(it))
        if log:
            log(f"  turn {r + 1}/{repeats} done")
    return times


def px_rows(batch) -> list[int]:
    return [int(i) for i in batch["image_index"] if int(i) >= 0]


# -- the benchmark ---------------------------------------------------------------------------------

def run(sizes: C.Sizes | None = None, repeats: int = 7, warmup: int = 2, names: list[str] | None = None,
        with_hf: bool = True, profile_hf: bool | None = None, threads: int | None = 1, hf_pairs: int | None = None,
        log=print) -> dict:
    """The whole benchmark; returns the record (rows, verdicts, environment). ``threads``: torch
    intra-op threads for the run (restored afterwards); None keeps the current setting."""
    with C.torch_threads(threads):
        try:
            return _run(sizes or SIZES, repeats, warmup, names, with_hf, profile_hf,
                        repeats if hf_pairs is None else hf_pairs, log)
        finally:
            gc.unfreeze()


def _run(sizes, repeats, warmup, names, with_hf, profile_hf, hf_pairs, log) -> dict:
    torch.manual_seed(0)
    names = names or C.compressor_names()
    batch = C.make_batch(sizes)
    log(f"building {len(names)} models{' + transformers Llava' if with_hf else ''}: {sizes.describe()}")
    entries = make_entries(sizes, names, batch, with_hf)
    gc.collect()
    gc.freeze()  # the models' objects leave the GC's generations: the per-step collect stays cheap
    loss_diff = check_same_loss(sizes, entries)
    log(f"|loss vtc none − loss HF Llava| before training = {loss_diff:.2e}")

    # analytic FLOPs and token counts from one recorded step each (also a warm-up step)
    info = {}
    for e in entries:
        if e.name == "hf_llava":
            e.step()
            continue
        with C.recording_forwards(e.model) as outs:
            e.step()
        n_img = int((batch["image_index"] >= 0).sum())
        fl = C.step_flops(e.model, outs)
        has = outs[0].visual_in > 0
        comp = e.model.compressor
        own_fl = comp.own_flops(e.model.encoder.info.num_patches) * n_img * len(outs)
        own_fl *= 3 if any(p.requires_grad for p in comp.parameters()) else 1
        info[e.name] = dict(
            flops=fl, attn_flops=C.attention_flops(e.model, outs), own_flops=own_fl,
            forwards=len(outs),
            visual_in=[float(o.visual_in[has].float().mean()) for o in outs],
            equiv=[float(o.seen[:, has].float().mean()) for o in outs],
        )
    for _ in range(max(warmup - 1, 0)):
        for e in entries:
            e.step()

    log(f"timing {len(entries)} configurations round-robin, {repeats} turns")
    times = round_robin(entries, lambda e: e.timed_step(), repeats, log)

    pairs = []
    hf_entry = next((e for e in entries if e.name == "hf_llava"), None)
    if hf_entry is not None and hf_pairs:
        log(f"vtc none vs HF Llava: {hf_pairs} adjacent pairs (ABBA order)")
        base_entry = next(e for e in entries if e.name == "none")
        for i in range(hf_pairs):
            order = (base_entry, hf_entry) if i % 2 == 0 else (hf_entry, base_entry)
            got = {e.name: e.timed_step() for e in order}
            pairs.append(got["none"] / got["hf_llava"])

    log("timing the compressors' own work")
    own_fns = {e.name: own_cost_fn(e.model, batch) for e in entries if e.name != "hf_llava"}
    own_entries = [e for e in entries if e.name in own_fns]
    for e in own_entries:  # warm-up
        own_fns[e.name][0]()
    own_times = round_robin(own_entries, lambda e: own_fns[e.name][0](), repeats)

    enc_model = next(e.model for e in entries if e.name == "none")
    shape = model_shape(enc_model)
    enc_flops = forward_flops(shape, 0, [0] * shape.llm_layers, projector_tokens=0)["vision"] * len(px_rows(batch))
    px = batch["pixel_values"]
    with torch.no_grad():
        enc_times = [C.timed(lambda: enc_model.encoder(px)) for _ in range(max(repeats, 3))]
    log("peak memory per step (allocator events)")
    peaks = {e.name: C.allocator_peak_bytes(e.step) for e in entries}

    base = next(e for e in entries if e.name == "none")
    t_none = C.median(times[id(base)])
    t_enc = C.median(enc_times)
    opt_none = C.median([p["opt"] for p in base.phases])
    rows = []
    for e in entries:
        t = C.median(times[id(e)])
        ph = {k: 1e3 * C.median([p[k] for p in e.phases]) for k in ("fwd", "bwd", "opt")}
        per_turn = [a / b for a, b in zip(times[id(base)], times[id(e)])]
        row = dict(method=e.name, step_ms=1e3 * t, step_ms_all=[1e3 * x for x in times[id(e)]],
                   speedup=t_none / t, speedup_per_turn_median=C.median(per_turn),
                   fwd_ms=ph["fwd"], bwd_ms=ph["bwd"], opt_ms=ph["opt"], peak_mib=peaks[e.name] / 2**20,
                   peak_vs_none=peaks[e.name] / peaks["none"])
        if e.name == "hf_llava":
            row.update(site="(transformers)", describe="LlavaForConditionalGeneration, compressor none")
            rows.append(row)
            continue
        comp = e.model.compressor
        inf = info[e.name]
        own = C.median(own_times[id(e)])
        row.update(
            site=comp.site, describe=comp.describe(), forwards=inf["forwards"],
            visual_in=inf["visual_in"][0] if inf["forwards"] == 1 else "/".join(f"{v:g}" for v in inf["visual_in"]),
            equiv_tokens=inf["equiv"][0] if inf["forwards"] == 1 else sum(inf["equiv"]),
            flops=inf["flops"], flops_ratio=info["none"]["flops"] / inf["flops"],
            own_ms=1e3 * own, own_share=own / t, own_method=own_fns[e.name][1],
            own_flops_share=inf["own_flops"] / inf["flops"],
            flops_ratio_causal=(info["none"]["flops"] - info["none"]["attn_flops"] / 2)
            / (inf["flops"] - inf["attn_flops"] / 2),
        )
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
        # the same ratio without what the FLOPs convention leaves out or keeps constant: the
        # optimizer step (not counted) and the frozen encoder forward (identical for all but ToMe)
        if comp.site != "vision":
            k = inf["forwards"]  # M3 runs the encoder once per scale
            row["speedup_llm_part"] = (t_none - t_enc - opt_none) / (t - k * t_enc - ph["opt"] / 1e3)
            row["flops_ratio_llm_part"] = (info["none"]["flops"] - enc_flops) / (inf["flops"] - k * enc_flops)
            row["efficiency_llm_part"] = row["speedup_llm_part"] / row["flops_ratio_llm_part"]
        merge = own_fns[e.name][2].get("merge_times")
        if merge:
            row["merge_ms"] = 1e3 * C.median(merge)
            row["merge_share"] = C.median(merge) / t
        rows.append(row)

    verdicts = judge(rows)
    hf_row = next((r for r in rows if r["method"] == "hf_llava"), None)
    result = dict(benchmark="compressors", sizes=C.sizes_dict(sizes), sizes_text=sizes.describe(),
                  repeats=repeats, warmup=warmup, environment=C.environment(), loss_diff_vtc_hf=loss_diff,
                  encoder_ms=1e3 * t_enc, rows=rows, verdicts=verdicts)
    if hf_row is not None:
        ratio = C.median(pairs) if pairs else t_none / (hf_row["step_ms"] / 1e3)
        result["vtc_over_hf"] = ratio
        result["vtc_over_hf_round_robin"] = t_none / (hf_row["step_ms"] / 1e3)
        result["vtc_over_hf_pairs"] = pairs
        for v in verdicts:
            if v["target"].startswith("vtc none / HF"):
                v.update(value=ratio, passed=ratio <= HF_TARGET,
                         detail=f"median of {len(pairs)} adjacent-pair ratios {ratio:.3f} (round-robin medians: "
                                f"{t_none * 1e3:.0f} / {hf_row['step_ms']:.0f} ms = {result['vtc_over_hf_round_robin']:.3f})")
        do_profile = profile_hf if profile_hf is not None else ratio > HF_TARGET
        if do_profile:
            log("profiling vtc none vs HF Llava (one step each)")
            hf = next(e for e in entries if e.name == "hf_llava")
            result["profile"] = {"vtc_none": profile_ops(base.step), "hf_llava": profile_ops(hf.step)}
    return result


def profile_ops(fn, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ka = sorted(prof.key_averages(), key=lambda k: k.self_cpu_time_total, reverse=True)
    total = sum(k.self_cpu_time_total for k in ka)
    return [dict(op=k.key, self_ms=k.self_cpu_time_total / 1e3, share=k.self_cpu_time_total / total, calls=k.count)
            for k in ka[:top]]



def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (a smoke test)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--llm-layers", type=int, default=None,
                   help="LLM depth (default 8); the compressor's own share of a step falls with depth")
    p.add_argument("--vision-width", type=int, default=None, help="vision encoder width (default 128)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on shared cores 2 OpenMP threads wait on each other, see README)")
    p.add_argument("--only", default=None, help="comma-separated compressor names (none is always added)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-pairs", type=int, default=None, help="adjacent vtc/HF step pairs (default: --repeats)")
    p.add_argument("--profile", action="store_true", help="profile vtc none vs HF even when vtc is not slower")
    p.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    a = p.parse_args(argv)
    sizes = C.QUICK if a.quick else SIZES
    if a.batch:
        sizes = C.replace(sizes, batch=a.batch)
    if a.llm_layers:
        sizes = C.replace(sizes, llm_layers=a.llm_layers)
    if a.vision_width:
        sizes = C.replace(sizes, vision_width=a.vision_width, vision_mlp=4 * a.vision_width)
    repeats = a.repeats or (1 if a.quick else 9)
    hf_pairs = a.hf_pairs or (1 if a.quick else 10)
    warmup = a.warmup or (1 if a.quick else 2)
    names = None
    if a.only:
        names = ["none"] + [n for n in a.only.split(",") if n and n != "none"]
    res = run(sizes, repeats, warmup, names, with_hf=not a.no_hf, profile_hf=True if a.profile else None,
              threads=a.threads, hf_pairs=hf_pairs, log=lambda m: print(m, file=sys.stderr, flush=True))
    md = to_markdown(res)
    print(md)
    out = a.out or (C.default_out("compressors_quick") if a.quick else C.default_out("compressors"))
    paths = C.write_outputs(out, md, res)
    print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return res


# The full benchmark's sizes (see experiments/bench/README.md for why these).
SIZES = C.replace(C.Sizes(), llm_width=256, llm_ffn=688, llm_heads=4, llm_kv_heads=4, batch=2)

if __name__ == "__main__":
    main()
