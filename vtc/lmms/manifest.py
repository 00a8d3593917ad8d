"""The ``lmms_eval.models`` entry point: lmms-eval's model registry reads this manifest at start-up
(``ModelRegistryV2.load_entrypoint_manifests``) and imports the class only when ``--model vtc``
asks for it."""
from __future__ import annotations

from lmms_eval.models.registry_v2 import ModelManifest


def manifests() -> list[ModelManifest]:
    return [ModelManifest(model_id="vtc", simple_class_path="vtc.lmms.model.VtcLMM")]
