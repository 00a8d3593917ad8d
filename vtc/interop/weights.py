"""Copy a LLaVA directory's weights into a built ``LMM``, accounting for every tensor.

One name mapper per format (the layouts are described in :mod:`vtc.interop.spec`): ``map_hf``,
``map_original`` plus ``map_vision_dir`` for the separate vision tower, ``map_vtc``. Tensors are
read one at a time (safetensors, or PyTorch ``.bin`` with ``weights_only=True``).

Strictness. Every weight is accounted for: loaded, ignored for a stated reason (e.g. the CLIP
text tower, rotary ``inv_freq`` buffers), unexpected, or missing. Missing weights and shape
mismatches are always errors (nothing is left randomly initialised), unexpected ones are errors
unless ``strict=False``. Compressor parameters no file holds are reported as ``new``; projector
weights are ignored when the compressor is the projector (STF).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from vtc.interop.formats import LlavaLoadError, read_json
from vtc.interop.spec import LlavaSpec
from vtc.lmm import LMM


@dataclass
class LoadReport:
    """Where every weight went. ``check`` raises on anything that would change the model."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # model tensors no file provided
    unexpected: list[str] = field(default_factory=list)  # file tensors with no place in the model
    mismatched: list[str] = field(default_factory=list)  # same place, other shape
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> file tensors skipped for it
    new: list[str] = field(default_factory=list)  # compressor parameters initialised afresh
    notes: list[str] = field(default_factory=list)

    def check(self, strict: bool = True) -> None:
        problems = []
        if self.mismatched:
            problems.append(f"{len(self.mismatched)} shape mismatches: {_names(self.mismatched)}")
        if self.missing:
            problems.append(f"{len(self.missing)} missing weights: {_names(self.missing)}")
        if strict and self.unexpected:
            problems.append(f"{len(self.unexpected)} unexpected weights: {_names(self.unexpected)}")
        if problems:
            raise LlavaLoadError(f"{self.source} does not fit the model it describes; " + "; ".join(problems))

    def ignore(self, name: str, reason: str) -> None:
        self.ignored.setdefault(reason, []).append(name)

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        for name in ("missing", "unexpected", "mismatched", "new", "notes"):
            items = getattr(self, name)
            if items:
                lines.append(f"  {name} ({len(items)}): {_names(items)}")
        for reason, items in self.ignored.items():
            lines.append(f"  ignored, {reason} ({len(items)}): {_names(items, 5)}")
        return "\n".join(lines)


