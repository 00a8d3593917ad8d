"""LLaVA-PruMerge+: CLS-attention outliers plus a uniform spatial sample, then key-similarity merging.

Paper: Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
Models", arXiv 2403.15388 (ICCV 2025), Sec. 3 (Algorithm 1: adaptive selection by IQR outliers,
k-nearest-neighbour clustering, attention-weighted merging) and PruMerge+ (Sec. 3.3, spatially
uniform sampled tokens added to the outliers). The released code is followed where it is more
specific than the text: ``token_prune_merge_advanced_plus`` in
github.com/42Shawn/LLaVA-PruMerge ``llava/model/multimodal_encoder/clip_encoder.py``.

Per image, with x_j the selected-layer patch features (LLaVA: layer −2, CLS dropped), N patches:

1. CLS attention. The block that reads the selected layer (CLIP-L's last block, ``layers[23]``,
   whose q_proj/k_proj the released code hooks) gives
       a = softmax( q_cls · Kᵀ / √C )[1:],     q, K = q_proj, k_proj of LN1(h_sel)
   over all 1+N tokens, CLS's own entry dropped afterwards (not renormalised). The released code
   scores with the full-width projections (all heads concatenated, scale C^−1/2, C the encoder
   width): ``score="released"`` (default). ``score="heads"`` uses the per-head softmax averaged
   over heads (``VisionEncoder.query_attention``). Either way only the CLS row is computed. When
   the selected layer is the last block (no block reads it), the selected block's own attention
   is used instead (its input is kept through ``extra_layers``).
2. Outliers (IQR): the tokens with a_j > Q3 + 1.5·(Q3 − Q1) (quartiles of this image's N
   scores, linear interpolation as ``np.percentile``), ordered by decreasing attention; k of
   them. If there is none, the top-1 token is taken (the released code would divide by zero).
3. "+" spatial fill: step = ⌊⌊N/k⌋ / 3⌋ (≥ 1); the positions 0, step, 2·step, ... < N − 1 not
   already selected are added, in raster order (the released adaptive path:
   ``arange(0, 575, int(int(1/ratio)/3))``, 575 = N − 1). About 3·k more tokens, ~4·k in all.
4. Merge (released rule): every kept token i takes its ``knn`` = 32 most key-similar tokens among
   *all other* tokens (kept and pruned), cosine of the full-width keys K, and becomes
       y_i = x_i + Σ_{j ∈ knn(i)} a_j · x_j
   (attention weights, not renormalised: the paper's weighted average, as the released code
   computes it, with its normalisation commented out).
5. One extra token, Σ_{j pruned} a_j · x_j, is appended (released code).

Output order: the outliers by decreasing attention, then the spatial samples in raster order,
then the extra token, as the released code emits them.

Token counts differ per image, so ``forward`` returns a list of [V_i, C] tensors when they differ
(a plain [B, V, C] tensor when all are equal); ``LMM.encode_images`` projects each and the splice
takes each image's own span. The count is known only from the data: ``tokens_out(n)`` is a
nominal figure, with k = round(0.055·n) outliers (the paper's average 5.5% for LLaVA-1.5:
32 of 576) and no overlap, i.e. k + |{0, step, ...} < n−1| + 1 (129 of 576); the measured count
per image is in ``LMMOutput.visual_in``.

CLS required (``needs_cls``): SigLIP has no CLS token and is rejected in ``check``.

Parameter-free; scoring and merging are not differentiated (indices), the merged values are.
"""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from vtc.compressors.base import PreLLMCompressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

PAPER_OUTLIER_FRACTION = 32 / 576  # PruMerge's average on LLaVA-1.5 (5.5%)


def iqr_outliers(a: torch.Tensor) -> torch.Tensor:
    """Indices of ``a`` [N] above Q3 + 1.5·IQR, by decreasing value (top-1 when none)."""
    q1, q3 = torch.quantile(a.float(), torch.tensor([0.25, 0.75], device=a.device))
    k = max(1, int((a.float() > q3 + 1.5 * (q3 - q1)).sum()))
    return torch.topk(a, k).indices


