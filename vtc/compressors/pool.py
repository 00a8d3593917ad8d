"""2-D average pooling of the patch grid (the strong, cheap baseline).

Non-overlapping ``stride x stride`` windows of the encoder's patch grid are averaged:
    y[i, j] = 1/s² · Σ_{a<s, b<s} x[s·i + a, s·j + b]
so a 24x24 grid becomes 12x12 (576 -> 144 tokens) at stride 2. It is the retrained baseline in
LLaVA-STF (Table 1, "2x2 avg-pool") and the operator M3 (Cai et al., 2024, "Matryoshka
Multimodal Models") nests over scales. Parameter-free; tokens stay in raster order.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from vtc.compressors.base import PreLLMCompressor
from vtc.errors import ConfigError


def pool_grid(features: torch.Tensor, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """[B, H·W, C] raster-order tokens -> [B, (H/s)·(W/s), C] by s x s average pooling."""
    b, n, c = features.shape
    h, w = grid
    x = features.transpose(1, 2).reshape(b, c, h, w)
    x = F.avg_pool2d(x, kernel_size=stride, stride=stride)
    return x.flatten(2).transpose(1, 2)


class AvgPool2d(PreLLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ("stride",)

    def __init__(self, stride: int = 2):
        super().__init__()
        self.stride = stride

    def check(self, encoder, llm_layers: int) -> None:
        s = self.stride
        if not isinstance(s, int) or s < 1:
            raise ConfigError("compressor.stride", f"must be a positive integer, got {s!r}")
        if encoder.grid % s:
            divisors = [d for d in range(1, encoder.grid + 1) if encoder.grid % d == 0]
            raise ConfigError(
                "compressor.stride",
                f"{s} does not divide the {encoder.grid}x{encoder.grid} patch grid "
                f"({encoder.image_size}px / {encoder.patch_size}px patches); choose one of {divisors}",
            )

    def tokens_out(self, n: int) -> int:
        return n // (self.stride * self.stride)

    def budget_knobs(self, tokens: int, n: int, encoder) -> dict:
        """The stride dividing the grid whose count (g/s)² is nearest ``tokens`` in log scale;
        a tie keeps more tokens."""
        import math

        g = encoder.grid
        strides = [s for s in range(1, g + 1) if g % s == 0]
        return {"stride": min(strides, key=lambda s: (abs(math.log((g // s) ** 2 / tokens)), s))}

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:
        if self.stride == 1:
            return features
        return pool_grid(features, enc.grid, self.stride)