def _names(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def checkpoint_files(root: str) -> list[str]:
    """Weight files of a directory: safetensors preferred, then PyTorch ``.bin`` (read with
    ``weights_only=True``: tensors only, never code)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(root, index)
        if os.path.isfile(p):
            names = sorted(set(read_json(p)["weight_map"].values()))
            return [os.path.join(root, n) for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        p = os.path.join(root, single)
        if os.path.isfile(p):
            return [p]
    shards = sorted(glob.glob(os.path.join(root, "*.safetensors")))
    if shards:
        return shards
    raise LlavaLoadError(f"{root} holds no weights (model.safetensors, shards with an index, or pytorch_model.bin)")


def iter_tensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time, so memory holds the model plus one tensor."""
    for f in files:
        if f.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                sd = torch.load(f, map_location="cpu", weights_only=True)
            yield from sd.items()
            del sd


Mapper = Callable[[str], tuple[str | None, str | None]]  # name -> (target, reason ignored)
ROTARY = "rotary buffer, recomputed from the config"


def _strip(s: str, prefix: str) -> str:
    return s[len(prefix):] if s.startswith(prefix) else s


def map_hf(name: str) -> tuple[str | None, str | None]:
    if name.endswith("rotary_emb.inv_freq"):
        return None, ROTARY
    for p in ("model.vision_tower.", "vision_tower."):
        if name.startswith(p):
            return "encoder.model." + _strip(name[len(p):], "vision_model."), None
    for p in ("model.multi_modal_projector.", "multi_modal_projector."):
        if name.startswith(p):
            rest = name[len(p):]
            for theirs, ours in (("linear_1.", "projector.0."), ("linear_2.", "projector.2.")):
                if rest.startswith(theirs):
                    return ours + rest[len(theirs):], None
            return None, None
    for p in ("model.language_model.", "language_model.model."):
        if name.startswith(p):
            return "llm.model.model." + name[len(p):], None
    for p in ("lm_head.", "language_model.lm_head."):
        if name.startswith(p):
            return "llm.model.lm_head." + name[len(p):], None
    return None, None


def map_original(name: str) -> tuple[str | None, str | None]:
    if name.endswith("rotary_emb.inv_freq"):
        return None, ROTARY
    if name.startswith("model.mm_projector."):
        return "projector." + name[len("model.mm_projector."):], None
    if name.startswith("model.vision_tower.vision_tower."):
        return "encoder.model." + _strip(name[len("model.vision_tower.vision_tower."):], "vision_model."), None
    if name.startswith(("model.vision_tower.", "model.vision_resampler.")):
        return None, None
    if name.startswith(("model.", "lm_head.")):
        return "llm.model." + name, None
    return None, None


VISION_TOP = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")


def map_vision_dir(name: str) -> tuple[str | None, str | None]:
    if name.startswith("vision_model."):
        return "encoder.model." + name[len("vision_model."):], None
    if name.startswith(("text_model.", "text_projection", "visual_projection", "logit_scale", "logit_bias")):
        return None, "CLIP text tower / contrastive projection, not part of the vision tower"
    if name.startswith(VISION_TOP):
        return "encoder.model." + name, None
    return None, None


def map_vtc(name: str) -> tuple[str | None, str | None]:
    return name, None


def _fit(target: str, names) -> str:
    """Our name for ``target`` whichever way this transformers version nests the vision model."""
    if target in names or not target.startswith("encoder.model."):
        return target
    alt = "encoder.model.vision_model." + target[len("encoder.model."):]
    return alt if alt in names else target


def load_weights(model: LMM, sources: list[tuple[str, list[str], Mapper]], report: LoadReport) -> LoadReport:
    """Copy every mapped tensor into ``model`` (shape-checked), account for all the others."""
    sd = model.state_dict(keep_vars=True)
    canonical: dict[str, str] = {}
    first: dict[int, str] = {}
    for n, t in sd.items():  # tied weights (lm_head = embed_tokens) count once
        canonical[n] = first.setdefault(id(t), n)
    filled: dict[str, str] = {}
    owns = model.compressor.owns_projection
    overridden = 0
    for label, files, mapper in sources:
        for name, tensor in iter_tensors(files):
            target, why = mapper(name)
            if target is None:
                report.ignore(name, why) if why else report.unexpected.append(name)
                continue
            if target.startswith("projector.") and owns:
                report.ignore(name, f"{type(model.compressor).__name__} is the projector")
                continue
            target = _fit(target, sd)
            if target not in sd:
                report.unexpected.append(name)
                continue
            dest = sd[target]
            if tuple(tensor.shape) != tuple(dest.shape):
                report.mismatched.append(f"{name} {tuple(tensor.shape)} vs {target} {tuple(dest.shape)}")
                continue
            with torch.no_grad():
                dest.data.copy_(tensor.to(dest.dtype))
            key = canonical[target]
            if key in filled and filled[key] != label:
                overridden += 1
            filled[key] = label
            report.loaded += 1
    if overridden:
        report.notes.append(f"{overridden} tensors of an earlier source replaced by a later one (e.g. a vision "
                            "tower fine-tuned inside the LLaVA checkpoint)")
    for n in sorted(set(canonical.values()) - set(filled)):
        (report.new if n.startswith("compressor.") else report.missing).append(n)
    return report


def weight_sources(spec: LlavaSpec) -> list[tuple[str, list[str], Mapper]]:
    """(label, files, mapper) of each source in load order: a later source replaces what an
    earlier one loaded (a vision tower fine-tuned inside an original-LLaVA checkpoint)."""
    if spec.format == "hf":
        return [("llava-hf", checkpoint_files(spec.root), map_hf)]
    if spec.format == "llava":
        return [("vision tower", checkpoint_files(spec.vision_dir), map_vision_dir),
                ("llava", checkpoint_files(spec.root), map_original)]
    return [("vtc", checkpoint_files(spec.root), map_vtc)]
