"""DivPrune: keep the visual tokens a greedy Max-Min Diversity solver picks under cosine distance.

Paper: Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
arXiv 2503.02175 (CVPR 2025), method section (token pruning posed as a Max-Min Diversity Problem,
MMDP, solved greedily), and the released code, followed where it is more specific than the text
(github.com/vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``: ``pairwise_cosine_similarity``,
``DivPrune`` and the ``LAYER_INDEX == '0'`` branch of ``prepare_inputs_labels_for_multimodal``;
the budget in ``run_Divprune.sh``).

MMDP: of an image's N visual tokens x_1..x_N keep S, |S| = k, maximising
    f(S) = min_{i ≠ j ∈ S} d(x_i, x_j),     d(x_i, x_j) = 1 − cos(x_i, x_j).
The released greedy solver, per image:
1. D = 1 − X̂X̂ᵀ, X̂ the L2-normalised tokens (an N x N cosine-distance matrix of the image's own
   visual tokens; no attention map is involved).
2. First pick: argmax_j of the second-smallest entry of column j of D, i.e. of the distance from
   token j to its nearest other token (the smallest entry is its own, ≈ 0): the most isolated token.
3. k − 1 times: j* = argmax_j min_{i ∈ S} D[i, j] (the token farthest from the kept set),
   S ← S ∪ {j*}. Ties go to the lowest index (``torch.argmax``), as in the released code.
4. The kept positions are sorted: the tokens reach the LLM in raster order.
Since 1 − cos = ½‖x̂_i − x̂_j‖² is an increasing function of the chordal distance (a metric), the
greedy picks are those of farthest-point greedy under that metric, whose f is within a factor 2 of
the MMDP optimum (in chordal distance; a factor 4 in 1 − cos).

Budget (knob ``keep``, tokens kept per image or video frame): the released LLaVA-1.5 script keeps
round(0.098 · 576) = 56 tokens (``SUBSET_RATIO=0.098``; 0.1 for video); vtc's default is the
field's 64 of 576 (also 128, 192), ``budget_knobs`` maps a token budget onto ``keep`` directly.

Which features (``features``):
- ``projected`` (default, the released code): the projector's output, the tokens the LLM reads
  (4096-d for LLaVA-1.5-7B). The released code takes them from the LLM's input embedding sequence
  (the rows after the 35 system-prompt tokens of the batch's first sample: it assumes batch size
  1); vtc sets ``after_projector``, so the LMM projects every patch and hands the result here. The
  projector then runs on all n patches: ``own_flops`` counts it on the n − k pruned ones.
- ``encoder``: the encoder's patch features of the selected layer (CLIP layer −2, 1024-d), before
  the projector, which then runs on the k kept tokens only. The projector is a per-token MLP with
  a GELU, so the geometry, and the picks, differ from the released ones.

Where vtc differs from the released code:
- Already kept tokens are excluded from later picks. The released step takes the argmax over all
  N columns, kept ones included (their own distance ≈ 0), which can only pick a kept token again
  when every other token duplicates a kept one; vtc then keeps k distinct tokens.
- Scores in float32 (float64 inputs stay float64); the released code works in the model's dtype.
- Every image of a batch (and every frame of a video) is pruned on its own, batched: a batch
  equals each image run alone.

Training-free and parameter-free; the picks are indices (not differentiated), the kept features
carry gradients. Cost (``own_flops``): the Gram matrix, 2·n²·C (C the scored width), the norms,
the k greedy steps over n columns, and (``projected``) the projector on the pruned patches.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vtc.compressors.base import PreLLMCompressor
from vtc.cost.macs import projector_macs
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo

FEATURES = ("projected", "encoder")


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """[B, N, C] -> [B, N, N]: 1 − cos between every pair of an image's tokens (float32 or wider)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    xn = x / x.norm(dim=-1, keepdim=True)
    return 1.0 - xn @ xn.transpose(1, 2)


def greedy_maxmin(dist: torch.Tensor, k: int) -> torch.Tensor:
    """The released greedy MMDP solver on distances ``dist`` [B, N, N] (2 <= N, 1 <= k <= N):
    [B, k] positions in pick order (the most isolated token first)."""
    B, N, _ = dist.shape
    rows = torch.arange(B, device=dist.device)
    isolation = dist.topk(2, dim=1, largest=False).values[:, 1]  # [B, N]: column j's second smallest
    pick = isolation.argmax(dim=1)
    picks = [pick]
    nearest = dist[rows, pick]  # [B, N]: distance of each token to the kept set (one token so far)
    taken = torch.zeros(B, N, dtype=torch.bool, device=dist.device)
    taken[rows, pick] = True
    for _ in range(k - 1):
        pick = nearest.masked_fill(taken, float("-inf")).argmax(dim=1)
        picks.append(pick)
        taken[rows, pick] = True
        nearest = torch.minimum(nearest, dist[rows, pick])
    return torch.stack(picks, dim=1)


def divprune_indices(features: torch.Tensor, k: int) -> torch.Tensor:
    """Kept positions [B, k] of ``features`` [B, N, C], ascending (raster order)."""
    with torch.no_grad():
        return greedy_maxmin(cosine_distance(features), k).sort(dim=1).values


class DivPrune(PreLLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ("keep",)

    def __init__(self, keep: int = 64, features: str = "projected"):
        super().__init__()
        self.keep = keep
        self.features = features
        self.after_projector = features == "projected"  # the LMM projects first, then calls forward
        self._width = 0

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        k, n = self.keep, encoder.num_patches
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError("compressor.keep", f"tokens kept per image must be an integer in 1..{n} (the "
                              f"{encoder.grid}x{encoder.grid} patch grid), got {k!r}; the paper's LLaVA-1.5 "
                              "budgets are 64, 128 or 192 of 576")
        if self.features not in FEATURES:
            raise ConfigError("compressor.features", f"must be one of {list(FEATURES)} (projected: the projector's "
                              f"output, as their released code; encoder: the patch features before it), got "
                              f"{self.features!r}")

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self._width = llm_hidden if self.after_projector else encoder.hidden_size

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        return {"keep": max(1, min(int(tokens), n))}

    def tokens_out(self, n: int) -> int:
        return min(self.keep, n) if self.enabled else n

    def forward(self, features: torch.Tensor, enc=None) -> torch.Tensor:
        _, N, C = features.shape
        k = min(self.keep, N)
        if not self.enabled or k == N:
            return features
        idx = divprune_indices(features, k)
        return features.gather(1, idx[..., None].expand(-1, -1, C))

    def own_flops(self, n: int) -> float:
        """Per image: the Gram matrix of the n normalised tokens (2·n²·C), their norms (3·n·C), the
        greedy's k steps of a running minimum and an argmax over n columns (2·k·n), and, scoring
        projected tokens, the projector on the n − k patches the LLM never sees (the accounting
        counts it on the k kept ones only)."""
        c, k = self._width, self.tokens_out(n)
        if k >= n:  # nothing to prune: forward returns the tokens untouched
            return 0.0
        dims = getattr(self, "projector_dims", None) if self.after_projector else None
        projector = 2.0 * projector_macs(n - k, dims) if dims else 0.0
        return 2.0 * n * n * c + 3.0 * n * c + 2.0 * k * n + projector
