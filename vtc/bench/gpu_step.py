"""``python -m vtc.bench.gpu_step``: speed of a LLaVA-1.5-7B-shaped training step on one CUDA GPU
(issue 6, item 5): tokens/s, step time and model FLOPs utilisation, for compressor ``none`` and
others.

    python -m vtc.bench.gpu_step [--compressors none,stf] [--batch 8] [--steps 10] [--layers 16]
                                 [--out experiments/bench] [--peak 989e12]

Model: ``encoder=clip_l14_336 llm=vicuna_7b projector=mlp2x_gelu`` composed from conf/ as
``vtc parallel`` / ``vtc.assembly.build.build_meta`` do (shapes from the config fields, no
files), but materialised on the GPU with random weights, in bf16 (weights, gradients and AdamW
state: no fp32 master copy, so the 7B fits one 80 GB card's optimizer state), attention
``auto`` (flash-attention 2 when flash-attn imports). ``--layers N`` cuts the LLM to N decoder
layers when 32 does not fit with AdamW; the shape used is printed and written. Training as
``train_parts`` defaults: encoder frozen, projector + compressor + LLM trained, fused AdamW.

MFU = analytic step FLOPs (``vtc.bench.common.step_flops``: ``vtc.cost.accounting.batch_flops`` of
the token counts the step actually ran; attention counted in full, as ``vtc.cost.flops`` does) /
median step time / the GPU's peak dense bf16 FLOPs. Without CUDA: a message and exit code 2.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from vtc.assembly.build import LLM_META
from vtc.bench import common as C
from vtc.config import CONF_DIR, node_kwargs
from vtc.lmm import LMM
from vtc.model.llm import resolve_attn_implementation

LLAVA_7B = ["encoder=clip_l14_336", "llm=vicuna_7b", "projector=mlp2x_gelu"]
NO_CUDA = 2

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets. Matched on
# torch.cuda.get_device_name(); the PCIe / NVL H100 and H200 have lower clocks and other peaks, so
# they are excluded rather than credited with the SXM number (pass --peak for them).
PEAKS = [
    # (name contains, name must not contain, peak FLOP/s, label)
    ("H100", ("PCIE", "NVL"), 989e12, "H100 SXM"),
    ("H200", ("NVL",), 989e12, "H200"),
    ("A100", (), 312e12, "A100"),
]


class UnknownPeak(ValueError):
    pass


def peak_bf16_flops(gpu_name: str, override: float | None = None) -> float:
    """The GPU's peak dense bf16 FLOP/s: ``override`` when given, else from ``PEAKS``."""
    if override is not None:
        if override <= 0:
            raise UnknownPeak(f"--peak must be positive, got {override}")
        return float(override)
    name = gpu_name.upper()
    for has, hasnt, peak, _ in PEAKS:
        if has in name and not any(x in name for x in hasnt):
            return peak
    known = ", ".join(label for _, _, _, label in PEAKS)
    raise UnknownPeak(f"no known peak bf16 dense FLOP/s for GPU {gpu_name!r} (known: {known}); "
                      "pass --peak FLOPS, e.g. --peak 756e12")


