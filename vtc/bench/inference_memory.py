"""Benchmark: peak memory and time of answering questions, per compressor, on trained checkpoints.

    python -m vtc.bench.inference_memory --ckpt PATH [--ablation pool_16,fastv_16,...]
        [--trained LABEL=CKPT ...] [--batch N] [--new-tokens N] [--repeats 3] [--device cpu|cuda]
        [--out PATH]

The arms, side by side in one run, each answering the same batch (the first ``--batch`` questions
of the run's test split (default: its ``data.eval_batch_size``, eval.py's batch), prompted as
``vtc.load(...).generate`` prompts them, greedy, the run's ``generation.max_new_tokens`` unless
``--new-tokens``):
  - ``model``: ``--ckpt`` as trained (its own compressor);
  - each ``--ablation NAME``: ``--ckpt`` with conf/ablation/NAME's compressor applied at test time
    (what ``eval.py +ablation=NAME`` runs; training-free, so methods with parameters are refused);
  - each ``--trained LABEL=CKPT``: another checkpoint with the compressor it was trained with.
Memory, per arm, on a call after a warm-up call: the peak of the bytes allocated during one
``generate`` of the batch above what was allocated when it began (weights and anything alive
before are the baseline) -- on the CPU from ``torch.profiler`` memory events (every allocation and
free of torch's allocator, :func:`vtc.bench.common.allocator_peak_bytes`), on CUDA
``max_memory_allocated`` after ``reset_peak_memory_stats``. So it holds the encoder's activations,
the compressor's scoring, the prefill's activations and the KV cache as they coexist. Time: the
median of ``--repeats`` calls per arm, arms interleaved, without the profiler. Ratios are against
the first arm.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import torch
from PIL import Image

from vtc.bench import common as C
from vtc.config import compose_conf
from vtc.errors import ConfigError
from vtc.eval.predict import Predictor, load
from vtc.synthetic.encoder_pretrain import read_samples

MB = 2**20


def questions(predictor: Predictor, n: int) -> tuple[list, list[str]]:
    """The first ``n`` (image, prompt) pairs of the run's test split, the prompt as eval.py sends it
    (its ``<image>`` placeholder included)."""
    split = os.path.join(predictor.config.data.root, "test")
    if not os.path.isfile(os.path.join(split, "index.json")):
        raise ConfigError("ckpt", f"its test split {split} has no index.json; make the run's data first "
                          "(train.py or eval.py make it)")
    samples = read_samples(split, n)
    images = [Image.open(io.BytesIO(jpg)).convert("RGB") for jpg, _ in samples]
    prompts = [rec["conversations"][0]["value"] for _, rec in samples]
    return images, prompts


def ablation_compressor(name: str):
    """The compressor node ``eval.py +ablation=NAME`` composes."""
    try:
        return compose_conf("eval", [f"+ablation={name}"]).compressor
    except Exception as e:  # noqa: BLE001 - Hydra's MissingConfigException and kin: say which key
        raise ConfigError("ablation", f"{name!r} is not a conf/ablation option ({type(e).__name__}: {e})") from None


def peak_bytes(fn, device: str) -> int:
    if device != "cuda":
        return C.allocator_peak_bytes(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(ckpt: str, ablations: list[str] = (), trained: list[tuple[str, str]] = (), batch: int | None = None,
        new_tokens: int | None = None, repeats: int = 3, device: str = "cpu", threads: int | None = 2,
        log=print) -> dict:
    with C.torch_threads(threads):
        base = load(ckpt, device=device)
        batch = batch or base.settings.eval_batch_size
        images, prompts = questions(base, batch)
        # (label, predictor, compressor): every arm is resolved (and its config checked) before any is measured.
        arms = [("model", base, None)]
        arms += [(name, base, ablation_compressor(name)) for name in ablations]
        arms += [(label, load(path, device=device), None) for label, path in trained]
        rows = []
        for label, pred, comp in arms:
            model, _ = pred.model_for(comp)  # builds the variant outside the measurement

            def answer(pred=pred, comp=comp):
                return pred.generate(images, prompts, compressor=comp, max_new_tokens=new_tokens, batch_size=batch)

            answers = answer()  # warm-up: lazy inits, the first call's allocations
            peak = peak_bytes(answer, device)
            rows.append({"arm": label, "answer": answer, "peak_bytes": peak, "ms_all": [],
                         "visual_tokens": sum(a.visual_tokens for a in answers) / len(answers),
                         "equiv_visual_tokens": sum(a.equiv_visual_tokens for a in answers) / len(answers),
                         "prefill_gflops": sum(a.prefill_flops for a in answers) / len(answers) / 1e9,
                         "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                         "answers": [a.text for a in answers]})
            log(f"{label}: peak {peak / MB:.2f} MB, {rows[-1]['visual_tokens']:.1f} visual tokens")
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for r in range(repeats):
            for row in rows:
                sync()
                t = time.perf_counter()
                row["answer"]()
                sync()
                row["ms_all"].append((time.perf_counter() - t) * 1e3)
            log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{row['arm']} {C.median(row['ms_all']):.0f} ms" for row in rows))
    first = rows[0]
    for row in rows:
        del row["answer"]
        row["ms"] = C.median(row["ms_all"])
        row["peak_mb"] = row["peak_bytes"] / MB
        row["peak_ratio"] = row["peak_bytes"] / first["peak_bytes"]
        row["time_ratio"] = row["ms"] / first["ms"]
    env = {**C.environment(), "threads": threads or torch.get_num_threads()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return {"ckpt": os.path.abspath(ckpt), "device": device, "batch": batch, "repeats": repeats,
            "new_tokens": new_tokens, "trained": dict(trained), "environment": env, "rows": rows}


def to_markdown(res: dict, command: str = "") -> str:
    table = C.md_table(res["rows"], [("arm", "arm"), ("visual_tokens", "visual tokens"),
                                     ("equiv_visual_tokens", "equiv. (mean over layers)"),
                                     ("prefill_gflops", "prefill GFLOPs/sample"), ("peak_mb", "peak (MB)"),
                                     ("peak_ratio", "vs first"), ("ms", f"median ms / batch of {res['batch']}"),
                                     ("time_ratio", "vs first")])
    env = res["environment"]
    how = ("torch.cuda.max_memory_allocated above the call's start" if res["device"] == "cuda" else
           "torch.profiler(profile_memory=True) allocation events, above the call's start")
    where = env.get("gpu") or f"{env['cpus']} CPUs, {env['threads']} threads"
    return (f"# Answering a batch: peak memory and time per compressor ({res['device']})\n\n{table}\n\n"
            f"One greedy `generate` of the first {res['batch']} test questions per arm (`vtc.load(...).generate`); "
            f"peak memory: {how} (weights excluded: {res['rows'][0]['param_bytes'] / MB:.1f} MB for the first "
            f"arm); time: median of {res['repeats']} calls per arm, interleaved. torch {env['torch']}, {where}, "
            f"{env['when']}." + (f"\n\nCommand: `{command}`" if command else ""))


def _trained(value: str) -> tuple[str, str]:
    label, sep, path = value.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: give LABEL=CKPT, e.g. stf_16=outputs/.../last.ckpt")
    return label, path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (its test split gives the questions)")
    p.add_argument("--ablation", default="", help="comma-separated conf/ablation options applied to --ckpt")
    p.add_argument("--trained", type=_trained, action="append", default=[], metavar="LABEL=CKPT",
                   help="another checkpoint, with the compressor it was trained with (repeatable)")
    p.add_argument("--batch", type=int, default=None, help="default: the run's data.eval_batch_size")
    p.add_argument("--new-tokens", type=int, default=None, help="default: the run's generation.max_new_tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the CPU machines have 2 cores)")
    p.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, and torch sees no CUDA device")
    if (a.batch is not None and a.batch < 1) or a.repeats < 1:
        p.error("--batch and --repeats: positive integers")
    ablations = [x for x in a.ablation.split(",") if x]
    res = run(a.ckpt, ablations, a.trained, a.batch, a.new_tokens, a.repeats, a.device, a.threads,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    md = to_markdown(res, "python -m vtc.bench.inference_memory " + " ".join(sys.argv[1:] if argv is None else argv))
    print(md)
    paths = C.write_outputs(a.out or C.default_out("inference_memory"), md, res)
    print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
