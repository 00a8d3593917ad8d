"""LLaVA-STF with Multi-Block Token Fusion (MBTF) before Spatial Token Fusion (STF).

Paper: Tang et al., "Learning Compact Vision Tokens for Efficient Large Multimodal Models"
(LLaVA-STF), arXiv 2506.07138, Sec. 3.3 (MBTF) and the released code (``feature_select``,
``encode_images`` and ``build_vision_projector_crosslayer`` in github.com/visresearch/LLaVA-STF).

Per patch token, the outputs of eight vision blocks are concatenated along channels, in this
order, and fused by an MLP back to the encoder width C:

    f = concat(h_sel, h_21, h_18, h_15, h_12, h_9, h_6, h_3)                  (8·C channels)
    x = W_2 · GELU(W_1 · f + b_1) + b_2,   8C -> 4C -> C                     (8192 -> 4096 -> 1024)

where h_i is hidden state i in the HF convention (index 0 = embeddings, index i = output of
block i; CLS dropped) and h_sel the selected layer (LLaVA's −2, i.e. index 23 of CLIP-L's 24
blocks). Then STF (``vtc.compressors.stf``) fuses each 2 x 2 window and projects to the LLM:
576 -> 144 tokens. Both MLPs are trained; the encoder stays frozen.

Smaller encoders. The block indices are written for a 24-block CLIP-L; for an encoder of depth L
each is scaled as ``round(i · L / 24)`` (Python's round, halves to even, as the curriculum
scales LLM layers), then clamped to [1, selected index] so no extra block is run past the
selected layer and the embedding output is never used. Duplicates are kept (the fusion input is
always 8·C wide). For CLIP-L the rule is the identity. The instance attribute ``extra_layers``
(read by ``LMM.encode_images``) is set in ``setup()`` once the depth is known.

Position ids and counting: as STF (144 consecutive visual tokens for LLaVA-1.5).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from vtc.compressors.stf import SpatialTokenFusion
from vtc.cost.macs import FLOPS_PER_MAC, projector_macs
from vtc.errors import ConfigError

REFERENCE_BLOCKS: tuple[int, ...] = (21, 18, 15, 12, 9, 6, 3)
REFERENCE_DEPTH = 24


def scaled_blocks(depth: int, selected: int, blocks=REFERENCE_BLOCKS, reference_depth: int = REFERENCE_DEPTH) -> tuple[int, ...]:
    """Hidden-state indices of ``blocks`` (written for ``reference_depth``) for an encoder of
    ``depth`` blocks whose selected hidden state is ``selected`` (a non-negative index)."""
    return tuple(min(max(round(i * depth / reference_depth), 1), selected) for i in blocks)


class STFMultiBlock(SpatialTokenFusion):
    owns_projection: ClassVar[bool] = True

    def __init__(self, window: int = 2, hidden: int | None = None, blocks=REFERENCE_BLOCKS,
                 reference_depth: int = REFERENCE_DEPTH):
        super().__init__(window, hidden)
        self.blocks = tuple(int(b) for b in blocks)
        self.reference_depth = reference_depth
        self.fusion: nn.Module | None = None

    def check(self, encoder, llm_layers: int) -> None:
        super().check(encoder, llm_layers)
        bad = [b for b in self.blocks if not 1 <= b <= self.reference_depth]
        if not self.blocks or bad:
            raise ConfigError(
                "compressor.blocks",
                f"block indices must lie in 1..{self.reference_depth} (reference_depth), got {list(self.blocks)}",
            )

    def setup(self, encoder, llm_hidden: int) -> None:
        sel = encoder.layer_index(encoder.select_layer)
        self.extra_layers = scaled_blocks(encoder.num_layers, sel, self.blocks, self.reference_depth)
        C = encoder.hidden_size
        n_in = (1 + len(self.blocks)) * C
        # Built before the STF MLP so the parameters are listed in data-flow order.
        self.fusion = nn.Sequential(nn.Linear(n_in, 4 * C), nn.GELU(), nn.Linear(4 * C, C))
        super().setup(encoder, llm_hidden)

    def describe(self) -> str:
        return f"{type(self).__name__}(window={self.window}, blocks={list(self.__dict__.get('extra_layers', self.blocks))})"

    def gather(self, features: torch.Tensor, enc) -> torch.Tensor:
        """[B, N, (1 + #blocks)·C]: the selected layer, then the extra blocks in their order."""
        n = features.shape[1]
        parts = [features]
        for i in self.extra_layers:
            h = enc.hidden_states[i]
            parts.append(h[:, h.shape[1] - n:])  # drop CLS / prefix tokens
        return torch.cat(parts, dim=-1)

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:
        if self.fusion is None:
            raise RuntimeError("STFMultiBlock.setup() was not called: the fusion MLP does not exist yet")
        f = self.gather(features, enc)
        x = self.fusion(f.to(self.fusion[0].weight.dtype))
        return super().forward(x, enc)

    def own_flops(self, n: int) -> float:
        """The per-token fusion MLP (8C -> 4C -> C) runs on all n patch tokens before STF."""
        if self.fusion is None:
            return 0.0

        dims = [self.fusion[0].in_features, self.fusion[0].out_features, self.fusion[2].out_features]
        return float(FLOPS_PER_MAC * projector_macs(n, dims))
