"""Image downsampling: the encoder sees a smaller image, so it makes fewer patch tokens.

The sanity baseline of VTC-Bench (Liao et al., "Are We Using the Right Benchmark: An Evaluation
Framework for Visual Token Compression Methods", arXiv 2510.07143): plain image downsampling
beats many token-compression methods on the common benchmarks. Nothing is scored or merged: the
image is resized before the vision tower, and every later stage (tower, projector, LLM) runs on
``grid x grid`` patches instead of the full ``G x G``. Unlike every other method here it also
makes the vision tower cheaper, which the FLOPs count (``encoder_tokens``).

Rule: the ``[B, 3, S, S]`` pixels (S = G·p, patch p) are resized to ``grid·p`` pixels a side by
bilinear interpolation with antialiasing (a low-pass filter before subsampling, as PIL's resize
does; without it a 2x reduction aliases the digit strokes). VTC-Bench runs models that take any
resolution natively (Qwen2-VL); CLIP's tower has one learned position embedding per patch of its
G x G grid, so a smaller image reads those embeddings bicubically interpolated to ``grid x grid``
(transformers' ``interpolate_pos_encoding``, the standard way to run a ViT at another size).

Site ``image`` (before the encoder). It composes with the sites after it (a pre-LLM method then
sees the ``grid x grid`` patch grid; an in-LLM one its tokens); not with ToMe, whose merge
schedule is fixed for the tower's full grid. Knob ``grid``; a ``keep:`` budget maps onto the
nearest square (``round(sqrt(tokens))`` a side). Parameter-free: it trains and it can be applied
to an uncompressed checkpoint at test time.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtc.compressors.base import Compressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


def downsample_pixels(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """[N, 3, S, S] -> [N, 3, size, size], bilinear with antialiasing (identity at the same size)."""
    if pixel_values.shape[-1] == size and pixel_values.shape[-2] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Downsample(Compressor):
    site: ClassVar[str] = "image"
    knobs: ClassVar[tuple[str, ...]] = ("grid",)

    def __init__(self, grid: int = 12):
        super().__init__()
        self.grid = grid
        self._info: EncoderInfo | None = None

    # -- configuration ---------------------------------------------------------------------------
    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        g, full = self.grid, encoder.grid
        if isinstance(g, bool) or not isinstance(g, int) or not 1 <= g <= full:
            raise ConfigError("compressor.grid", f"the patch grid side after downsampling must be an integer in "
                              f"1..{full} (the {full}x{full} grid of {encoder.image_size} px images), got {g!r}")

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self._info = encoder

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        return {"grid": max(1, min(encoder.grid, round(math.sqrt(max(1, tokens)))))}

    def shrunk(self, encoder: EncoderInfo) -> EncoderInfo:
        """The geometry the later sites see: a ``grid·p`` px image of ``grid x grid`` patches."""
        if not self.enabled:
            return encoder
        return replace(encoder, image_size=self.grid * encoder.patch_size)

    # -- counting --------------------------------------------------------------------------------
    def tokens_out(self, n: int) -> int:
        return self.grid * self.grid if self.enabled else n

    def encoder_tokens(self, n: int) -> list[tuple[int, int]] | None:
        """Every run block sees the CLS token plus ``grid²`` patches."""
        if not self.enabled or self._info is None:
            return None
        info = self._info
        t = self.grid * self.grid + (1 if info.has_cls else 0)
        return [(t, t)] * info.layer_index(info.select_layer)

    # -- the operator ----------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
        if not self.enabled:
            return pixel_values
        return downsample_pixels(pixel_values, self.grid * patch_size)
