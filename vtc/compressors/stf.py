"""LLaVA-STF's Spatial Token Fusion (STF): fuse each k x k window of patch tokens into one token.

Paper: Tang et al., "Learning Compact Vision Tokens for Efficient Large Multimodal Models"
(LLaVA-STF), arXiv 2506.07138, Sec. 3.2 (STF) and the released code (``split_image_features``
and ``build_vision_projector`` in github.com/visresearch/LLaVA-STF).

The H x W grid of patch features x[r, c] ∈ R^C (CLIP-L/14-336, layer −2, CLS dropped: 24 x 24,
C = 1024) is cut into non-overlapping k x k windows (k = 2). The window (i, j) becomes one token

    z[i, j] = concat over channels of x[k·i + a, k·j + b],  a, b < k        (k²·C channels)
    y[i, j] = W_2 · GELU(W_1 · z[i, j] + b_1) + b_2                          (d_llm channels)

so 576 -> 144 tokens. The MLP is the projector (``owns_projection``): 4096 -> 16384 -> 4096 for
CLIP-L and Vicuna-7B. Tokens leave in raster order of the windows.

Channel layout of z (documented, and tested against an explicit loop): the released code
unfolds the grid with ``Tensor.unfold`` and flattens ``[C, k, k]``, so the layout is
channel-major, window offsets fastest:

    z[c·k² + a·k + b] = x[k·i + a, k·j + b][c]

i.e. for k = 2 each channel c contributes its four window values in row-major window order
(0,0), (0,1), (1,0), (1,1). We follow it so that released LLaVA-STF projector weights load
unchanged; any other fixed order is the same model up to a permutation of W_1's columns.

Hidden width: the released code uses ``mm_hidden_size * 16`` = 4·k²·C (16384 for C = 1024, which
for Vicuna-7B equals 4·d_llm as the paper's 4096 -> 16384 -> 4096 reads); ``hidden`` overrides.

No run-time knob: k is fixed by the trained parameters, and the method cannot be switched off by a
curriculum stage. Position ids: the fused tokens are ordinary consecutive visual tokens (the
LLaVA convention, positions 0..len-1 of the spliced sequence).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from vtc.compressors.base import PreLLMCompressor
from vtc.errors import ConfigError


def fuse_windows(features: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """[B, H·W, C] raster-order tokens -> [B, (H/k)·(W/k), C·k²], layout ``c·k² + a·k + b``."""
    B, N, C = features.shape
    H, W = grid
    k = window
    x = features.reshape(B, H // k, k, W // k, k, C)  # B, i, a, j, b, C
    x = x.permute(0, 1, 3, 5, 2, 4)  # B, i, j, C, a, b
    return x.reshape(B, (H // k) * (W // k), C * k * k)


class SpatialTokenFusion(PreLLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ()
    owns_projection: ClassVar[bool] = True

    def __init__(self, window: int = 2, hidden: int | None = None):
        super().__init__()
        self.window = window
        self.hidden = hidden
        self.mlp: nn.Module | None = None

    def check(self, encoder, llm_layers: int) -> None:
        k = self.window
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError("compressor.window", f"must be a positive integer, got {k!r}")
        if encoder.grid % k:
            divisors = [d for d in range(1, encoder.grid + 1) if encoder.grid % d == 0]
            raise ConfigError(
                "compressor.window",
                f"{k} does not divide the {encoder.grid}x{encoder.grid} patch grid "
                f"({encoder.image_size}px / {encoder.patch_size}px patches); choose one of {divisors}",
            )
        if self.hidden is not None and (not isinstance(self.hidden, int) or self.hidden < 1):
            raise ConfigError("compressor.hidden", f"must be a positive integer or null, got {self.hidden!r}")

    def fused_dim(self, encoder) -> int:
        return encoder.hidden_size * self.window * self.window

    def setup(self, encoder, llm_hidden: int) -> None:
        k_in = self.fused_dim(encoder)
        hid = self.hidden or 4 * k_in
        self.mlp = nn.Sequential(nn.Linear(k_in, hid), nn.GELU(), nn.Linear(hid, llm_hidden))

    def tokens_out(self, n: int) -> int:
        return n // (self.window * self.window)

    def describe(self) -> str:
        return f"{type(self).__name__}(window={self.window})"

    @staticmethod
    def _grid(features: torch.Tensor, enc) -> tuple[int, int]:
        grid = getattr(enc, "grid", None) if enc is not None else None
        if grid is not None:
            return tuple(grid)
        side = math.isqrt(features.shape[1])
        if side * side != features.shape[1]:
            raise ValueError(f"{features.shape[1]} tokens are not a square grid and no grid was given")
        return side, side

    def forward(self, features: torch.Tensor, enc=None) -> torch.Tensor:
        if self.mlp is None:
            raise RuntimeError(f"{type(self).__name__}.setup() was not called: the fusion MLP does not exist yet")
        z = fuse_windows(features, self._grid(features, enc), self.window)
        return self.mlp(z.to(self.mlp[0].weight.dtype))
