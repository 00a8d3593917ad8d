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

Choices where the paper is silent or the code is incidental (all stated so results can be read):
 - Budget: the kept count is exactly the budget: image pivots count toward it and the remaining
   ``budget − #image pivots`` are split over the pivots, ``floor`` each, the first pivots taking
   one more until the remainder is used. (Their code gives every pivot ``budget // 8`` tokens on
   top of the 4 image pivots: 132 tokens for "128".)
 - Pivot order: image pivots by decreasing key norm, then text pivots by decreasing key norm.
   (Their code iterates a Python set, whose order is an accident of hashing.)
 - Text pivots are chosen among the tokens after the image up to the last instruction token
   (``SeqState.query_index``): at inference that is their "text after the image"; in training it
   excludes the answer, which must not decide what the model sees.
 - Keys and features are recomputed at the input of layer K with layer K's weights (keys =
   k_proj of the RMS-normalised input, RoPE at each token's position; features = that normalised
   input, ``input_layernorm``). Their code takes layer K−1's keys and applies the model's final
   norm to layer K−1's output: the final norm lives outside the decoder layers a compressor is
   handed. Repeating GQA key heads multiplies every L1 norm by the same factor, so kv heads are
   used as they are.

Position ids: kept tokens keep their original positions (their ``position_ids = keep_indexs``).
Knobs: ``layer`` (K) and ``ratio``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vtc.compressors.base import RatioPruner, kept_count
from vtc.compressors.fastv import layer_qk
from vtc.errors import ConfigError
from vtc.model.sequence import SeqState


def dart_select(
    feats: torch.Tensor,
    key_norm: torch.Tensor,
    image_idx: torch.Tensor,
    text_idx: torch.Tensor,
    n_keep: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
) -> torch.Tensor:
    """One sample. feats [T, d] unit-norm features, key_norm [T], image_idx / text_idx the token
    indices of the image and of the candidate text pivots. Returns the kept image indices (unsorted,
    exactly ``min(n_keep, len(image_idx))`` of them)."""
    n = len(image_idx)
    if n_keep >= n:
        return image_idx
    if n_keep <= 0:
        return image_idx[:0]
    img_piv = image_idx[key_norm[image_idx].topk(min(pivot_image, n_keep)).indices]
    txt_piv = text_idx[key_norm[text_idx].topk(min(pivot_text, len(text_idx))).indices]
    pivots = torch.cat([img_piv, txt_piv])
    budget = n_keep - len(img_piv)
    per, extra = divmod(budget, len(pivots))
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


class DART(RatioPruner):
    def __init__(self, layer: int | None = 2, ratio: float = 0.778, pivot_image: int = 4, pivot_text: int = 4):
        super().__init__(layer, ratio)
        self.pivot_image = pivot_image
        self.pivot_text = pivot_text

    def check(self, encoder, llm_layers: int) -> None:
        if not isinstance(self.pivot_image, int) or self.pivot_image < 1:
            raise ConfigError("compressor.pivot_image", f"must be a positive integer, got {self.pivot_image!r}")
        if not isinstance(self.pivot_text, int) or self.pivot_text < 0:
            raise ConfigError("compressor.pivot_text", f"must be a non-negative integer, got {self.pivot_text!r}")
        super().check(encoder, llm_layers)

    def compress(self, state: SeqState, layer_idx: int, layer: nn.Module) -> SeqState:
        with torch.no_grad():
            x, _, k = layer_qk(state, layer, query=False)
            key_norm = k.float().abs().sum(dim=(1, 3))  # [B, T]: L1 over all heads' keys
            feats = F.normalize(x.float(), dim=-1)
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
            kept = dart_select(feats[b], key_norm[b], image_idx, text_idx,
                               kept_count(len(image_idx), self.ratio), self.pivot_image, self.pivot_text)
            keep[b, kept] = True
        return state.select(keep)
