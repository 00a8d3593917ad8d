"""``vtc SUBCOMMAND [ARGS...]``: one command for vtc's entry points (``vtc --help`` lists them).

``vtc train`` / ``vtc eval`` run the repository's ``train.py`` / ``eval.py`` exactly as
``python train.py`` / ``python eval.py`` do (the same Hydra app, ``-m`` and ``--help`` included);
every other subcommand hands its arguments to the ``main`` of an existing module, unparsed. This
module imports nothing heavy: a subcommand's module is imported only when that subcommand runs.
"""
from __future__ import annotations

import importlib
import runpy
import sys

from vtc import ROOT, __version__

# name -> (target, one line). target: a script at the repository root, or the module whose main runs.
SCRIPTS = {
    "train": ("train.py", "train a model (Hydra app: python train.py [overrides], -m for a sweep)"),
    "eval": ("eval.py", "evaluate a checkpoint (Hydra app: python eval.py ckpt_path=... [overrides])"),
}
MODULES = {
    "flops": ("vtc.cli.flops", "analytic FLOPs of a configured model, per compressor (no weights)"),
    "convert": ("vtc.data.convert", "LLaVA-format JSON + images -> webdataset shards"),
    "synthetic": ("vtc.synthetic.shards", "build the synthetic digit-grid VQA benchmark's shards"),
    "synthetic-video": ("vtc.synthetic.video_shards", "build the synthetic video benchmark's shards (clips of boards)"),
    "export": ("vtc.eval.export", "a trained checkpoint as a transformers Llava or vtc directory"),
    "predict": ("vtc.eval.predict", "answer a question about an image: the answer, visual tokens, prefill FLOPs"),
    "consolidate": ("vtc.distributed.consolidate", "one torch file from a (sharded FSDP) checkpoint"),
    "report": ("vtc.runs.report", "reports from MLflow: mean +- std per configuration over seeds"),
    "study": ("vtc.runs.study", "a reproducible study: train sweep, eval sweep, report"),
    "parallel": ("vtc.cli.parallel", "the FSDP2 plan's parameters per rank of a configured model"),
    "error-analysis": ("vtc.synthetic.error_analysis", "where synthetic-benchmark answers go wrong (predictions.jsonl)"),
    "attention-analysis": ("vtc.synthetic.attention_analysis", "where a checkpoint's LLM looks when it answers a cell question"),
}
BENCHES = {
    "compressors": ("vtc.bench.compressors", "one training step of every compressor config, side by side"),
    "curriculum": ("vtc.bench.curriculum", "a stage-wise schedule (LLaVolta) against constant none"),
    "loader": ("vtc.bench.loader", "data-side speed: shard loader, converter, data wait of a training loop"),
    "video": ("vtc.bench.video", "a video training step: LLaVolta's first stage and temporal pooling against none"),
    "compile": ("vtc.bench.compile", "the training step, eager against torch.compile'd LLM layers"),
    "gpu_step": ("vtc.bench.gpu_step", "a LLaVA-1.5-7B-shaped training step on one GPU: tokens/s, MFU"),
    "memory": ("vtc.bench.memory", "the training step with and without activation checkpointing: peak memory, time"),
    "inference_memory": ("vtc.bench.inference_memory", "answering per compressor on checkpoints: peak memory, time"),
}
BENCH_LINE = "benchmarks: vtc bench {compressors,curriculum,loader,video,compile,gpu_step,memory,inference_memory} [--help]"


def prog_name(module: str) -> str:
    """How a subcommand module was invoked, for its usage line: ``vtc flops`` through this command
    (``run_module`` puts it in ``sys.argv[0]``), else ``python -m vtc.cli.flops``."""
    if sys.argv and sys.argv[0].startswith("vtc "):
        return sys.argv[0]
    if module == "__main__":  # python -m vtc.cli.flops: the module's own name is __main__
        module = getattr(sys.modules["__main__"].__spec__, "name", module)
    return f"python -m {module}"


def _listing(table: dict, width: int = 20) -> str:
    return "\n".join(f"  {name:<{width}}{line}" for name, (_, line) in table.items())


def usage() -> str:
    cmds = {**SCRIPTS, **MODULES, "bench": ("", BENCH_LINE)}
    return ("usage: vtc [-h] [--version] SUBCOMMAND [ARGS...]\n\n"
            "Visual token compression for LLaVA-style models: train, evaluate, compare.\n\n"
            f"subcommands:\n{_listing(cmds)}\n\n"
            "`vtc SUBCOMMAND --help` prints a subcommand's own help (train/eval: Hydra's).")


def bench_usage() -> str:
    return f"usage: vtc bench BENCHMARK [ARGS...]\n\nbenchmarks:\n{_listing(BENCHES)}"


def refuse(message: str, listing: str) -> int:
    print(f"{listing}\n\nvtc: {message}", file=sys.stderr)
    return 2


def run_script(name: str, args: list[str]) -> int:
    """``python <ROOT>/train.py ARGS``, in this process: the same file as ``__main__`` (Hydra finds
    conf/ next to it and names the job after it), the same sys.argv."""
    script = ROOT / SCRIPTS[name][0]
    if not script.is_file():
        print(f"vtc {name}: {script} not found; `vtc {name}` needs a source checkout "
              "(pip install -e .)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def run_module(module: str, prog: str, args: list[str]) -> int:
    """``module.main(args)``; its return value is the exit status when it is one (an int), as in
    the module's own ``if __name__ == "__main__"`` block."""
    sys.argv = [prog, *args]  # argparse parsers without an explicit prog name themselves after it
    result = importlib.import_module(module).main(args)
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def dispatch(argv: list[str]) -> int:
    if not argv:
        return refuse("a subcommand is required", usage())
    sub, rest = argv[0], argv[1:]
    if sub in ("-h", "--help", "help"):
        print(usage())
        return 0
    if sub == "--version":
        print(f"vtc {__version__}")
        return 0
    if sub in SCRIPTS:
        return run_script(sub, rest)
    if sub in MODULES:
        return run_module(MODULES[sub][0], f"vtc {sub}", rest)
    if sub == "bench":
        if not rest:
            return refuse("a benchmark is required", bench_usage())
        if rest[0] in ("-h", "--help"):
            print(bench_usage())
            return 0
        if rest[0] not in BENCHES:
            return refuse(f"unknown benchmark {rest[0]!r}", bench_usage())
        return run_module(BENCHES[rest[0]][0], f"vtc bench {rest[0]}", rest[1:])
    return refuse(f"unknown subcommand {sub!r}", usage())


def main(argv: list[str] | None = None) -> None:
    """The ``vtc`` console script (``[project.scripts]``) and ``python -m vtc``."""
    saved = list(sys.argv)
    try:
        code = dispatch(list(sys.argv[1:] if argv is None else argv))
    finally:
        sys.argv = saved
    sys.exit(code)


if __name__ == "__main__":
    main()