def mfu(step_flops: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
    if step_seconds <= 0 or peak_flops <= 0:
        raise ValueError("step time and peak must be positive")
    return step_flops / step_seconds / peak_flops


# -- model ---------------------------------------------------------------------------------------

def sizes(args) -> C.Sizes:
    """The batch's geometry (CLIP 336/14: 576 patches) and Vicuna's vocabulary; the model widths
    in Sizes are unused here (the model comes from conf/)."""
    return C.Sizes(image_size=336, patch_size=14, vocab=32000, text_tokens=args.text_tokens,
                   answer_tokens=args.answer_tokens, batch=args.batch)


def build_model(compressor: str, layers: int | None, attn: str, device: str = "cuda", dtype=torch.bfloat16):
    """LLaVA-1.5-7B shapes from conf/, random weights created directly on ``device`` in ``dtype``
    (no fp32 or CPU copy of 7B parameters on the way)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf


    overrides = list(LLAVA_7B) + ([f"llm.config.num_hidden_layers={layers}"] if layers else [])
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    OmegaConf.update(cfg, "encoder.path", None)  # as build_meta: shapes from the config fields
    OmegaConf.update(cfg, "llm.path", None)
    enc_kw = node_kwargs(cfg.encoder, drop=("pretrain", "image_size"))
    llm_kw = node_kwargs(cfg.llm, drop=LLM_META)
    enc_kw["attn_implementation"] = llm_kw["attn_implementation"] = attn
    enc_kw["dtype"] = llm_kw["dtype"] = None  # already created in dtype (the default below)
    enc_kw["_convert_"] = llm_kw["_convert_"] = "all"
    prev = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LMM(instantiate(enc_kw), instantiate(llm_kw), C.load_compressor(compressor),
                        projector=cfg.projector.kind, image_token_id=31999, pad_token_id=0, eos_token_id=2)
    finally:
        torch.set_default_dtype(prev)
    model = model.to(device, dtype)
    C.freeze_encoder(model)  # train_parts: projector, compressor, llm
    return model


def describe(model, s: C.Sizes, attn: str) -> str:
    e, l = model.encoder.model.config, model.llm.config
    return (f"CLIP-L/14-336 ({e.num_hidden_layers} layers, width {e.hidden_size}, {model.encoder.info.num_patches} "
            f"patches, frozen) + mlp2x_gelu + Vicuna-7B shape ({l.num_hidden_layers} of 32 layers, width "
            f"{l.hidden_size}, FFN {l.intermediate_size}, vocab {l.vocab_size}); batch {s.batch}, ~{s.text_tokens} "
            f"text tokens per sample ({s.answer_tokens} with a loss); bf16 weights/grads/AdamW state, "
            f"fused AdamW, attention {attn}")


# -- one compressor --------------------------------------------------------------------------------

def measure(compressor: str, args, attn: str, peak: float, device: str = "cuda") -> dict:
    s = sizes(args)
    model = build_model(compressor, args.layers, attn, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, fused=device == "cuda")
    batch = {k: v.to(device) for k, v in C.make_batch(s).items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # The batch is fixed, so every step runs the same token counts: FLOPs from the first one.
    with C.recording_forwards(model) as outs:
        first_loss = C.train_step(model, batch, opt)
    flops = C.step_flops(model, outs)
    llm_tokens = int(sum(int(o.lengths.sum()) for o in outs))
    visual_in = int(outs[0].visual_in.max())
    for _ in range(max(args.warmup - 1, 0)):
        C.train_step(model, batch, opt)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], first_loss
    for _ in range(args.steps):
        sync()
        t = time.perf_counter()
        loss = C.train_step(model, batch, opt)  # float(): waits for the step's kernels
        sync()
        times.append(time.perf_counter() - t)
    step = C.median(times)
    row = {"compressor": compressor, "visual_in": visual_in, "llm_tokens": llm_tokens, "step_s": step,
           "step_s_all": times, "tokens_per_s": llm_tokens / step, "samples_per_s": s.batch / step,
           "flops": flops, "tflops_per_s": flops / step / 1e12, "mfu": mfu(flops, step, peak),
           "loss_first": first_loss, "loss_last": loss,
           "trainable_params": sum(p.numel() for p in params),
           "params": sum(p.numel() for p in model.parameters()), "shape": describe(model, s, attn)}
    if device == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt, batch, outs
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


# -- output ----------------------------------------------------------------------------------------

COLUMNS = [("compressor", "compressor"), ("visual_in", "visual tokens"), ("llm_tokens", "LLM tokens / step"),
           ("step_s", "step s"), ("tokens_per_s", "LLM tokens/s"), ("samples_per_s", "samples/s"),
           ("tflops_per_s", "model TFLOP/s"), ("mfu", "MFU"), ("peak_mem_gib", "peak GiB")]


def to_markdown(record: dict) -> str:
    shapes = sorted({r["shape"] for r in record["rows"] if "shape" in r})
    ooms = [r["compressor"] for r in record["rows"] if r.get("error")]
    lines = [f"# GPU training step, LLaVA-1.5-7B shape ({record['gpu']})", "",
             f"{record['when']}; torch {record['torch']}, CUDA {record['cuda']}; peak bf16 dense "
             f"{record['peak_flops'] / 1e12:.0f} TFLOP/s ({record['peak_source']}); {record['steps']} timed "
             f"steps after {record['warmup']} warm-up, median.", "",
             *[f"Shape: {s}" for s in shapes], "",
             C.md_table([r for r in record["rows"] if not r.get("error")], COLUMNS), "",
             "MFU = analytic step FLOPs (vtc.cost.accounting.batch_flops of the token counts the step ran: "
             "3x forward for trained parts, 1x for the frozen encoder, attention counted in full) / "
             "median step time / peak. Issue 6 target: MFU >= 40% for `none`."]
    if ooms:
        lines += ["", "Did not run: " + "; ".join(f"`{r['compressor']}`: {r['error']}" for r in record["rows"]
                                                  if r.get("error"))]
    return "\n".join(lines)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m vtc.bench.gpu_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compressors", default="none,stf", help="comma-separated conf/compressor names")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (kernel autotuning, allocator)")
    ap.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: Vicuna-7B's 32)")
    ap.add_argument("--text-tokens", type=int, default=128, help="mean text tokens per sample")
    ap.add_argument("--answer-tokens", type=int, default=64, help="tokens with a loss per sample")
    ap.add_argument("--peak", type=float, default=None, help="peak dense bf16 FLOP/s of the GPU (overrides the table)")
    ap.add_argument("--out", default=str(C.default_out("")), help="folder for gpu_step_<gpu>.md / .json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("vtc.bench.gpu_step needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). Nothing was measured.", file=sys.stderr)
        return NO_CUDA
    gpu = torch.cuda.get_device_name()
    try:
        peak = peak_bf16_flops(gpu, args.peak)
    except UnknownPeak as e:
        print(f"vtc.bench.gpu_step: {e}", file=sys.stderr)
        return NO_CUDA

    attn = resolve_attn_implementation("auto", "cuda")
    record = {"gpu": gpu, "peak_flops": peak, "peak_source": "--peak" if args.peak else "table",
              "attn": attn, "cuda": torch.version.cuda, "steps": args.steps, "warmup": args.warmup,
              "args": vars(args), **C.environment(), "rows": []}
    for name in [n for n in args.compressors.split(",") if n]:
        print(f"{name}: building and warming up ...", flush=True)
        try:
            row = measure(name, args, attn, peak)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row = {"compressor": name, "error": "CUDA out of memory; try --layers 16 or a smaller --batch"}
        print({k: v for k, v in row.items() if k not in ("step_s_all", "shape")}, flush=True)
        record["rows"].append(row)
    md = to_markdown(record)
    print("\n" + md)
    paths = C.write_outputs(Path(args.out) / f"gpu_step_{slug(gpu)}", md, record)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
