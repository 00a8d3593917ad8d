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
  * analytic FLOPs of the step: ``vtc.accounting.batch_flops`` of every forward the step ran
    (measured token counts per sample and per LLM layer; trainable = projector, compressor, llm;
    compressor ``own_flops`` and ToMe's merged encoder blocks included).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import contextmanager

import torch

from vtc.bench import common as C

PRE_LLM_25 = ("pool", "stf")  # pre-LLM methods at 25% of the tokens: speed-up target
EFFICIENCY_TARGET = 0.90
OWN_TARGET = 0.03
HF_TARGET = 1.05


# -- building ------------------------------------------------------------------------------------

def compressor_for(name: str, s: C.Sizes):
    if name == "m3":  # test-time scale 25% of the grid; training still runs every scale
        return C.load_compressor("m3", tokens=s.num_patches // 4)
    return C.load_compressor(name)


def build_hf(s: C.Sizes, vtc_model):
    """transformers' Llava of the same sizes, weights copied from the vtc model (encoder frozen)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tc = dict(C.text_config(s))
    tc.pop("model_type")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**C.vision_config(s)), text_config=LlamaConfig(**tc),
                      image_token_index=s.image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      multimodal_projector_bias=True)
    cfg._attn_implementation = "sdpa"
    hf = LlavaForConditionalGeneration(cfg)
    hf.model.vision_tower.load_state_dict(vtc_model.encoder.model.state_dict())
    proj = vtc_model.projector  # mlp2x_gelu: Linear, GELU, Linear
    hf.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    hf.model.language_model.load_state_dict(vtc_model.llm.model.model.state_dict())
    hf.lm_head.load_state_dict(vtc_model.llm.model.lm_head.state_dict())
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    hf.train()
    hf.model.vision_tower.eval()
    return hf


class Entry:
    """One benchmarked configuration: a model, its optimizer and its step function (which returns
    the phase times {'fwd', 'bwd', 'opt', 'total'})."""

    def __init__(self, name, model, step, opt, batch):
        self.name, self.model, self.step_fn, self.opt, self.batch = name, model, step, opt, batch
        self.phases: list[dict] = []

    def step(self):
        return self.step_fn()

    def timed_step(self) -> float:
        gc.collect()
        gc.disable()
        try:
            ph = self.step_fn()
        finally:
            gc.enable()
        self.phases.append(ph)
        return ph["total"]


def make_entries(s: C.Sizes, names: list[str], batch: dict, with_hf: bool = True) -> list[Entry]:
    entries = []
    for name in names:
        model = C.build_lmm(s, compressor_for(name, s))
        opt = C.optimizer(model, s.lr)
        entries.append(Entry(name, model, (lambda m=model, o=opt: C.train_step_phased(m, batch, o)), opt, batch))
    if with_hf:
        base = next(e.model for e in entries if e.name == "none")
        hf = build_hf(s, base)
        hb = C.expand_for_hf(batch, s.num_patches, s.image_token_id)
        opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=s.lr)

        def hf_step(m=hf, o=opt, b=hb):
            t0 = time.perf_counter()
            o.zero_grad(set_to_none=True)
            out = m(**b)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            o.step()
            t3 = time.perf_counter()
            return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "total": t3 - t0}

        e = Entry("hf_llava", hf, hf_step, opt, hb)
        entries.append(e)
    return entries


def check_same_loss(s, entries) -> float:
    """|loss_vtc - loss_hf| on the batch before any step (same weights): the two compute the same."""
    base = next(e for e in entries if e.name == "none")
    hf = next((e for e in entries if e.name == "hf_llava"), None)
    if hf is None:
        return float("nan")
    with torch.no_grad():
        l1 = float(base.model(base.batch).loss)
        l2 = float(hf.model(**hf.batch).loss)
    return abs(l1 - l2)


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


# -- the compressor's own cost ---------------------------------------------------------------------

@contextmanager
def capture_llm_state(comp):
    """Record the (state, layer index, layer) an in-LLM compressor is handed."""
    seen = []
    orig = comp.compress

    def wrapped(state, idx, layer):
        seen.append((state, idx, layer))
        return orig(state, idx, layer)

    comp.compress = wrapped
    try:
        yield seen
    finally:
        del comp.compress


_COTANGENTS: dict = {}


def cotangent(o: torch.Tensor) -> torch.Tensor:
    """A fixed random gradient for an output of this shape (made once, outside the timed calls)."""
    key = (tuple(o.shape), o.dtype)
    if key not in _COTANGENTS:
        _COTANGENTS[key] = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(0))
    return _COTANGENTS[key]


def _backward_if_grad(out):
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    outs = [o for o in outs if o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [cotangent(o) for o in outs])


def own_cost_fn(model, batch):
    """(fn, description, extra) where fn() runs and returns the seconds of the compressor's own work."""
    comp = model.compressor
    pixels = batch["pixel_values"]
    if comp.site == "pre_llm":
        if type(comp).__name__ == "NoCompression":
            return (lambda: 0.0), "identity (no work)", {}
        extra = tuple(getattr(comp, "extra_layers", ()))
        with torch.no_grad():
            enc = model.encoder(pixels, keep_states=extra)
        enc.encoder = model.encoder
        feats = enc.features
        variants = comp.training_variants() or [None]

        # the MLP that replaces the projector (STF): timed alone, subtracted
        proj_mlp = getattr(comp, "mlp", None) if comp.owns_projection else None
        captured = {}
        if proj_mlp is not None:
            h = proj_mlp.register_forward_hook(lambda m, a, o: captured.setdefault("z", a[0].detach()))
            with torch.no_grad():
                comp(feats, enc)
            h.remove()

        def call():
            saved = comp.get_knobs()
            total = 0.0
            try:
                for knobs in variants:
                    if knobs:
                        comp.set_knobs(**knobs)
                    total += C.timed(lambda: _backward_if_grad(comp(feats, enc)))
            finally:
                comp.set_knobs(**saved)
            if proj_mlp is not None:
                z = captured["z"].clone().requires_grad_(hasattr(comp, "fusion"))  # MBTF: grads flow into the fusion MLP
                total -= C.timed(lambda: _backward_if_grad(proj_mlp(z)))
            return total

        desc = "compressor(features, enc) fwd" + (" + bwd" if any(p.requires_grad for p in comp.parameters()) else "")
        if proj_mlp is not None:
            desc += " − its projector MLP (fwd+bwd)"
        if len(variants) > 1:
            desc += f", summed over the {len(variants)} trained scales"
        return call, desc, {}

    if comp.site == "llm":
        with capture_llm_state(comp) as seen, torch.no_grad():
            model._forward_once(batch)
        state, idx, layer = seen[0]

        def call():
            st = state.with_hidden(state.hidden.detach().clone().requires_grad_(True))

            def fwd_bwd():
                out = comp.compress(st, idx, layer)
                torch.autograd.backward(out.hidden, cotangent(out.hidden))

            return C.timed(fwd_bwd)

        return call, f"compress(state, K={idx}, layer) fwd + bwd", {}

    if comp.site == "vision":
        import vtc.compressors.tome as tome_mod

        merge_time = [0.0]
        orig = tome_mod.bipartite_merge

        def timed_merge(*a, **k):
            t = time.perf_counter()
            out = orig(*a, **k)
            merge_time[0] += time.perf_counter() - t
            return out

        def call():
            with torch.no_grad():
                t_without = C.timed(lambda: model.encoder(pixels))
                merge_time[0] = 0.0
                tome_mod.bipartite_merge = timed_merge
                try:
                    t_with = C.timed(lambda: model.encoder(pixels, vision_compressor=comp))
                finally:
                    tome_mod.bipartite_merge = orig
            call.merge_times.append(merge_time[0])
            return t_with - t_without

        call.merge_times = []
        return call, "encoder fwd with merging − without (frozen, no grad)", {"merge_times": call.merge_times}
    raise ValueError(f"unknown site {comp.site!r}")


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

    from vtc.accounting import model_shape
    from vtc.flops import forward_flops

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


def judge(rows: list[dict]) -> list[dict]:
    """PASS/FAIL per target and row (reported, never asserted)."""
    by = {r["method"]: r for r in rows}
    out = []
    for name in PRE_LLM_25:
        r = by.get(name)
        if r:
            need = EFFICIENCY_TARGET * r["flops_ratio"]
            out.append(dict(target=f"{name}: speed-up >= {EFFICIENCY_TARGET:.0%} of the FLOPs ratio", method=name,
                            value=r["speedup"], threshold=need, passed=r["speedup"] >= need,
                            detail=f"speed-up {r['speedup']:.2f}x vs {need:.2f}x needed (FLOPs ratio {r['flops_ratio']:.2f}x, "
                                   f"efficiency {r['efficiency']:.2f})"))
    for r in rows:
        if "own_share" not in r or r["method"] == "none":
            continue
        share = r["own_share"]
        detail = f"{r['own_ms']:.1f} ms = {share:.1%} of the {r['step_ms']:.0f} ms step"
        if "merge_share" in r:
            detail += f" (net encoder delta; bipartite_merge alone {r['merge_ms']:.1f} ms = {r['merge_share']:.1%})"
        out.append(dict(target=f"{r['method']}: own cost <= {OWN_TARGET:.0%} of the step", method=r["method"],
                        value=share, threshold=OWN_TARGET, passed=share <= OWN_TARGET, detail=detail))
    for r in rows:
        if r.get("site") == "llm":
            out.append(dict(target=f"{r['method']}: peak memory <= none's", method=r["method"],
                            value=r["peak_mib"], threshold=by["none"]["peak_mib"],
                            passed=r["peak_mib"] <= by["none"]["peak_mib"],
                            detail=f"{r['peak_mib']:.0f} MiB vs none {by['none']['peak_mib']:.0f} MiB "
                                   f"({r['peak_vs_none']:.2f}x)"))
    if "hf_llava" in by:
        ratio = by["none"]["step_ms"] / by["hf_llava"]["step_ms"]
        out.append(dict(target=f"vtc none / HF Llava step time <= {HF_TARGET}", method="none", value=ratio,
                        threshold=HF_TARGET, passed=ratio <= HF_TARGET,
                        detail=f"{by['none']['step_ms']:.0f} ms / {by['hf_llava']['step_ms']:.0f} ms = {ratio:.3f}"))
    return out


# -- output ----------------------------------------------------------------------------------------

COLUMNS = [("method", "method"), ("site", "site"), ("visual_in", "visual in"), ("equiv_tokens", "equiv. tokens"),
           ("step_ms", "step ms (median)"), ("speedup", "speed-up vs none"), ("flops", "step FLOPs"),
           ("flops_ratio", "FLOPs ratio none/method"), ("efficiency", "speed-up / FLOPs ratio"),
           ("own_ms", "own ms"), ("own_share", "own share of step"), ("peak_mib", "peak MiB"),
           ("peak_vs_none", "peak vs none")]

DIAG_COLUMNS = [("method", "method"), ("fwd_ms", "fwd ms"), ("bwd_ms", "bwd ms"), ("opt_ms", "AdamW ms"),
                ("speedup_per_turn_median", "speed-up (median of per-turn ratios)"),
                ("flops_ratio_causal", "FLOPs ratio, causal attention counted ½"),
                ("speedup_llm_part", "speed-up w/o encoder + AdamW"),
                ("flops_ratio_llm_part", "FLOPs ratio w/o encoder"),
                ("efficiency_llm_part", "efficiency w/o encoder + AdamW"),
                ("own_flops_share", "own FLOPs share (analytic)")]


def to_markdown(res: dict) -> str:
    rows = [dict(r) for r in res["rows"]]
    for r in rows:
        for k in ("own_share", "own_flops_share"):
            if isinstance(r.get(k), float):
                r[k] = f"{r[k]:.2%}"
    lines = ["# Compressor zoo: training-step speed", "",
             f"Model: {res['sizes_text']}.", "",
             f"Median of {res['repeats']} round-robin turns after {res['warmup']} warm-up step(s); "
             f"{res['environment']['threads']} torch thread(s) on {res['environment']['cpus']} CPUs "
             f"(torch {res['environment']['torch']}, {res['environment']['when']}). "
             "FLOPs: `vtc.accounting.batch_flops` of every forward the step ran (FLOPs = 2 x MACs; trainable "
             "parts x3, frozen encoder x1), + ToMe's encoder saving.", "",
             C.md_table(rows, COLUMNS), ""]
    lines += ["Diagnostics (phase medians; what the FLOPs convention leaves out: the AdamW step, "
              f"and the frozen encoder forward, {res['encoder_ms']:.0f} ms per step, identical for every method but "
              "ToMe (M3 runs it once per scale)):", "", C.md_table(rows, DIAG_COLUMNS), ""]
    lines += ["Own-cost measurement per method:", ""]
    lines += [f"- `{r['method']}`: {r['own_method']}" for r in res["rows"] if "own_method" in r]
    lines += ["", "## Verdicts (targets from the issue)", "",
              "| target | verdict | detail |", "|---|---|---|"]
    lines += [f"| {v['target']} | {'PASS' if v['passed'] else 'FAIL'} | {v['detail']} |" for v in res["verdicts"]]
    if "vtc_over_hf" in res:
        lines += ["", f"vtc (compressor none) / transformers Llava step time: **{res['vtc_over_hf']:.3f}** "
                      f"(median of {len(res['vtc_over_hf_pairs'])} adjacent-pair ratios; from the round-robin "
                      f"medians {res['vtc_over_hf_round_robin']:.3f}; |loss difference| on the same weights and "
                      f"batch: {res['loss_diff_vtc_hf']:.1e})."]
    if "profile" in res:
        lines += ["", "## Profile: vtc none vs HF Llava (self CPU time, one step)", ""]
        for k, ops in res["profile"].items():
            lines += [f"### {k}", "", "| op | self ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.1f} | {o['share']:.1%} | {o['calls']} |" for o in ops]
            lines.append("")
    return "\n".join(lines)


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
