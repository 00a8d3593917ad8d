"""``torch.compile`` of the LLM's decoder layers for training steps (``compile_llm`` in train.yaml).

Why: the CPU step of the tiny model is dominated by the decoder layers' many small kernels;
compiled (inductor, ``dynamic=True`` so batches of other padded lengths do not recompile), the
make-train step took ~12% less time after ~12 s of compilation (200 steps side by side, 0.353 s
against 0.402 s a step; experiments/bench/compile.md). The losses stay the same to rounding (2e-7 relative after 200
steps): fused kernels round differently, nothing else changes.

Only training forwards use the compiled layers (``cache is None`` and grad enabled); validation,
generation with a KV cache and evaluation keep the eager layers, whose varying shapes would
otherwise recompile. The compiled callables share the layers' parameters and are kept in a plain
list, so state dicts and checkpoints are the same with or without compilation.

``compile_llm``: ``false`` (the default), ``true``, or ``auto``: compile when training on the CPU
for at least :data:`AUTO_MIN_STEPS` steps -- shorter runs (tests, smoke runs) would spend more
time compiling than they save. Off by default because the different rounding alone moved make
train's seed-0 val/acc from 51.0% to 47.6% before the readout round (conf/train.yaml, experiments/synthetic/README.md):
the default run stays the measured one. On a machine where compilation fails (no C++ compiler, say) the first training step
warns and continues eagerly.
"""
from __future__ import annotations

import warnings

import torch

from vtc.errors import ConfigError

AUTO_MIN_STEPS = 500
CHOICES = ("auto", True, False)


def should_compile(setting, accelerator: str, max_steps: int | None) -> bool:
    """The ``compile_llm`` decision for a run."""
    if isinstance(setting, str) and setting.lower() in ("true", "false"):
        setting = setting.lower() == "true"
    if setting not in CHOICES:
        raise ConfigError("compile_llm", f"{setting!r}; use auto, true or false")
    if setting != "auto":
        return bool(setting)
    return str(accelerator) == "cpu" and max_steps is not None and int(max_steps) >= AUTO_MIN_STEPS


class CompiledLayers:
    """The compiled counterparts of ``layers``; ``failed`` once compilation did not work here."""

    def __init__(self, layers):
        self.layers = [torch.compile(layer, dynamic=True) for layer in layers]
        self.proven = False  # set after the first training forward ran compiled
        self.failed = False

    def run(self, eager_run, compiled_run):
        """``compiled_run()``; on its very first call, a failure warns and ``eager_run()`` redoes
        the forward (compilation fails before any layer has run, so nothing is half done)."""
        if self.proven:
            return compiled_run()
        try:
            out = compiled_run()
        except Exception as e:  # inductor raises many types (missing compiler, unsupported op, ...)
            self.failed = True
            warnings.warn(f"compile_llm: compiling the decoder layers failed ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); training continues eagerly. "
                          f"Set compile_llm=false to skip the attempt.", RuntimeWarning, stacklevel=2)
            return eager_run()
        self.proven = True
        return out
