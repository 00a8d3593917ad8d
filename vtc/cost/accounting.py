"""Analytic cost of what a model actually ran: FLOPs of a step from its measured token counts.

Bridges ``vtc.cost.flops`` (formulas) and a built ``LMM`` (shapes, which parts train, how many visual
tokens each LLM layer saw in this batch). Convention: see ``vtc.cost.flops`` (FLOPs = 2 x MACs;
training step = 3 x forward for trainable parts; logits only where there is a target, as
``LMM.forward`` computes them).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from vtc.cost.flops import forward_flops, train_step_flops
from vtc.cost.shape import ModelShape


def linear_chain_dims(module: nn.Module) -> list[int]:
    dims: list[int] = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if not dims:
                dims.append(m.in_features)
            dims.append(m.out_features)
    return dims


def model_shape(model) -> ModelShape:
    """The ModelShape of an LMM: encoder cut at its selected layer, projector as built (a
    compressor that owns the projection, STF, contributes its MLP instead)."""
    # STF's fusion MLP is its projector (``mlp``); anything else a compressor runs is its own cost.
    pipeline = model.pipeline
    owner = next((m for m in pipeline.members() if m.owns_projection), None)
    proj = getattr(owner, "mlp", None) if owner is not None else model.projector
    proj = proj if proj is not None else model.projector
    dims = linear_chain_dims(proj) or [model.encoder.info.hidden_size, model.llm.hidden_size]
    shape = ModelShape.from_hf_configs(model.encoder.model.config, model.llm.config, projector_dims=dims)
    info = model.encoder.info
    return replace(shape, vision_layers=info.layer_index(info.select_layer))


FROZEN_MAP = {"encoder": ("vision",), "projector": ("projector",), "llm": ("llm", "lm_head")}


def batch_flops(
    shape: ModelShape,
    lengths: torch.Tensor,
    visual_in: torch.Tensor,
    seen: torch.Tensor,
    targets_per_sample: torch.Tensor | None,
    projector_tokens: torch.Tensor | None = None,
    trainable: tuple[str, ...] | None = None,
    extra_per_image: float = 0.0,
    vision_tokens_per_layer: list | None = None,
    frames_per_sample: torch.Tensor | None = None,
) -> float:
    """Sum over samples of forward (``trainable=None``) or training-step FLOPs.

    lengths [B]: LLM input length per sample; visual_in [B]: visual tokens entering the LLM;
    seen [layers, B]: visual tokens per LLM layer; targets_per_sample [B]: logit positions;
    extra_per_image: forward FLOPs a compressor adds per image (``Compressor.own_flops``),
    counted at 3x in training when the compressor trains, 1x otherwise;
    vision_tokens_per_layer: per image, what each encoder block runs on when the compressor
    shrinks the tower (``Compressor.encoder_tokens``); None: the full tower.
    frames_per_sample [B]: images and video frames each sample encodes (every one runs the
    tower and the per-image compressor); None: one for a sample with visual tokens.
    """
    frozen: tuple[str, ...] = ()
    if trainable is not None:
        frozen = tuple(c for part, comps in FROZEN_MAP.items() if part not in trainable for c in comps)
    total = 0.0
    for b in range(lengths.shape[0]):
        vis = int(visual_in[b])
        text = int(lengths[b]) - vis
        has_image = vis > 0
        frames = int(frames_per_sample[b]) if frames_per_sample is not None else int(has_image)
        fwd = forward_flops(
            shape,
            text_tokens=text,
            visual_tokens_per_layer=[int(x) for x in seen[:, b]],
            vision_tokens_per_layer=vision_tokens_per_layer if has_image else [0] * shape.vision_layers,
            projector_tokens=(int(projector_tokens[b]) if projector_tokens is not None else vis) if has_image else 0,
            lm_head_tokens=int(targets_per_sample[b]) if targets_per_sample is not None else 1,
        )
        if frames > 1:  # the tower ran once per frame; forward_flops counted one
            fwd = {**fwd, "vision": frames * fwd["vision"], "total": fwd["total"] + (frames - 1) * fwd["vision"]}
        total += train_step_flops(fwd, frozen) if trainable is not None else fwd["total"]
        if has_image and extra_per_image:
            factor = 3 if trainable is not None and "compressor" in trainable else 1
            total += factor * extra_per_image * max(frames, 1)
    return total
