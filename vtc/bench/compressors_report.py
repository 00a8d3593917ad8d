"""The compressor-zoo benchmark's verdicts and markdown (:mod:`vtc.bench.compressors`): the
issue's targets judged PASS/FAIL on the measured rows (reported, never asserted) and the record
written out as tables.
"""
from __future__ import annotations

from vtc.bench import common as C

PRE_LLM_25 = ("pool", "stf")  # pre-LLM methods at 25% of the tokens: speed-up target
EFFICIENCY_TARGET = 0.90
OWN_TARGET = 0.03
HF_TARGET = 1.05


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
        # In-LLM methods that drop tokens must hold fewer activations; VoCo adds its tokens to the
        # full visual span in training (layer average above the tokens entering) and has no target.
        if r.get("site") == "llm" and float(r["equiv_tokens"]) < float(str(r["visual_in"]).split("/")[0]):
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
             "FLOPs: `vtc.cost.accounting.batch_flops` of every forward the step ran (FLOPs = 2 x MACs; trainable "
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

