"""Benchmark: the training step with and without activation checkpointing: peak memory, time.

Side by side in one run: peak memory, what the forward leaves alive for backward, step time.

    python -m vtc.bench.memory [--quick] [--device cpu|cuda] [--train-encoder] [--compressor none]
                               [--steps 5] [--repeats 3] [--threads 2] [--out PATH]

One model per row, all with the same weights and the same batch: checkpointing off, ``[llm]``,
and with ``--train-encoder`` (the encoder trains in every row) also ``[llm, encoder]``; the layers
are checkpointed as training does it (``vtc.distributed.activation_checkpointing``). Sizes: an LLM of
few, wide-enough layers over long sequences (576 visual + ~128 text tokens a sample), so that the
activations, not the weights, are what a step allocates.

Memory, measured per row on a step after a warm-up step (AdamW's state exists: it is baseline):
  - CPU: torch's profiler with ``profile_memory`` records every allocation and free of torch's
    allocator in time order; ``peak`` = the most bytes allocated since the step began, over forward
    and backward (the CPU counterpart of CUDA's ``max_memory_allocated``), ``held`` = the bytes the
    forward leaves allocated when it returns (activations for backward, the loss). Not a
    ``saved_tensors_hooks`` count: inside a checkpointed layer the checkpoint's own hooks replace
    an outer one, and the layer inputs it keeps for the recomputation live in its closure, so such
    a count would miss exactly what checkpointing keeps and flatter it; the allocator sees them.
  - CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` and
    ``memory_allocated`` after the forward, both minus ``memory_allocated`` at the step's start.
Time: the median of ``steps`` x ``repeats`` whole steps (forward, backward, AdamW) per row, rows
interleaved, without the profiler. Loss: each row's loss of the measured step (the same weights and
batch: equal, bit for bit on the CPU; the tests check gradients too).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from vtc.bench import common as C
from vtc.distributed.activation_checkpointing import apply_activation_checkpointing

MB = 2**20
SIZES = C.Sizes(image_size=336, patch_size=14, vision_width=64, vision_layers=3, vision_heads=4, vision_mlp=256,
                llm_width=256, llm_layers=4, llm_heads=4, llm_kv_heads=4, llm_ffn=688, vocab=1024,
                text_tokens=128, answer_tokens=8, batch=4, lr=1e-5)
# A GPU has room for a wider model: 2048-wide layers (LLaMA-1B-like), batch 8.
CUDA_SIZES = C.replace(SIZES, vision_width=256, vision_mlp=1024, llm_width=2048, llm_heads=16, llm_kv_heads=16,
                       llm_ffn=5504, vocab=32000, batch=8)


def build(sizes: C.Sizes, compressor: str, parts: tuple[str, ...], train_encoder: bool, device: str):
    model = C.build_lmm(sizes, C.load_compressor(compressor), seed=0)
    if train_encoder:
        model.encoder.requires_grad_(True)
        model.encoder.train()
    apply_activation_checkpointing(model, parts)
    return model.to(device)


def cpu_memory(model, batch) -> tuple[int, int, float]:
    """(peak, held after forward, loss) of one forward + backward, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile, record_function

    box = {}

    def step():
        with record_function("vtc_forward"):
            box["out"] = model(batch)
        box["out"].loss.backward()

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = list(prof.profiler.kineto_results.events())
    fwd = next(e for e in events if e.name() == "vtc_forward")
    fwd_end = fwd.start_ns() + fwd.duration_ns()
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = held = 0
    for e in mem:
        cur += e.nbytes()
        peak = max(peak, cur)
        if e.start_ns() <= fwd_end:
            held = cur
    return peak, held, float(box["out"].loss.detach())


def cuda_memory(model, batch) -> tuple[int, int, float]:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = model(batch)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    out.loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, held, float(out.loss.detach())


