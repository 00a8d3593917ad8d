"""VisPruner: important tokens by the encoder's [CLS] attention, then diverse tokens by removing duplicates.

Paper: Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token
Pruning in VLMs", arXiv 2412.01818 (ICCV 2025), method section (important tokens from the visual
encoder's [CLS] attention, diverse tokens by similarity-based duplicate removal), and the released
code, followed where it is more specific than the text (github.com/Theia-4869/VisPruner:
``LlavaMetaForCausalLM.encode_images`` in ``llava/model/llava_arch.py``,
``CLIPVisionTower.feature_select`` in ``llava/model/multimodal_encoder/clip_encoder.py``,
``--important_ratio`` in ``llava/eval/*.py``).

Per image (or video frame), x_j the selected-layer patch features (LLaVA: layer −2, CLS dropped),
T = ``keep`` tokens kept, r = ``important_ratio``:

1. Important. a_j = (1/H) Σ_h softmax(q_cls · k_hᵀ/√d)_j, the [CLS] row of the block that
   produced the selected layer (``attentions[select_layer][:, :, 0, 1:]``, averaged over heads;
   CLS's own entry dropped, not renormalised). The T_imp = ⌊T·r⌋ patches of largest a_j are kept.
   vtc recomputes that one row (``VisionEncoder.query_attention``), no attention map.
2. Diverse. The other N − T_imp patches, in order of decreasing a_j, are thinned to
   T_div = T − T_imp by rounds of bipartite matching on cosine similarity (x̂ = x/‖x‖): with the
   current R tokens, A = those at even positions (⌈R/2⌉), B = odd positions; s_i = max_{b ∈ B}
   x̂_iᵀx̂_b for i ∈ A; the min(8, R − T_div) tokens of A with the largest s_i are removed, and the
   next round's order is [rest of A by decreasing s_i, B in order]. The loop stops at T_div.
   (The ⌈R/2⌉ x ⌊R/2⌋ similarity matrix is of visual tokens, not an attention map.)
3. Output: the T_imp + T_div kept patches in raster order (the released code masks the features).

Defaults: T = 64 of 576 (the paper's LLaVA-1.5 budgets are 64, 128, 192); r = 0.5 (the released
evaluation scripts' default; their README's 64-token example uses r = 0.75, 48 + 16); 8 tokens
removed per round (``per_round``, fixed in the released code). Knobs ``keep`` and
``important_ratio``; ``budget_knobs`` maps a token budget onto ``keep`` (the split stays r).

Where vtc differs from the released code: ties in the two sorts go to the earlier token (stable
sort; the released ``argsort`` leaves them unspecified); similarities in float32, not the model's
dtype; an odd residual count (odd N − T_imp, never reached with 576 patches and even T_imp) splits
A = ⌈R/2⌉ as the slicing does, where the released indexing would fail to broadcast; the batch is
handled per image in one batched pass (the released ``torch.arange(B)`` indexing is batched too).

The CLS token is required (``needs_cls``): SigLIP has none and is refused in ``check``. The
attention row needs the selected block's input (hidden state sel − 1), kept through
``extra_layers``. Training-free and parameter-free; ``own_flops`` counts the recomputed CLS row
(k_proj over 1 + n tokens, the CLS q_proj, its scores) and the rounds' similarity matrices.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vtc.compressors.base import PreLLMCompressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


def split_counts(keep: int, important_ratio: float) -> tuple[int, int]:
    """(T_imp, T_div) = (⌊T·r⌋, T − ⌊T·r⌋), as the released ``int(visual_token_num * important_ratio)``."""
    imp = int(keep * important_ratio)
    return imp, keep - imp


def removal_rounds(residual: int, diverse: int, per_round: int) -> list[int]:
    """Residual counts R entering each duplicate-removal round (sizes only: the same for every image)."""
    sizes = []
    while diverse > 0 and min(per_round, residual - diverse) > 0:
        sizes.append(residual)
        residual -= min(per_round, residual - diverse, (residual + 1) // 2)
    return sizes


def vispruner_indices(attn: torch.Tensor, features: torch.Tensor, keep: int, important_ratio: float,
                      per_round: int = 8) -> torch.Tensor:
    """Kept positions [B, keep] (ascending) from CLS attention ``attn`` [B, N] and ``features`` [B, N, C]."""
    n_imp, n_div = split_counts(keep, important_ratio)
    order = attn.argsort(dim=1, descending=True, stable=True)
    important, residual = order[:, :n_imp], order[:, n_imp:]
    if n_div == 0:
        return important.sort(dim=1).values
    x = features.to(torch.promote_types(features.dtype, torch.float32))
    xn = x / x.norm(dim=-1, keepdim=True)
    C = xn.shape[-1]
    for R in removal_rounds(residual.shape[1], n_div, per_round):
        r = min(per_round, R - n_div)
        tokens = xn.gather(1, residual[..., None].expand(-1, -1, C))  # [B, R, C]
        a, b = tokens[:, ::2], tokens[:, 1::2]
        best = (a @ b.transpose(1, 2)).max(dim=-1).values  # [B, ⌈R/2⌉]: each A token's closest B match
        rest = best.argsort(dim=1, descending=True, stable=True)[:, r:]  # A minus its r most duplicated
        residual = torch.cat([residual[:, ::2].gather(1, rest), residual[:, 1::2]], dim=1)
    return torch.cat([important, residual], dim=1).sort(dim=1).values


class VisPruner(PreLLMCompressor):
    needs_cls: ClassVar[bool] = True
    reads_layer_weights: ClassVar[bool] = True  # CLS attention recomputed with an encoder block's q/k
    knobs: ClassVar[tuple[str, ...]] = ("keep", "important_ratio")

    def __init__(self, keep: int = 64, important_ratio: float = 0.5, per_round: int = 8):
        super().__init__()
        self.keep = keep
        self.important_ratio = important_ratio
        self.per_round = per_round
        self.extra_layers: tuple[int, ...] = ()
        self._width = 0

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        if not encoder.has_cls:
            raise ConfigError("compressor", "VisPruner picks its important tokens by the CLS token's attention, and "
                              "this encoder (SigLIP) has no CLS token; use a CLIP encoder, or a method that needs "
                              "no CLS (compressor=divprune, random_prune, pool, tome, dart)")
        if encoder.layer_index(encoder.select_layer) < 1:
            raise ConfigError("encoder.select_layer", "VisPruner needs a transformer block's attention; the "
                              "embedding output has none")
        k, n = self.keep, encoder.num_patches
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError("compressor.keep", f"tokens kept per image must be an integer in 1..{n} (the "
                              f"{encoder.grid}x{encoder.grid} patch grid), got {k!r}; the paper's LLaVA-1.5 "
                              "budgets are 64, 128 or 192 of 576")
        r = self.important_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) <= 1.0:
            raise ConfigError("compressor.important_ratio", "the share of the kept tokens chosen by CLS attention "
                              f"must be a number in [0, 1] (0.5 as released; the rest are diverse tokens), got {r!r}")
        p = self.per_round
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ConfigError("compressor.per_round", f"tokens removed per duplicate-removal round must be a "
                              f"positive integer (8 as released), got {p!r}")

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self.extra_layers = (encoder.layer_index(encoder.select_layer) - 1,)
        self._width = encoder.hidden_size

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        """``keep`` = the budget; the important : diverse split stays ``important_ratio``."""
        return {"keep": max(1, min(int(tokens), n))}

    def tokens_out(self, n: int) -> int:
        return min(self.keep, n) if self.enabled else n

    def cls_attention(self, enc) -> torch.Tensor:
        """Head-mean CLS attention over the N patches [B, N], in the block that produced the selected layer."""
        encoder = enc.encoder
        sel = encoder.info.layer_index(encoder.info.select_layer)
        return encoder.query_attention(sel, enc.hidden_states[sel - 1], 0).mean(1)[:, 1:]

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:
        _, N, C = features.shape
        k = min(self.keep, N)
        if not self.enabled or k == N:
            return features
        with torch.no_grad():
            idx = vispruner_indices(self.cls_attention(enc), features, k, self.important_ratio, self.per_round)
        return features.gather(1, idx[..., None].expand(-1, -1, C))

    def own_flops(self, n: int) -> float:
        """Per image: k_proj over 1 + n tokens and the CLS q_proj (2·C² each per token), the CLS row's
        scores (2·(n+1)·C), the norms (3·n·C) and each round's ⌈R/2⌉ x ⌊R/2⌋ similarities."""
        c, k = self._width, self.tokens_out(n)
        if k >= n:  # nothing to prune: forward returns the tokens untouched
            return 0.0
        n_imp, n_div = split_counts(k, self.important_ratio)
        rounds = sum(2.0 * ((R + 1) // 2) * (R // 2) * c for R in removal_rounds(n - n_imp, n_div, self.per_round))
        return 2.0 * ((n + 1) * c * c + c * c + (n + 1) * c) + 3.0 * n * c + rounds
