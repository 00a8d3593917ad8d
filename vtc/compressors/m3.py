"""Matryoshka Multimodal Models (M3): nested 2-D average pooling, trained at every scale at once.

Paper: Cai et al., "Matryoshka Multimodal Models", arXiv 2405.17430 (ICLR 2025), Sec. 3.
The patch grid (24 x 24 for CLIP-L/14-336) is average-pooled to a nested set of grids,
    X_{S_i} = AvgPool2d_{s_i}(X),   s_i = 24 / side_i,   sides {24, 12, 6, 3, 1}
i.e. token counts {576, 144, 36, 9, 1}; each coarser scale is the average of the finer one's
windows, so the scales nest. Training averages the language-modelling loss over all scales,
    L = 1/M · Σ_i L_LM(X_{S_i}),
(``training_variants`` returns one knob setting per scale; ``LMM.forward`` runs them and
averages), and at test time one scale is chosen with the knob ``tokens`` (their
``matryoshka_vis_token_scale``). Parameter-free: the projector and the LLM learn to read every
scale. Tokens stay in raster order.

Scales for other grids (``scales: null``): sides {g, ⌊g/2⌋, ⌊g/4⌋, ⌊g/8⌋, 1} (the paper's
strides 1, 2, 4, 8 and the single global token), zeros and duplicates dropped: 24 -> 24/12/6/3/1
(the paper's), 8 -> 8/4/2/1, 4 -> 4/2/1, 27 (SigLIP-384) -> 27/13/6/3/1. A side that divides
the grid is exact ``pool_grid`` (non-overlapping windows); one that does not (13 of 27) uses
``adaptive_avg_pool2d`` (windows ⌊i·g/s⌋..⌈(i+1)·g/s⌉, slightly overlapping). ``scales`` may
also list token counts explicitly (perfect squares, side <= g).

Where it pools (``pool_at``). Their released code (matryoshka-mm, ``llava_arch.py``,
``encode_images``) runs the projector on all 576 CLIP tokens and average-pools the projected
tokens; with the projector's GELU between its two linears, pooling before or after it gives other
values, so only ``projected`` can evaluate their released checkpoints:
 - ``projected`` (default): pool the projector's output (the projector runs on every patch; that
   extra cost, the projector on the ``n − tokens`` patches the LLM never sees, is ``own_flops``);
 - ``features``: pool the CLIP features before the projector (vtc's earlier rule, a multi-scale
   pooling baseline with a cheaper projector), kept as a named option.

Knob ``tokens``: the scale used outside training; ``null`` = the full grid (M3's 576, the
uncompressed model). A curriculum may set it per stage.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtc.compressors.base import PreLLMCompressor
from vtc.compressors.pool import pool_grid
from vtc.cost.macs import projector_macs
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

PAPER_SCALES = (576, 144, 36, 9, 1)
POOL_AT = ("projected", "features")


def default_sides(grid: int) -> list[int]:
    sides = []
    for s in (grid, grid // 2, grid // 4, grid // 8, 1):
        if s >= 1 and s not in sides:
            sides.append(s)
    return sides


def pool_to(features: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """[B, H·W, C] raster tokens -> [B, side², C]: exact s x s windows when side divides the grid,
    adaptive average pooling otherwise."""
    h, w = grid
    if side == h and side == w:
        return features
    if h == w and h % side == 0:
        return pool_grid(features, grid, h // side)
    b, n, c = features.shape
    x = features.transpose(1, 2).reshape(b, c, h, w)
    return F.adaptive_avg_pool2d(x, side).flatten(2).transpose(1, 2)


class Matryoshka(PreLLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ("tokens",)

    def __init__(self, tokens: int | None = None, scales=None, pool_at: str = "projected"):
        super().__init__()
        self.tokens = tokens
        self.pool_at = pool_at
        self.after_projector = pool_at == "projected"
        self.scales = None if scales is None else [int(t) for t in scales]
        self._grid: int | None = None

    def resolve_scales(self, grid: int) -> list[int]:
        """Token counts of the nested scales, largest first."""
        if self.scales is None:
            return [s * s for s in default_sides(grid)]
        return sorted(set(self.scales), reverse=True)

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        if self.pool_at not in POOL_AT:
            raise ConfigError("compressor.pool_at", f"must be one of {list(POOL_AT)} (projected: their released code, "
                              f"pooling the projector's output; features: the CLIP features), got {self.pool_at!r}")
        g = encoder.grid
        scales = self.resolve_scales(g)
        for t in scales:
            side = math.isqrt(t)
            if t < 1 or side * side != t or side > g:
                raise ConfigError("compressor.scales", f"{t} is not a square token count of at most {g}x{g}; "
                                  f"e.g. {[s * s for s in default_sides(g)]}")
        if self.tokens is not None and self.tokens not in scales:
            raise ConfigError("compressor.tokens", f"{self.tokens} is not one of the trained scales {scales} "
                              f"(the {g}x{g} grid)")

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self._grid = encoder.grid

    @property
    def trained_scales(self) -> list[int]:
        if self._grid is None:
            raise RuntimeError("Matryoshka needs setup() (done by LMM) to know the grid")
        return self.resolve_scales(self._grid)

    def training_variants(self) -> list[dict]:
        if not self.enabled:
            return []
        return [{"tokens": t} for t in self.trained_scales]

    def tokens_out(self, n: int) -> int:
        return n if self.tokens is None else self.tokens

    def own_flops(self, n: int) -> float:
        """Pooling after the projector: the projector's FLOPs on the ``n − tokens`` patches pooled
        away, which the accounting (projector on the tokens entering the LLM) does not see."""
        if not self.after_projector or self.tokens is None or not self.projector_dims:
            return 0.0
        return 2.0 * projector_macs(n - self.tokens_out(n), self.projector_dims)

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        raise ConfigError("schedule", "M3 trains every nested scale in every step, so a stage cannot change what it "
                          "trains; its `tokens` knob picks the scale used at test time (eval.py compressor.tokens=...)")

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:
        if self.tokens is None:
            return features
        return pool_to(features, enc.grid, math.isqrt(self.tokens))
