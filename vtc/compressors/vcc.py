"""LLaVolta's visual context compressor (VCC): 1-D average pooling of the visual tokens inside the LLM.

Paper: Chen et al., "Efficient Large Multi-modal Models via Visual Context Compression"
(LLaVolta), arXiv 2406.20092, Sec. 3.2 and the released code (``visual_avg_pool1d`` in
``llava/model/language_model/llava_llama.py``).

Before LLM decoder layer K, each sample's visual tokens v_1..v_L (raster order) are replaced by
non-overlapping window means with kernel = stride = S:

    v'_j = 1/S · Σ_{t=0}^{S-1} v_{S·j + t},        j = 0 .. floor(L/S) − 1

K = 0 pools the input embeddings (before layer 0). The compressor is parameter-free; text tokens
are never pooled. Layers < K see L visual tokens, layers ≥ K see floor(L/S), so over N layers

    CR = N·L / ((N−K)·L/S + K·L)                         (their compression ratio; 5.57 at
                                                         N=32, K=2, S=8)

Position ids (their policy, followed here): the pooled token's position is the mean of its
window's positions, truncated to an integer (``avg_pool1d`` over the position ids, then cast to
the integer dtype). Text tokens keep their original positions, so the positions after the image
keep the gap the pooling leaves. We compute the mean exactly in integer arithmetic (window sum
floor-divided by S, the same as truncation for non-negative positions); their code averages in
float16, which is exact only below position 2048.

Remainder: like ``F.avg_pool1d`` (``ceil_mode=False``) in their code, when L is not divisible by
S the trailing L mod S visual tokens are dropped (576 is divisible by 2, 4, 8, 16).

Knobs for a curriculum: ``layer`` (K) and ``stride`` (S). ``stride=1`` or ``layer=None`` means
no compression (their uncompressed last stage); the config default (K=2, S=8) is the first stage
of their schedules.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vtc.compressors.base import LLMCompressor
from vtc.errors import ConfigError
from vtc.model.sequence import LayerContext, SeqState


def pool_visual(hidden: torch.Tensor, positions: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's visual span: hidden [L, d], positions [L] -> ([L//S, d], [L//S]).

    Window means with kernel = stride = S; the trailing L mod S tokens are dropped. Positions:
    floor of the window mean (exact, integer arithmetic)."""
    n, d = hidden.shape
    m = n // stride
    h = hidden[: m * stride].reshape(m, stride, d).mean(1)
    p = positions[: m * stride].reshape(m, stride).sum(1).div(stride, rounding_mode="floor")
    return h, p


class VisualContextCompressor(LLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ("layer", "stride")

    def __init__(self, layer: int | None = 2, stride: int = 8):
        super().__init__(layer)
        self.stride = stride

    # -- configuration ---------------------------------------------------------------------------
    def check(self, encoder, llm_layers: int) -> None:
        s = self.stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError("compressor.stride", f"must be a positive integer, got {s!r}")
        super().check(encoder, llm_layers)
        if self.layer is None:
            return
        if encoder is not None and s > encoder.num_patches:
            raise ConfigError(
                "compressor.stride",
                f"{s} is larger than the {encoder.num_patches} visual tokens: nothing would be left",
            )

    def compressing(self) -> bool:
        return super().compressing() and self.stride > 1

    def budget_knobs(self, tokens: int, n: int, encoder) -> dict:
        """Stride S = round(n / tokens) (n // S tokens left), at the configured layer."""
        return {"stride": max(1, round(n / tokens))}

    # -- counting --------------------------------------------------------------------------------
    def kept(self, n: int) -> int:
        return n // self.stride  # the remainder n mod S is dropped, as avg_pool1d does

    def describe(self) -> str:
        if not self.compressing():
            return "VisualContextCompressor(off)"
        return super().describe()

    # -- the operator ----------------------------------------------------------------------------
    def compress(self, state: SeqState, at: LayerContext) -> SeqState:
        if self.stride <= 1:
            return state
        visual, positions = [], []
        real = state.attention_mask.bool()
        for b in range(state.hidden.shape[0]):
            vis = state.visual_mask[b] & real[b]
            h, p = pool_visual(state.hidden[b][vis], state.position_ids[b][vis], self.stride)
            visual.append(h)
            positions.append(p)
        return state.replace_visual(visual, positions)
