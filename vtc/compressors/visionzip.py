"""VisionZip: dominant tokens by CLS attention plus contextual tokens merged by key similarity.

Paper: Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
arXiv 2412.04467 (CVPR 2025), Sec. 4.1 (dominant token selection), Sec. 4.2 (contextual token
merging), and the released code (github.com/dvlab-research/VisionZip, ``visionzip/main.py``,
``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``, ``visionzip/utils.py``).

With h the selected layer's hidden states (LLaVA: layer −2, CLS included) and the attention of
the block that produced them (``attentions[-2]`` in the released code):

1. Dominant. s_j = Σ_heads softmax(q_cls · k_hᵀ/√d)_j over the N patches (the CLS row only,
   recomputed with ``VisionEncoder.query_attention``; summing or averaging over heads ranks the
   same). The released ``visionzip(model, dominant=D, contextual=C)`` passes D − 1 to the top-k
   and keeps the CLS token as well, so the D dominant tokens are [CLS, top D−1 patches], in
   their original (raster) order.
2. Contextual. The other R = N − (D − 1) patches, in raster order, with metric m_j = the same
   block's keys averaged over heads (``key_states.mean(1)``), L2-normalised. C targets are taken
   uniformly: indices 0, step, 2·step, ... (first C), step = max(1, ⌊R / C⌋). Every other
   remaining token joins its most cosine-similar target (argmax), and
       contextual_t = h_t + (1/max(1, n_t)) · Σ_{j → t} h_j
   (the target itself plus the *mean* of its members, as released).
3. Output: [dominant (CLS first, then raster order), contextual (target order)], D + C tokens.

Defaults (LLaVA-1.5, 576 patches): D + C = 64 = 54 + 10; the paper's other settings are
128 = 108 + 20 and 192 = 162 + 30 (knobs ``dominant``, ``contextual``). Training-free; when the
model is fine-tuned with VisionZip (the paper's "VisionZip‡") only the projector adapts.

The CLS token is required (``needs_cls``): SigLIP has none and is rejected in ``check``. The
attention and keys come from the block that produced the selected layer, so its input (hidden
state sel − 1) is kept through ``extra_layers``; the two recomputations (one CLS row, one k_proj)
are counted in ``own_flops``.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vtc.compressors.base import PreLLMCompressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


def target_positions(remaining: int, contextual: int, device=None) -> torch.Tensor:
    step = max(1, remaining // contextual)
    return torch.arange(0, remaining, step, device=device)[:contextual]


def contextual_merge(h: torch.Tensor, metric: torch.Tensor, contextual: int) -> torch.Tensor:
    """h [B, R, C] remaining tokens, metric [B, R, c] -> [B, contextual, C] (released rule)."""
    B, R, C = h.shape
    tgt = target_positions(R, contextual, h.device)
    other = torch.ones(R, dtype=torch.bool, device=h.device)
    other[tgt] = False
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True)
    sim = m[:, other] @ m[:, tgt].transpose(1, 2)  # [B, R − C, C]
    assign = torch.zeros_like(sim, dtype=h.dtype).scatter_(2, sim.argmax(2, keepdim=True), 1.0)
    counts = assign.sum(1).clamp(min=1)[..., None]  # [B, C, 1]
    return h[:, tgt] + assign.transpose(1, 2) @ h[:, other] / counts


class VisionZip(PreLLMCompressor):
    needs_cls: ClassVar[bool] = True
    reads_layer_weights: ClassVar[bool] = True  # CLS attention recomputed with an encoder block's q/k
    knobs: ClassVar[tuple[str, ...]] = ("dominant", "contextual")

    def __init__(self, dominant: int = 54, contextual: int = 10):
        super().__init__()
        self.dominant = dominant
        self.contextual = contextual
        self.extra_layers: tuple[int, ...] = ()
        self._width = 0

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        if not encoder.has_cls:
            raise ConfigError("compressor", "VisionZip picks dominant tokens by the CLS token's attention, and this "
                              "encoder (SigLIP) has no CLS token; use a CLIP encoder, or a method that needs no "
                              "CLS (compressor=pool, tome, m3, dart)")
        if encoder.layer_index(encoder.select_layer) < 1:
            raise ConfigError("encoder.select_layer", "VisionZip needs a transformer block's attention; the embedding output has none")
        d, c, n = self.dominant, self.contextual, encoder.num_patches
        if not isinstance(d, int) or d < 1:
            raise ConfigError("compressor.dominant", f"must be an integer >= 1 (the CLS counts as one), got {d!r}")
        if not isinstance(c, int) or c < 0:
            raise ConfigError("compressor.contextual", f"must be a non-negative integer, got {c!r}")
        if d - 1 + c > n:
            raise ConfigError("compressor.dominant", f"{d} dominant (CLS + {d - 1} patches) + {c} contextual tokens "
                              f"need more than the encoder's {n} patches")

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        """``tokens`` split between dominant and contextual as configured (54 : 10)."""
        tokens = max(2, min(tokens, n + 1))
        contextual = round(tokens * self.contextual / (self.dominant + self.contextual))
        return {"dominant": tokens - contextual, "contextual": contextual}

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self.extra_layers = (encoder.layer_index(encoder.select_layer) - 1,)
        self._width = encoder.hidden_size

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:
        encoder = enc.encoder
        info = encoder.info
        sel = info.layer_index(info.select_layer)
        h_in = enc.hidden_states[sel - 1]
        hs = enc.hidden_states[sel]  # [B, 1+N, C], CLS first
        B, T, C = hs.shape
        N = T - 1
        k = self.dominant - 1
        with torch.no_grad():
            score = encoder.query_attention(sel, h_in, 0).sum(1)[:, 1:]  # [B, N]
            metric = encoder.block_keys(sel, h_in).mean(1)[:, 1:]  # [B, N, d]
            top = torch.topk(score, k, dim=1).indices if k > 0 else score.new_zeros(B, 0, dtype=torch.long)
            chosen = torch.zeros(B, N, dtype=torch.bool, device=hs.device)
            chosen.scatter_(1, top, True)
            dom_idx = chosen.nonzero()[:, 1].view(B, k)  # raster order
            rest_idx = (~chosen).nonzero()[:, 1].view(B, N - k)
        patches = features  # == hs[:, 1:]
        dominant = torch.cat([hs[:, :1], patches.gather(1, dom_idx[..., None].expand(-1, -1, C))], dim=1)
        if self.contextual == 0:
            return dominant
        rest = patches.gather(1, rest_idx[..., None].expand(-1, -1, C))
        rest_metric = metric.gather(1, rest_idx[..., None].expand(-1, -1, metric.shape[-1]))
        return torch.cat([dominant, contextual_merge(rest, rest_metric, self.contextual)], dim=1)

    def tokens_out(self, n: int) -> int:
        return self.dominant + self.contextual

    def own_flops(self, n: int) -> float:
        """Recomputed in the selected block: k_proj twice (scores and metric) over 1+n tokens, the
        CLS q_proj and its row; the contextual similarities (head width) are negligible."""
        c = self._width
        return 2.0 * (2 * (n + 1) * c * c + c * c + (n + 1) * c)
