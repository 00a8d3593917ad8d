"""DART: keep the visual tokens least duplicated with a few pivot tokens.

Paper: Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication
Matters More" (DART, Duplication-Aware Reduction of Tokens), arXiv 2502.11494, Sec. 3 (pivot
selection; duplication dup(i, j) = cos(x_i, x_j); Eq. for the retained set) and the released code
(``get_retained_image_token`` in their ``DART_K_norm`` LLaVA model).

At layer K (default 2):
 1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` text tokens with the largest
    key L1 norm ||k_j||_1 (keys of all heads concatenated; their defaults 4 + 4);
 2. for each pivot p in turn, the image tokens least similar to it,
        argmin_j cos(x_p, x_j) over the image tokens not yet taken,
    are added to the kept set; the image pivots are kept too, text pivots only serve as queries.
No attention map is needed (efficient-attention compatible, the paper's point).

Defaults (their LLaVA-1.5 scripts): K = 2, 4 image + 4 text pivots, reduction ratio 0.778, i.e.
``576 − floor(0.778·576) = 128`` image tokens kept. ``ratio`` is the fraction dropped, as FastV's
R, and the kept count is ``n − floor(ratio·n)`` (``vtc.compressors.fastv.kept_count``).

Where the keys and features come from (``score_at``), checked against their code and LightCompress's
port (``dart.py``: a forward hook on block K−1 reads its cached keys, a pre-hook on block K applies
the model's final norm to the hidden states entering it):
 - ``previous`` (default, the released rule): keys = layer K−1's keys as its KV cache holds them
   (k_proj of layer K−1's normalised input, RoPE applied), recomputed from the state layer K−1
   consumed (``LayerContext.previous_input``); features = the decoder's final norm applied to layer
   K's input (layer K−1's output), ``LayerContext.final_norm``;
 - ``current``: layer K's own keys and its ``input_layernorm`` features, vtc's earlier rule, kept
   as a named option. K = 0 has no layer before it: both settings read layer 0's keys and input norm.
Repeating GQA key heads multiplies every L1 norm by the same factor, so kv heads are used as they are.

The budget (``budget_rule``), for ``budget = n − floor(ratio·n)``:
 - ``exact`` (default): exactly ``budget`` tokens kept: image pivots count toward it and the
   remaining ``budget − #image pivots`` are split over the pivots, ``floor`` each, the first pivots
   taking one more until the remainder is used;
 - ``released``: every pivot takes ``budget // (pivot_image + pivot_text)`` tokens on top of the
   image pivots, as their released scripts do: 68 / 132 / 196 tokens for budgets 64 / 128 / 192
   (with fewer text tokens than ``pivot_text``, fewer pivots take their share; the count reported
   per layer is the nominal one, the measured ``seen`` counts are exact).

Other choices where the paper is silent or the code is incidental:
 - Pivot order: image pivots by decreasing key norm, then text pivots by decreasing key norm.
   (Their code iterates a Python set, whose order is an accident of hashing.)
 - Text pivots are chosen among the tokens after the image up to the last instruction token
   (``SeqState.query_index``): at inference that is their "text after the image"; in training it
   excludes the answer, which must not decide what the model sees.

Position ids: kept tokens keep their original positions (their ``position_ids = keep_indexs``).
Knobs: ``layer`` (K) and ``ratio``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtc.compressors.base import RatioPruner, kept_count
from vtc.compressors.fastv import check_score_at, layer_qk, scoring_site
from vtc.model.encoder import reshard_after_read
from vtc.errors import ConfigError
from vtc.model.sequence import LayerContext, SeqState


def dart_select(
    feats: torch.Tensor,
    key_norm: torch.Tensor,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    n_keep: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    budget_rule: str = "exact",
) -> torch.Tensor:
    """One sample. feats [T, d] unit-norm features, key_norm [T], image_idx / text_idx the token
    indices of the image and of the candidate text pivots. Returns the kept image indices (unsorted;
    exactly ``min(n_keep, len(image_idx))`` of them under ``budget_rule="exact"``)."""
    n = len(image_idx)
    if n_keep >= n:
        return image_idx
    if n_keep <= 0:
        return image_idx[:0]
    img_piv = image_idx[key_norm[image_idx].topk(min(pivot_image, n_keep)).indices]
    txt_piv = text_idx[key_norm[text_idx].topk(min(pivot_text, len(text_idx))).indices]
    pivots = torch.cat([img_piv, txt_piv])
    if budget_rule == "released":
        per, extra = n_keep // (pivot_image + pivot_text), 0
    else:
        per, extra = divmod(n_keep - len(img_piv), len(pivots))
    avail = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
    avail[image_idx] = True
    avail[img_piv] = False
    chosen = [img_piv]
    for p, piv in enumerate(pivots.tolist()):
        quota = per + (1 if p < extra else 0)
        cand = avail.nonzero().squeeze(1)
        if quota == 0 or len(cand) == 0:
            continue
        sim = feats[cand] @ feats[piv]
        take = cand[sim.topk(min(quota, len(cand)), largest=False).indices]
        avail[take] = False
        chosen.append(take)
    return torch.cat(chosen)


BUDGET_RULES = ("exact", "released")


class DART(RatioPruner):
    def __init__(self, layer: int | None = 2, ratio: float = 0.778, pivot_image: int = 4, pivot_text: int = 4,
                 score_at: str = "previous", budget_rule: str = "exact"):
        super().__init__(layer, ratio)
        self.pivot_image = pivot_image
        self.pivot_text = pivot_text
        self.score_at = score_at
        self.budget_rule = budget_rule

    def check(self, encoder, llm_layers: int) -> None:
        if not isinstance(self.pivot_image, int) or self.pivot_image < 1:
            raise ConfigError("compressor.pivot_image", f"must be a positive integer, got {self.pivot_image!r}")
        if not isinstance(self.pivot_text, int) or self.pivot_text < 0:
            raise ConfigError("compressor.pivot_text", f"must be a non-negative integer, got {self.pivot_text!r}")
        check_score_at(self.score_at)
        if self.budget_rule not in BUDGET_RULES:
            raise ConfigError("compressor.budget_rule", f"must be one of {list(BUDGET_RULES)} (exact: the budget; "
                              f"released: their scripts' pivots + pivots x (budget // pivots)), got {self.budget_rule!r}")
        super().check(encoder, llm_layers)

    def kept(self, n: int) -> int:
        budget = kept_count(n, self.ratio)
        if self.budget_rule != "released" or budget >= n:
            return budget
        return min(n, min(self.pivot_image, budget) + (budget // (self.pivot_image + self.pivot_text))
                   * (self.pivot_image + self.pivot_text))

    def own_flops(self, n: int) -> float:
        """Per image with ``n`` visual tokens at width d: their keys (2·n·d², an upper bound under
        GQA) and each pivot's cosine against them (2·pivots·n·d)."""
        d = self.llm_hidden
        return 2.0 * n * d * d + 2.0 * (self.pivot_image + self.pivot_text) * n * d if self.compressing() else 0.0

    def features_and_key_norm(self, state: SeqState, at: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm similarity features [B, T, d] and key L1 norms [B, T] (see ``score_at``)."""
        with torch.no_grad():
            if self.score_at == "previous" and at.previous_layer is not None:
                prev, layer = scoring_site(state, at, "previous")
                try:
                    _, _, k = layer_qk(prev, layer, query=False)
                finally:
                    reshard_after_read(layer)
                x = at.final_norm(state.hidden)
            else:
                x, _, k = layer_qk(state, at.layer, query=False)
            return F.normalize(x.float(), dim=-1), k.float().abs().sum(dim=(1, 3))

    def compress(self, state: SeqState, at: LayerContext) -> SeqState:
        feats, key_norm = self.features_and_key_norm(state, at)  # key_norm: L1 over all heads' keys
        real = state.attention_mask.bool()
        vis = state.visual_mask & real
        keep = real & ~vis
        T = state.hidden.shape[1]
        ar = torch.arange(T, device=keep.device)
        for b in range(state.hidden.shape[0]):
            image_idx = vis[b].nonzero().squeeze(1)
            if len(image_idx) == 0:
                continue
            after = (ar > image_idx[-1]) & (ar <= state.query_index[b]) & real[b] & ~vis[b]
            text_idx = after.nonzero().squeeze(1)
            n_keep = kept_count(len(image_idx), self.ratio)
            q = state.query_index[b]
            if bool(vis[b, q]) and n_keep:  # the query is an image token (plain template): kept, in the budget
                image_idx, n_keep = image_idx[image_idx != q], n_keep - 1
                keep[b, q] = True
            kept = dart_select(feats[b], key_norm[b], image_idx, text_idx, n_keep, self.pivot_image, self.pivot_text,
                               self.budget_rule)
            keep[b, kept] = True
        return state.select(keep)
