"""Random pruning: keep ``keep`` of an image's patch tokens chosen at random (the sanity baseline).

The benchmarks of the field (UniPruneBench, arXiv 2511.02650; VTC-Bench, arXiv 2510.07143) report
that dropping visual tokens at random is a strong baseline that many scoring methods fail to beat;
a method that does not beat it at the same budget has not shown that its scores matter.

Rule: of the N patch tokens of an image (or of a video frame), a subset of ``keep`` positions is
kept, in raster order (the order the LLM sees them in, as every pre-LLM method here keeps it):

- training: a fresh subset per image and step, drawn from torch's random stream (seeded by the
  run's ``seed``), so over a run every token is seen, as dropout does;
- evaluation: one subset drawn from ``torch.Generator().manual_seed(seed)``, the same positions
  for every image, so an eval run repeats exactly and a batch equals each sample run alone. Other
  draws are other ``compressor.seed`` values: report a mean over seeds, as for any random baseline.

Parameter-free and training-free; ``keep`` is its knob (schedules set it, and ``keep:`` budgets map
onto it directly). Cost: nothing beyond the kept tokens (no scoring pass).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vtc.compressors.base import PreLLMCompressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


def fixed_subset(n: int, keep: int, seed: int) -> torch.Tensor:
    """``keep`` of ``range(n)``, sorted, drawn by a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:keep].sort().values


class RandomPrune(PreLLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ("keep",)

    def __init__(self, keep: int = 64, seed: int = 0):
        super().__init__()
        self.keep = keep
        self.seed = seed

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        k, n = self.keep, encoder.num_patches
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError("compressor.keep", f"tokens kept per image must be an integer in 1..{n} (the "
                              f"{encoder.grid}x{encoder.grid} patch grid), got {k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError("compressor.seed", f"must be an integer, got {self.seed!r}")

    def tokens_out(self, n: int) -> int:
        return min(self.keep, n) if self.enabled else n

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        return {"keep": max(1, min(int(tokens), n))}

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:
        B, N, _ = features.shape
        k = min(self.keep, N)
        if not self.enabled or k == N:
            return features
        if self.training:
            idx = torch.rand(B, N, device=features.device).argsort(dim=1)[:, :k].sort(dim=1).values
            return features.gather(1, idx[..., None].expand(-1, -1, features.shape[-1]))
        return features[:, fixed_subset(N, k, self.seed).to(features.device)]
