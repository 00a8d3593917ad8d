"""Temporal pooling: a video's adjacent frames averaged, token by token, with a stride in time.

After the per-frame pipeline (encoder, any pre-LLM compressor, projector) a video item is
``[T, V, d]``: T frames of V tokens each. With stride s, frames are cut into consecutive windows
of s (the last window may be shorter) and each window is replaced by its mean:

    f'_j = 1/|W_j| · Σ_{t ∈ W_j} f_t,     W_j = {s·j, ..., min(s·j + s, T) − 1},   j = 0 .. ceil(T/s) − 1

so token v of f'_j is the mean of token v over the window's frames: spatial layout is kept and
the video enters the LLM as ceil(T/s) frames of V tokens. A short last window is averaged over the
frames it has rather than dropped, so a video never loses its end (LLaVolta's 1-D pooling drops a
remainder instead; here the remainder is a whole frame of content). Images (T = 1) pass unchanged.

``reduce="first"`` keeps each window's first frame instead of the mean (f'_j = f_{s·j}): frame
subsampling, what sampling ceil(T/s) frames from the video would give, and with ``stride >= T`` a
one-frame model (the baseline a video benchmark must beat).

It runs at its own site (``temporal``), between the per-frame pre-LLM site and the LLM, so it
composes with any spatial compressor (``compressor=pool_temporal``: pool 2x2 per frame, then stride 2
in time) and, being parameter-free with a ``stride`` knob, with schedules (``knobs: {stride: 4}``;
``keep: f`` maps to stride round(1/f)). It needs the same token count in every frame, so it
refuses a pre-LLM method whose count depends on the frame (PruMerge+).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vtc.compressors.base import Compressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


REDUCE = ("mean", "first")


def pool_frames(frames: torch.Tensor, stride: int, reduce: str = "mean") -> torch.Tensor:
    """[T, V, d] -> [ceil(T/stride), V, d]: means of consecutive windows of ``stride`` frames, the
    last window over the frames left (``reduce="first"``: each window's first frame)."""
    T = frames.shape[0]
    if stride <= 1 or T <= 1:
        return frames
    if reduce == "first":
        return frames[::stride]
    full = T // stride
    out = [frames[: full * stride].reshape(full, stride, *frames.shape[1:]).mean(1)] if full else []
    if T % stride:
        out.append(frames[full * stride:].mean(0, keepdim=True))
    return torch.cat(out)


class TemporalPool(Compressor):
    site: ClassVar[str] = "temporal"
    knobs: ClassVar[tuple[str, ...]] = ("stride",)

    def __init__(self, stride: int = 2, reduce: str = "mean"):
        super().__init__()
        self.stride = stride
        self.reduce = reduce

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        s = self.stride
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError("compressor.stride", f"must be a positive integer (frames per window), got {s!r}")
        if self.reduce not in REDUCE:
            raise ConfigError("compressor.reduce", f"{self.reduce!r} is not one of {REDUCE} (mean: average a window's "
                              "frames; first: keep its first frame)")

    def compressing(self) -> bool:
        return self.enabled and self.stride > 1

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        """Stride round(n / tokens): a video keeps about that share of its frames' tokens (an image,
        one frame, keeps all of them)."""
        return {"stride": max(1, round(n / tokens))}

    def frames_out(self, frames: int) -> int:
        return -(-frames // self.stride) if self.compressing() else frames

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return pool_frames(frames, self.stride, self.reduce) if self.compressing() else frames

    def describe(self) -> str:
        if not self.compressing():
            return "TemporalPool(off)"
        extra = "" if self.reduce == "mean" else f", reduce={self.reduce}"
        return f"TemporalPool(stride={self.stride}{extra})"
