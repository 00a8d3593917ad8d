"""PyramidDrop: drop a fixed share of the image tokens at a few layer boundaries, stage by stage.

Paper: Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", arXiv 2410.17247 (CVPR 2025), Sec. 3 (the forward split into S + 1 stages;
stage s keeps λ of the image tokens the stage before it kept), and the released code
(``pdrop_forward`` / ``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py``).

Before each boundary layer l_s (``layers``, increasing) the image tokens are ranked by the attention
they receive from the last instruction token, head-averaged (FastV's score, Eq. 2 of the paper),

    s_j = 1/H · Σ_h softmax_j( q_h(x_query) · k_h(x_j) / sqrt(d_h) ),   j an image token,

and each sample keeps its top ``floor(n0 · λ^(s+1))`` image tokens (s = 0, 1, ...; n0 the image
tokens the sample had when it entered the first stage); text is never dropped. Their code writes
the cumulative shares explicitly (``--image_token_ratio_list [0.5,0.25,0.125]``) and rounds with
``int()`` against n0 (``keep_length = int(n0 · ratio_list[s+1])``), which is what is done here,
not a floor of a floor. Defaults, LLaVA-1.5-7B (32 layers), the same for their training
(``scripts/v1_5/pdrop_train``) and their inference scripts (``scripts/v1_5/pdrop_eval``):
``layers = [8, 16, 24]``, λ = 0.5: 576 → 288 → 144 → 72 image tokens.

Which layer scores. Their loop runs layer l_s − 1, then ranks its output with layer l_s's own
``input_layernorm``, q_proj, k_proj and RoPE (``self.layers[rank_layer]``), and drops before
layer l_s runs. That is exactly vtc's recomputed row (``vtc.compressors.fastv.query_attention``
with ``LayerContext.layer``): one query row per sample and stage, never a T x T map, so SDPA and
flash-attention stay on everywhere.

The query. At inference their query is the last prompt token; in training it is every position
whose next token starts an answer (``index_before_answer``), averaged. Here it is
``SeqState.query_index``: the last instruction token in generation, the position predicting the
first answer token in training. For one-turn samples both rules pick the same token; for a
multi-turn sample we keep the first turn's query only, because a later turn's query has read the
earlier answers, which must not decide what the model sees while it predicts them. (Their code
also skips dropping for a training sample without any answer token; here such a sample's query is
its last token.) When the query is itself an image token (a ``plain`` pretraining sample whose
caption follows the image directly: the last image token predicts the first caption token) it is
always kept and counts toward the kept number (one more when that number is 0).

Training. The paper trains LLaVA with PyramidDrop (their finetune/pretrain scripts use the same
``[8,16,24]``, λ = 0.5): scoring runs without gradients and the gradient flows through the kept
tokens only, as here.

Position ids: kept tokens keep their original positions (as vtc's FastV and DART). Their code
renumbers each sample 0..len−1 after every drop and shifts the decode positions by the dropped count
per stage; vtc's decoder gives one position per decode step to all layers, so a renumbering would
misplace the decode token in the later stages. Kept positions need no such bookkeeping.

Batches: one batched rank per stage (no loop over samples); the kept count may differ per sample
(different n0), which the rank threshold handles.

Knobs: ``layers`` (the boundaries l_s) and ``ratio`` (λ, the share kept per stage). A 4-layer LLM
scales the LLaVA boundaries as round(l·N/32): ``compressor.layers=[1,2,3]``.
"""
from __future__ import annotations

import math
from itertools import pairwise
from typing import ClassVar

import torch

from vtc.compressors.base import StagedPruner
from vtc.compressors.fastv import query_attention
from vtc.errors import ConfigError
from vtc.model.sequence import LayerContext, SeqState

REFERENCE_LAYERS = 32  # the defaults are written for LLaVA-1.5-7B's 32 decoder layers


def scaled_layers(default, num_layers: int, first: int = 0) -> list[int]:
    """Layer indices written for LLaVA-1.5's 32 layers, for an LLM of ``num_layers``: the layer that
    scores, l − first, scaled as round(·N/32) (the schedules' rule), then + first, clipped to
    first..N−1; duplicates merge. PyramidDrop (first = 0): [8, 16, 24] -> [1, 2, 3] at N = 4;
    SparseVLM (first = 1, it scores with the layer before): [3, 7, 16] -> [1, 2, 3] at N = 4."""
    return sorted({min(num_layers - 1, round((x - first) * num_layers / REFERENCE_LAYERS) + first) for x in default})