def run(sizes: C.Sizes = SIZES, steps: int = 5, repeats: int = 3, threads: int | None = 2, device: str = "cpu",
        train_encoder: bool = False, compressor: str = "none", log=print) -> dict:
    variants = [("off", ()), ("llm", ("llm",))] + ([("llm+encoder", ("llm", "encoder"))] if train_encoder else [])
    batch = {k: v.to(device) for k, v in C.make_batch(sizes, seed=0).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    measure = cuda_memory if device == "cuda" else cpu_memory
    rows = []
    with C.torch_threads(threads):
        models = {name: build(sizes, compressor, parts, train_encoder, device) for name, parts in variants}
        opts = {name: C.optimizer(m, sizes.lr) for name, m in models.items()}
        for name, parts in variants:
            m, opt = models[name], opts[name]
            C.train_step(m, batch, opt)  # warm-up: AdamW state, lazy inits
            opt.zero_grad(set_to_none=True)
            peak, held, loss = measure(m, batch)
            opt.zero_grad(set_to_none=True)
            rows.append({"variant": name, "parts": list(parts), "peak_bytes": peak, "held_bytes": held,
                         "loss": loss, "step_ms_all": []})
            log(f"{name}: peak {peak / MB:.1f} MB, held after forward {held / MB:.1f} MB, loss {loss:.6f}")
        for r in range(repeats):
            for row in rows:
                m, opt = models[row["variant"]], opts[row["variant"]]
                for _ in range(steps):
                    sync()
                    t = time.perf_counter()
                    C.train_step(m, batch, opt)
                    sync()
                    row["step_ms_all"].append((time.perf_counter() - t) * 1e3)
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{row['variant']} {C.median(row['step_ms_all']):.0f} ms"
                                                          for row in rows))
    off = rows[0]
    for row in rows:
        row["step_ms"] = C.median(row["step_ms_all"])
        row["peak_ratio"] = row["peak_bytes"] / off["peak_bytes"]
        row["held_ratio"] = row["held_bytes"] / off["held_bytes"]
        row["time_ratio"] = row["step_ms"] / off["step_ms"]
        row["loss_diff"] = abs(row["loss"] - off["loss"])
    params = sum(p.numel() * p.element_size() for p in models["off"].parameters())
    env = {**C.environment(), "threads": threads or torch.get_num_threads()}  # the count the steps ran with
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return {"device": device, "sizes": C.sizes_dict(sizes), "describe": sizes.describe(), "compressor": compressor,
            "train_encoder": train_encoder, "steps": steps, "repeats": repeats, "param_bytes": params,
            "environment": env, "rows": rows}


def to_markdown(res: dict, command: str = "") -> str:
    rows = [{**r, "parts": "[" + ", ".join(r["parts"]) + "]", "peak": r["peak_bytes"] / MB,
             "held": r["held_bytes"] / MB} for r in res["rows"]]
    table = C.md_table(rows, [("parts", "activation_checkpointing"), ("peak", "peak (MB)"), ("peak_ratio", "vs off"),
                              ("held", "held after forward (MB)"), ("held_ratio", "vs off"),
                              ("step_ms", "median step (ms)"), ("time_ratio", "vs off"), ("loss", "loss")])
    env = res["environment"]
    how = ("torch.cuda.max_memory_allocated / memory_allocated above the step's start" if res["device"] == "cuda" else
           "torch.profiler(profile_memory=True): every allocation and free of torch's CPU allocator, "
           "above the step's start")
    where = env.get("gpu") or f"{env['cpus']} CPUs, {env['threads']} threads"
    describe = res["describe"].replace("frozen", "trained") if res["train_encoder"] else res["describe"]
    return (f"# Activation checkpointing: memory and time of a training step ({res['device']})\n\n{table}\n\n"
            f"Model: {describe}, compressor `{res['compressor']}`; parameters "
            f"{res['param_bytes'] / MB:.0f} MB. Memory: {how}; peak over forward + backward, held = what the forward "
            f"leaves allocated for backward. Time: median of {res['repeats']} x {res['steps']} whole steps (AdamW "
            f"included) per row, interleaved. torch {env['torch']}, {where}, {env['when']}."
            + (f"\n\nCommand: `{command}`" if command else ""))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 step, 1 repeat (a smoke test)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--train-encoder", action="store_true", help="train the encoder too, and add [llm, encoder]")
    p.add_argument("--compressor", default="none", help="a conf/compressor name (e.g. vcc: pooled inside the LLM)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the CPU machines have 2 cores)")
    p.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("vtc.bench.memory: --device cuda, and torch sees no CUDA device", file=sys.stderr)
        raise SystemExit(2)
    sizes = C.QUICK if a.quick else CUDA_SIZES if a.device == "cuda" else SIZES
    res = run(sizes, a.steps or (1 if a.quick else 5), a.repeats or (1 if a.quick else 3), a.threads, a.device,
              a.train_encoder, a.compressor, log=lambda m: print(m, file=sys.stderr, flush=True))
    md = to_markdown(res, "python -m vtc.bench.memory " + " ".join(sys.argv[1:] if argv is None else argv))
    print(md)
    out = a.out or C.default_out("memory_quick" if a.quick else "memory")
    paths = C.write_outputs(out, md, res)
    print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
