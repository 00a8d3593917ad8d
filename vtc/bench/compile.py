"""Benchmark: the training step with eager against ``torch.compile``d LLM decoder layers (CPU).

    python -m vtc.bench.compile [--quick] [--steps 10] [--repeats 5] [--threads 2] [--out PATH]

Two copies of make train's tiny LMM (the same weights; the sizes of conf/encoder/tiny.yaml and
conf/llm/tiny.yaml, batch 32, ~108 text tokens + 64 visual tokens a sample) train side by side:
repeat r times `steps` steps of the eager model, then `steps` steps of the compiled one, on
batches of three padded lengths (as real batches vary), so both see the machine in the same
state. Reported: the compilation time (the compiled model's first steps), the median step time of
each, their ratio, and the losses of the first step of each (the same up to rounding).
"""
from __future__ import annotations

import argparse
import sys
import time


from vtc.bench import common as C

# make train's model (conf/encoder/tiny.yaml, conf/llm/tiny.yaml) and batch (conf/data/synthetic.yaml)
SIZES = C.Sizes(image_size=112, patch_size=14, vision_width=96, vision_layers=4, vision_heads=4, vision_mlp=384,
                llm_width=128, llm_layers=4, llm_heads=4, llm_kv_heads=4, llm_ffn=512, vocab=128,
                text_tokens=108, answer_tokens=6, batch=32, lr=1e-3)


def run(sizes: C.Sizes = SIZES, steps: int = 10, repeats: int = 5, threads: int | None = 2, log=print) -> dict:
    batches = [C.make_batch(C.replace(sizes, text_tokens=sizes.text_tokens + d), seed=i)
               for i, d in enumerate((0, 3, 7))]
    models, opts = {}, {}
    for name in ("eager", "compiled"):
        models[name] = C.build_lmm(sizes, C.load_compressor("none"), seed=0)
        opts[name] = C.optimizer(models[name], sizes.lr)
    models["compiled"].llm.compile_layers()
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with C.torch_threads(threads):
        first = {"eager": C.train_step(models["eager"], batches[0], opts["eager"])}
        t = time.perf_counter()
        # compiles: the first shape, then the dynamic graph on the next two
        losses = [C.train_step(models["compiled"], b, opts["compiled"]) for b in batches]
        compile_s = time.perf_counter() - t
        first["compiled"] = losses[0]
        assert models["compiled"].llm._compiled.proven, "compilation failed (see the warning)"
        for r in range(repeats):
            for name in ("eager", "compiled"):
                for k in range(steps):
                    times[name].append(C.timed(lambda: C.train_step(models[name], batches[k % 3], opts[name])))
            log(f"repeat {r + 1}/{repeats}: eager {C.median(times['eager']) * 1e3:.0f} ms, "
                f"compiled {C.median(times['compiled']) * 1e3:.0f} ms")
    eager_ms, comp_ms = C.median(times["eager"]) * 1e3, C.median(times["compiled"]) * 1e3
    return {"sizes": C.sizes_dict(sizes), "steps": steps, "repeats": repeats, "environment": C.environment(),
            "compile_s": compile_s, "eager_ms": eager_ms, "compiled_ms": comp_ms, "ratio": comp_ms / eager_ms,
            "first_loss": first, "step_ms_all": {k: [x * 1e3 for x in v] for k, v in times.items()}}


def to_markdown(res: dict) -> str:
    rows = [{"layers": "eager", "ms": res["eager_ms"], "ratio": 1.0, "loss": res["first_loss"]["eager"]},
            {"layers": "compiled", "ms": res["compiled_ms"], "ratio": res["ratio"],
             "loss": res["first_loss"]["compiled"]}]
    table = C.md_table(rows, [("layers", "LLM layers"), ("ms", "median step (ms)"), ("ratio", "vs eager"),
                              ("loss", "first-step loss")])
    env = res["environment"]
    return (f"# Training step: eager vs compiled LLM layers\n\n{table}\n\nCompilation (the compiled model's "
            f"first three steps, three padded lengths): {res['compile_s']:.1f} s. {res['repeats']} repeats x "
            f"{res['steps']} steps each, interleaved; torch {env['torch']}, {env['threads']} threads, "
            f"{env['cpus']} CPUs, {env['when']}.")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 1 repeat (a smoke test)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=2, help="torch threads (make train uses 2 on its 2 cores)")
    p.add_argument("--out", default=None, help="output path without suffix (.md and .json are written)")
    a = p.parse_args(argv)
    sizes = C.QUICK if a.quick else SIZES
    res = run(sizes, a.steps or (2 if a.quick else 10), a.repeats or (1 if a.quick else 5), a.threads,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    md = to_markdown(res)
    print(md)
    out = a.out or C.default_out("compile_quick" if a.quick else "compile")
    paths = C.write_outputs(out, md, res)
    print(f"\nwrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