def spatial_fill(n: int, selected: torch.Tensor) -> torch.Tensor:
    """PruMerge+'s uniform sample: 0, step, 2·step, ... < n − 1 minus ``selected``, step = ⌊⌊n/k⌋/3⌋."""
    k = len(selected)
    step = max(1, (n // k) // 3)
    grid = torch.arange(0, n - 1, step, device=selected.device)
    return grid[~torch.isin(grid, selected)]


def merge_kept(x: torch.Tensor, keys: torch.Tensor, a: torch.Tensor, keep: torch.Tensor, knn: int) -> torch.Tensor:
    """Released merge rule for one image: x [N, C], keys [N, Ck], a [N], keep [M] ->
    [M + 1, C]: y_i = x_i + Σ_{j∈knn(i)} a_j x_j over all other tokens, then Σ_{pruned} a_j x_j."""
    n = x.shape[0]
    kn = F.normalize(keys.float(), dim=-1)
    sim = kn[keep] @ kn.T  # [M, N]
    sim[torch.arange(len(keep), device=x.device), keep] = float("-inf")  # not itself
    nb = torch.topk(sim, min(knn, n - 1), dim=-1).indices  # [M, k]
    w = a[nb].to(x.dtype)
    kept = x[keep] + (w[..., None] * x[nb]).sum(1)
    pruned = torch.ones(n, dtype=torch.bool, device=x.device)
    pruned[keep] = False
    extra = (a[pruned].to(x.dtype)[:, None] * x[pruned]).sum(0, keepdim=True)
    return torch.cat([kept, extra])


class PruMergePlus(PreLLMCompressor):
    needs_cls: ClassVar[bool] = True
    variable_tokens: ClassVar[bool] = True
    reads_layer_weights: ClassVar[bool] = True  # CLS attention recomputed with an encoder block's q/k
    knobs: ClassVar[tuple[str, ...]] = ("knn",)

    def __init__(self, knn: int = 32, score: str = "released"):
        super().__init__()
        self.knn = knn
        self.score = score
        self.extra_layers: tuple[int, ...] = ()
        self._width = 0

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        if not encoder.has_cls:
            raise ConfigError("compressor", "PruMerge+ ranks patches by the CLS token's attention, and this encoder "
                              "(SigLIP) has no CLS token; use a CLIP encoder, or a method that needs no CLS "
                              "(compressor=pool, tome, m3, dart)")
        if self.score not in ("released", "heads"):
            raise ConfigError("compressor.score", f"must be 'released' (full-width CLS row, as their code) or 'heads' (head mean), got {self.score!r}")
        if not isinstance(self.knn, int) or self.knn < 1:
            raise ConfigError("compressor.knn", f"must be a positive integer, got {self.knn!r}")
        if encoder.layer_index(encoder.select_layer) < 1:
            raise ConfigError("encoder.select_layer", "PruMerge+ needs a transformer block's attention; the embedding output has none")

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        sel = encoder.layer_index(encoder.select_layer)
        self.extra_layers = () if sel < encoder.num_layers else (sel - 1,)
        self._width = encoder.hidden_size

    # -- scoring ----------------------------------------------------------------------------------
    def cls_attention_and_keys(self, enc) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS attention over the N patches [B, N] and full-width patch keys [B, N, C]."""
        encoder = enc.encoder
        info = encoder.info
        sel = info.layer_index(info.select_layer)
        block, h = (sel + 1, enc.hidden_states[sel]) if sel < info.num_layers else (sel, enc.hidden_states[sel - 1])
        keys = encoder.block_keys(block, h)  # [B, H, 1+N, d]
        B, H, T, d = keys.shape
        keys = keys.transpose(1, 2).reshape(B, T, H * d)
        if self.score == "heads":
            attn = encoder.query_attention(block, h, 0).mean(1)
        else:
            layer = encoder.layers[block - 1]
            q = layer.self_attn.q_proj(layer.layer_norm1(h[:, :1]))  # [B, 1, C]
            attn = ((q.float() @ keys.float().transpose(1, 2)).squeeze(1) * (H * d) ** -0.5).softmax(-1)
        return attn[:, 1:], keys[:, 1:]

    def select(self, a: torch.Tensor) -> torch.Tensor:
        """Kept indices of one image's N patches: outliers (by attention), then the spatial fill."""
        out = iqr_outliers(a)
        return torch.cat([out, spatial_fill(a.shape[0], out)])

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor | list[torch.Tensor]:
        with torch.no_grad():
            attn, keys = self.cls_attention_and_keys(enc)
        outs = [merge_kept(features[b], keys[b], attn[b], self.select(attn[b]), self.knn)
                for b in range(features.shape[0])]
        if len({len(o) for o in outs}) == 1:
            return torch.stack(outs)
        return outs

    # -- counting ---------------------------------------------------------------------------------
    def nominal_outliers(self, n: int) -> int:
        return max(1, round(PAPER_OUTLIER_FRACTION * n))

    def tokens_out(self, n: int) -> int:
        """Nominal (data-dependent in truth): k = 5.5%·n outliers + the spatial fill + 1."""
        k = self.nominal_outliers(n)
        step = max(1, (n // k) // 3)
        return k + len(range(0, n - 1, step)) + 1

    def own_flops(self, n: int) -> float:
        """The scoring block's k_proj over 1+n tokens and q_proj of the CLS (C² each), the CLS row,
        and the kept-to-all key similarities; the merge sums are negligible."""
        c = self._width
        m = self.tokens_out(n) - 1
        return 2.0 * ((n + 1) * c * c + c * c + (n + 1) * c + m * n * c)
