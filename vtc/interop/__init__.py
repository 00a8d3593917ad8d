"""Interoperability with LLaVA checkpoints: read them (``model.init_from``), write them
(``python -m vtc.eval.export``).

Three directory formats:

``hf``     a transformers ``LlavaForConditionalGeneration`` directory (``config.json`` with
           ``vision_config`` / ``text_config``, safetensors, tokenizer, processor config);
``llava``  an original-LLaVA directory (haotian-liu/LLaVA): an LLM directory whose config names
           ``mm_vision_tower``, ``mm_projector_type``, ``mm_vision_select_layer``,
           ``mm_hidden_size`` and whose weights hold ``model.mm_projector.*``; the vision tower
           is a separate local directory (``model.vision_tower_path``);
``vtc``    what ``python -m vtc.eval.export --format vtc`` writes for models that no Llava class can
           hold (a compressor with trained parameters, e.g. STF): ``config.json`` with
           ``"format": "vtc-lmm"`` naming the compressor config, the LMM's own state dict in
           safetensors, tokenizer and image-processor config.

Reading, one step a module: :mod:`vtc.interop.formats` (what reader and writer share),
:mod:`vtc.interop.spec` (a directory's configs), :mod:`vtc.interop.images` (its image preprocessing),
:mod:`vtc.interop.weights` (its tensors), :mod:`vtc.interop.load` (the model),
:mod:`vtc.interop.init_from` (``model.init_from`` in a Hydra config). Writing: :mod:`vtc.eval.export`.
"""
from vtc.interop.formats import LlavaLoadError
from vtc.interop.images import image_processor_from_config
from vtc.interop.load import LoadedLlava, load_llava
from vtc.interop.spec import LlavaSpec, read_spec
from vtc.interop.weights import LoadReport

__all__ = [
    "LlavaLoadError",
    "LlavaSpec",
    "LoadedLlava",
    "LoadReport",
    "image_processor_from_config",
    "load_llava",
    "read_spec",
]