def check_layers(layers, first: int, num_layers: int, default: tuple[int, ...], what: str) -> None:
    """``layers``: a non-empty, strictly increasing list of integers in ``first``..N−1; the message
    names the key and the defaults scaled to this LLM (``scaled_layers``)."""
    last = num_layers - 1
    hint = (f"{what}; the defaults {list(default)} are LLaVA-1.5's (32 layers): for this {num_layers}-layer LLM "
            f"e.g. compressor.layers={scaled_layers(default, num_layers, first)}")
    ok = (layers is not None and not isinstance(layers, (str, bytes, int, float)) and len(layers) > 0
          and all(isinstance(x, int) and not isinstance(x, bool) for x in layers))
    if not ok:
        raise ConfigError("compressor.layers", f"must be a non-empty list of layer indices, got {layers!r}; {hint}")
    vals = list(layers)
    if any(b <= a for a, b in pairwise(vals)):
        raise ConfigError("compressor.layers", f"must be strictly increasing, got {vals}; {hint}")
    if vals[0] < first or vals[-1] > last:
        raise ConfigError("compressor.layers", f"{vals} leaves the range {first}..{last}; {hint}")


def check_share(value, key: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(key, f"{what} must be in (0, 1], got {value!r} (1 keeps every token: use compressor=none "
                          "to switch the method off)")


class PyramidDrop(StagedPruner):
    """Knobs ``layers`` (stage boundaries, increasing) and ``ratio`` (λ kept per stage)."""

    knobs: ClassVar[tuple[str, ...]] = ("layers", "ratio")
    reads_layer_weights: ClassVar[bool] = True  # scores with the boundary layer's q/k projections
    DEFAULT_LAYERS: ClassVar[tuple[int, ...]] = (8, 16, 24)

    def __init__(self, layers=None, ratio: float = 0.5):
        super().__init__(layer=None)
        self.layers = layers if layers is None or isinstance(layers, (str, int, float)) else list(layers)
        self.ratio = ratio
        self._entering: torch.Tensor | None = None  # n0 per sample, set by the first stage of a forward

    # -- configuration ----------------------------------------------------------------------------
    def check(self, encoder, llm_layers: int) -> None:
        """``layers: null`` resolves here to LLaVA-1.5's boundaries scaled to this LLM's depth."""
        if self.layers is None:
            self.layers = scaled_layers(self.DEFAULT_LAYERS, llm_layers)
        check_share(self.ratio, "compressor.ratio", "the share of image tokens kept per stage (λ)")
        check_layers(self.layers, 0, llm_layers, self.DEFAULT_LAYERS, "a stage drops before each of these layers")

    def budget_knobs(self, tokens: int, n: int, encoder) -> dict:
        """λ with floor(n·λ^S) = ``tokens`` after the last of the S stages: λ = (tokens/n)^(1/S)
        (a hair above, so float rounding never floors one token short)."""
        share = min(1.0, (min(tokens, n) + 1e-6) / n)
        return {"ratio": share ** (1.0 / len(self.layers))}

    # -- counting ---------------------------------------------------------------------------------
    def stage_counts(self, n: int) -> list[int]:
        """Image tokens left after each stage for ``n`` entering the first: floor(n·λ^(s+1))."""
        return [min(n, math.floor(n * float(self.ratio) ** (s + 1) + 1e-9)) for s in range(len(self.layers))]

    def own_flops(self, n: int) -> float:
        """Per image and stage with v image tokens entering it: k_proj of the v image tokens (2·v·d²),
        q_proj of the query row (2·d²), the v dot products over all heads (2·v·d); d = the LLM's
        hidden width. An upper bound under GQA (k_proj is d -> d_kv there); norms, RoPE and the
        softmax are left out, and so are the text keys of the softmax's denominator (per sample,
        not per image)."""
        d, total, v = self.llm_hidden, 0.0, n
        if not self.compressing():
            return 0.0
        for after in self.stage_counts(n):
            total += 2.0 * v * d * d + 2.0 * d * d + 2.0 * v * d
            v = after
        return total

    # -- the drop ---------------------------------------------------------------------------------
    def compress(self, state: SeqState, at: LayerContext) -> SeqState:
        stage = list(self.layers).index(at.index)
        real = state.attention_mask.bool()
        vis = state.visual_mask & real
        counts = vis.sum(1)
        if stage == 0 or self._entering is None or self._entering.shape != counts.shape:
            self._entering = counts  # n0: the stages of one forward run in order, the first sets it
        n0 = self._entering.to(counts.device)
        keep_n = torch.minimum(torch.floor(n0.double() * float(self.ratio) ** (stage + 1) + 1e-9).long(), counts)
        with torch.no_grad():
            att = query_attention(state, at.layer)  # [B, T], the query row at layer l_s's input
        B, T = att.shape
        rows = torch.arange(B, device=att.device)
        q = state.query_index
        q_vis = vis[rows, q]
        score = att.masked_fill(~vis, float("-inf"))
        score[rows[q_vis], q[q_vis]] = float("inf")  # an image-token query is always kept
        order = score.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=att.device).expand(B, T))
        keep = (real & ~vis) | (vis & (rank < keep_n[:, None]))
        keep[rows, q] = True
        return state.select(keep)
