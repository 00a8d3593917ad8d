"""Analytic FLOPs for LLaVA-style models with compressed visual tokens.

Pure arithmetic on shapes: no weights, no torch. Every number ``vtc.cost`` returns follows one
convention, stated here once and to be quoted wherever a number from it is reported:

* **FLOPs = 2 x MACs** (one multiply-accumulate = two floating-point operations).
* **Forward pass only.** A training step is taken as **3 x forward** for a fully trainable
  model (backward = 2 x forward: gradients w.r.t. activations and w.r.t. weights);
  :func:`train_step_flops` refines this for frozen parts (1x or 2x, see there).
* **Counted:** every matrix multiply with a weight (q/k/v/o projections, FFN, projector MLP,
  LM head) and the two attention products, scores ``Q @ K^T`` and ``P @ V``.
  Attention is counted over the full ``n x kv_len`` score matrix even when it is causal (a
  dense SDPA kernel computes all of it; flash kernels skip roughly half, which this module
  does not model).
* **Ignored:** softmax, norms, activations, residual adds, biases, rotary embeddings, the
  token embedding lookup, the ViT patch embedding (a conv: 576 x 588 x 1024 MACs for
  CLIP-L/14-336, ~0.3 GMACs), the compressors' own work (pooling, scoring) and ViT pooling
  heads. These are each below a few percent of a layer.
* Counts are **per sample** (one image, one sequence); multiply by the batch size.

Per-layer formulas: :mod:`vtc.cost.macs`. The model's shapes: :mod:`vtc.cost.shape`. The papers'
token schedules and closed forms (LLaVolta's CR, FastV): :mod:`vtc.cost.schedules`. Printing:
:mod:`vtc.cost.table`.

"Equivalent visual tokens" = the mean over LLM layers of the visual tokens each layer saw
(design.md's convention): a model that keeps ``L_after`` tokens after layer K of N has
``(K·L + (N−K)·L_after)/N``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vtc.cost.macs import (
    FLOPS_PER_MAC,
    check_nonneg,
    lm_head_macs,
    llm_layer_macs,
    projector_macs,
    vit_layer_macs,
)
from vtc.cost.shape import ModelShape

__all__ = [
    "TRAIN_STEP_MULTIPLIER",
    "forward_flops",
    "train_step_flops",
]

TRAIN_STEP_MULTIPLIER = 3
"""A training step of a fully trainable model = 3 x its forward FLOPs (forward + 2x backward)."""


def forward_flops(
    shape: ModelShape,
    text_tokens: int,
    visual_tokens_per_layer: Sequence[int],
    vision_tokens_per_layer: Sequence[int | tuple[int, int]] | None = None,
    projector_tokens: int | None = None,
    lm_head_tokens: int | None = None,
) -> dict[str, float]:
    """Forward FLOPs of one sample (one image), split by component.

    Args:
        shape: the model.
        text_tokens: non-visual tokens in the sequence (system prompt, instruction, answer,
            image markers). Never compressed.
        visual_tokens_per_layer: visual tokens that LLM layer i sees, one entry per LLM layer
            (``len == shape.llm_layers``). Layer i runs on ``text_tokens + v[i]`` tokens.
        vision_tokens_per_layer: tokens that encoder layer j runs on (prefix/CLS included),
            one entry per encoder layer run (at most ``shape.vision_layers``; fewer when the
            tower is truncated). An entry may be a pair ``(attention tokens, MLP tokens)`` for a
            layer that merges between the two (ToMe). Default: ``shape.vision_tokens`` in all
            ``shape.vision_layers`` layers (no in-encoder compression).
        projector_tokens: tokens through the projector. Default: what leaves the encoder,
            ``vision_tokens_per_layer[-1] − shape.vision_prefix`` (576 for LLaVA-1.5). A
            compressor at the "pre_llm" site that runs before the projector (2-D pooling,
            STF) must pass its output count; one that runs after the projector (LLaVolta at
            K=0) leaves the default.
        lm_head_tokens: positions whose logits are computed. Default: every position of the
            last layer, ``text_tokens + v[-1]`` (a training/eval forward that computes all
            logits). Prefill before generation needs only the last position: pass 1.

    Returns:
        ``{'vision', 'projector', 'llm', 'lm_head', 'total'}`` in FLOPs (= 2 x MACs, forward
        only), plus ``'equivalent_visual_tokens'`` (mean visual tokens over LLM layers; not a
        FLOP count).
    """
    check_nonneg(text_tokens=text_tokens, projector_tokens=projector_tokens,
                  lm_head_tokens=lm_head_tokens)
    v_llm = [int(x) for x in visual_tokens_per_layer]
    if len(v_llm) != shape.llm_layers:
        raise ValueError(
            f"visual_tokens_per_layer has {len(v_llm)} entries, the LLM has {shape.llm_layers} layers"
        )
    if any(x < 0 for x in v_llm):
        raise ValueError("visual token counts must be >= 0")

    if vision_tokens_per_layer is None:
        v_enc = [(shape.vision_tokens, shape.vision_tokens)] * shape.vision_layers
    else:
        v_enc = [(int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))
                 for x in vision_tokens_per_layer]
        if len(v_enc) > shape.vision_layers:
            raise ValueError(
                f"vision_tokens_per_layer has {len(v_enc)} entries, the encoder has "
                f"{shape.vision_layers} layers"
            )
        if any(a < 0 or b < 0 for a, b in v_enc):
            raise ValueError("vision token counts must be >= 0")

    if projector_tokens is None:
        projector_tokens = (v_enc[-1][1] if v_enc else shape.vision_tokens) - shape.vision_prefix
        projector_tokens = max(projector_tokens, 0)

    vision = FLOPS_PER_MAC * sum(vit_layer_macs(a, shape.vision_d, shape.vision_m, b) for a, b in v_enc)
    projector = FLOPS_PER_MAC * projector_macs(projector_tokens, shape.projector_dims)
    llm = FLOPS_PER_MAC * sum(
        llm_layer_macs(
            text_tokens + v,
            shape.llm_d,
            shape.llm_m,
            n_kv_heads=shape.llm_kv_heads,
            n_heads=shape.llm_heads,
            ffn=shape.llm_ffn,
            head_dim=shape.llm_head_dim,
        )
        for v in v_llm
    )
    if shape.include_lm_head:
        n_logits = (text_tokens + v_llm[-1]) if lm_head_tokens is None else lm_head_tokens
        lm_head = FLOPS_PER_MAC * lm_head_macs(n_logits, shape.llm_d, shape.vocab)
    else:
        lm_head = 0
    return {
        "vision": vision,
        "projector": projector,
        "llm": llm,
        "lm_head": lm_head,
        "total": vision + projector + llm + lm_head,
        "equivalent_visual_tokens": sum(v_llm) / len(v_llm) if v_llm else 0.0,
    }


_COMPONENTS = ("vision", "projector", "llm", "lm_head")


def train_step_flops(forward: Mapping[str, float], frozen: Sequence[str] = ()) -> float:
    """FLOPs of one training step from :func:`forward_flops`'s split.

    Convention: a trainable component costs 3x its forward (forward, gradient w.r.t. its
    input, gradient w.r.t. its weights, each ~1x). A frozen component costs 2x when some
    component before it (in the order vision → projector → llm → lm_head) is trainable
    (gradients must flow back through it), and 1x when nothing before it is trainable (no
    backward at all). The input-gradient of the first trainable component is counted too
    (a slight over-count by one projector input matmul). ``frozen=()`` gives the plain
    ``3 x forward``. LLaVA pretraining: ``frozen=('vision', 'llm', 'lm_head')``; LLaVA
    instruction tuning: ``frozen=('vision',)``.
    """
    unknown = set(frozen) - set(_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected some of {_COMPONENTS}")
    total = 0.0
    trainable_upstream = False
    for c in _COMPONENTS:
        f = forward[c]
        if c in frozen:
            total += (2 if trainable_upstream else 1) * f
        else:
            total += TRAIN_STEP_MULTIPLIER * f
            trainable_upstream = True
    return total
