"""vtc: visual token compression for LLaVA-style large multimodal models."""
from pathlib import Path

__version__ = "0.1.0"

# The source checkout: train.py, eval.py and conf/ sit here (vtc is installed editable).
ROOT = Path(__file__).resolve().parents[1]


def load(path, *, vision_tower=None, device=None, precision="32-true"):
    """A trained checkpoint (``checkpoints/last.ckpt``) or a LLaVA directory, ready to answer:
    ``vtc.load(path).generate(images, prompts, compressor=None, max_new_tokens=None)`` -> a list of
    answers with ``.text``, ``.visual_tokens``, ``.prefill_flops``. See :mod:`vtc.eval.predict`."""
    # Imported on the call, by name: this file runs before every vtc.* module and `vtc --help`, and
    # the implementation costs torch, transformers and Hydra (seconds). By name, not `from ... import`:
    # vtc.config reads vtc.ROOT, so a static edge vtc -> vtc.eval would read, to import-linter and
    # tests/test_imports.py, as config -> eval (a layer broken, a cycle), which no import can run into:
    # the call happens once `vtc` is fully imported. tests/eval/test_predict.py checks both ends.
    import importlib

    predict = importlib.import_module("vtc.eval.predict")
    return predict.load(path, vision_tower=vision_tower, device=device, precision=precision)
