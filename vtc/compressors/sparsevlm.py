"""SparseVLM: text raters score the image tokens at a few layers; the pruned ones are recycled.

Paper: Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", arXiv 2410.04417 (ICML 2025): Sec. 3.2 (text raters), 3.3 (sparsification level),
3.4 (token recycling); code: github.com/Gumpest/SparseVLMs, ``LlamaDynamicvitModel.forward`` in
``llava/model/language_model/modelling_sparse_llama.py``, ``attn_postprocess_topk`` in ``score.py``
and ``cluster_and_merge`` in ``utils.py`` (v1.5, the ICML code; ``USE_VERSION=1_0``).

1. Raters, once, on the LLM's input embeddings: with V the image tokens and t_1..t_m the text after
   the image, r_j = 1/|V| · Σ_{v∈V} softmax_j(x_v · x_tj) (plain dot products, softmax over the text
   tokens); the raters are the t_j with r_j > mean(r).
2. Before each layer K_s of ``layers`` the attention of layer K_s − 1 scores the image tokens:
   P = the raters' softmax attention rows (head mean) restricted to the image tokens, s_v = mean
   over raters of P[·, v]. Their code (``pruning_loc = [2, 6, 15]``) runs layer 2 (6, 15) whole with
   its attention map and drops from its *output*, so layers 3, 7, 16 are the first to see fewer
   tokens: ``layers = [3, 7, 16]`` here, vtc's "before layer K" as for FastV, DART and PyramidDrop.
   Only the rater rows are recomputed, with layer K_s − 1's own norm, q/k projections and RoPE at the
   input that layer consumed (``LayerContext.previous_layer`` / ``previous_input``): q of the R
   raters against the keys of the whole causal prefix (the softmax's denominator needs them), an
   R x T block, never T x T; SDPA / flash-attention stay on.
3. Kept: the top min(k_s, v − 1) image tokens by s_v (v = image tokens now). Their v1.5 code fixes
   k_s per stage for 576 tokens (``sparse_token_list_*``): budget 192: 300, 200, 110; 128: 303, 110,
   36; 96: 238, 48, 26; 64: 66, 30, 17. ``keep`` holds these as shares of the image tokens n0 the
   sample brought into the LLM, k_s = round(keep_s · n0) (default: the 192 budget, the code's
   default ``RETAIN_TOKN``).
4. Recycling (``recycle``): of the deleted tokens, the int(0.3·d) + 1 with the highest s_v (d
   deleted) are clustered into int(m/10) + 1 clusters by density-peak kNN clustering (DPC-kNN:
   density ρ_i = exp(−mean of squared distances to the c nearest, self included, distances
   ||x_i − x_j|| / sqrt(C)); δ_i = distance to the nearest denser token, the largest distance for
   the densest; centres = top c of ρ·δ; each token joins its nearest centre) and each cluster's mean
   hidden state (layer K_s − 1's output) becomes one token, placed after the kept image tokens. So
   after stage s the image span holds k_s + c_s tokens; every count is a function of n0 alone.

The rank rule. The first release (Oct 2024, ``attn_postprocess_rank``) derived the count from the
rank of P: keep min(int(rank(P)·scale + bias), v − 1) with per-benchmark (scale, bias), e.g. (13.5,
0) for "192", (9, 6) for "128", (0.8, 0) for "64", scoring at layers 2, 6, 15, 19; the paper has the
deleted count as λ-scaled and rank-derived. rank(P) <= number of raters, so the count follows the
question's length, and the per-sample counts cannot be known before the data. v1.5 (March 2025;
the branch their README links for the ICML paper) replaced it by the fixed schedules above; those
are implemented here, so tokens per layer (FLOPs) are exact.

Choices where the code is incidental (batch size 1 throughout):
 - Rater candidates are the text tokens after the image up to the query (``SeqState.query_index``):
   at inference all of their "text after the image"; in training the answer is excluded (it must not
   choose what the model sees). None after the image (a ``plain`` caption sample): the query itself
   rates. No token above the mean (e.g. one candidate): all candidates rate.
 - DPC-kNN: their code adds uniform noise (1e-6) to break density ties; here ties go to the earlier
   token, so results are reproducible and a batch equals its samples alone.
 - Positions: kept tokens keep theirs; a recycled token takes its cluster centre's (LightCompress's
   port does the same). Their code renumbers 0..len−1 after each stage, which vtc's decode (one
   position per step for all layers) cannot follow.
 - An image-token query (the last image token of a ``plain`` sample) is always kept, counted in k_s
   (one more when k_s = 0), and stays the last token of the span.
 - Training: their code is inference-only (its training branch is empty). Here the scoring runs
   without gradients and the loss reaches the kept tokens and, through the means, the recycled ones.
The raters and n0 are remembered between the stages of one forward: the compressor also acts
before layer 0 (no change to the tokens) to read the input embeddings.

Batches: per-sample loop (the kept, recycled and clustered counts differ per sample), one batched
rater-row attention per stage. Knobs: ``layers`` (K_s: drop before layer K_s, scored by layer
K_s − 1), ``keep`` (k_s / n0). A 4-layer LLM: ``compressor.layers=[1,2,3]`` (round((K−1)·N/32) + 1).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vtc.compressors.base import StagedPruner
from vtc.compressors.fastv import _rope_fns, layer_qk, rotary_embedding
from vtc.compressors.pyramid_drop import check_layers, check_share, scaled_layers
from vtc.errors import ConfigError
from vtc.model.encoder import reshard_after_read
from vtc.model.sequence import LayerContext, SeqState

#: the 192 budget's schedule (300, 200, 110 of 576), their default; 64: [66/576, 30/576, 17/576]
DEFAULT_KEEP = (300 / 576, 200 / 576, 110 / 576)
NOMINAL_RATERS, NOMINAL_TEXT = 16, 32  # for own_flops only: raters and text after the image, per image


def recycled(deleted: int) -> tuple[int, int]:
    """(tokens recycled, clusters) for ``deleted`` pruned tokens: m = int(0.3·d) + 1, c = int(m/10) + 1."""
    if deleted <= 0:
        return 0, 0
    m = min(deleted, int(deleted * 0.3) + 1)
    return m, m // 10 + 1


def cluster_merge(x: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN of x [m, C] into ``c`` clusters: (cluster means [c, C], centre indices [c])."""
    m, C = x.shape
    with torch.no_grad():
        xf = x.float()[None]  # exact pairwise differences (as theirs), so every self-distance is 0
        dist = torch.cdist(xf, xf, compute_mode="donot_use_mm_for_euclid_dist")[0] / C ** 0.5
        density = (-(dist.topk(c, dim=-1, largest=False).values ** 2).mean(-1)).exp()
        idx = torch.arange(m, device=x.device)
        denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None] < idx[:, None]))
        delta = torch.where(denser, dist, dist.max()).min(-1).values
        centres = (delta * density).argsort(descending=True, stable=True)[:c]
        assign = dist[centres].argmin(0)
        assign[centres] = torch.arange(c, device=x.device)
        size = torch.bincount(assign, minlength=c).to(x.dtype)
    merged = torch.zeros(c, C, dtype=x.dtype, device=x.device).index_add(0, assign, x) / size[:, None]
    return merged, centres


def rater_attention(state: SeqState, layer, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's rater rows (``rows`` [B, R], ``valid`` [B, R]) of the head-mean
    softmax attention of layer ``layer`` at ``state``: [B, T]. Only the R query rows are computed."""
    x, _, k = layer_qk(state, layer, query=False)
    attn = layer.self_attn
    hd = attn.head_dim
    B, R = rows.shape
    xr = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
    q = attn.q_proj(xr).view(B, R, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    cos, sin = rotary_embedding(layer).to(x.device)(x, state.position_ids.gather(1, rows))
    apply_rope, repeat_kv = _rope_fns(layer)
    q, _ = apply_rope(q, q, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q.float() @ k.float().transpose(-1, -2)) * getattr(attn, "scaling", hd ** -0.5)  # [B, H, R, T]
    T = k.shape[2]
    allowed = (torch.arange(T, device=x.device)[None, None] <= rows[..., None]) & state.attention_mask.bool()[:, None]
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)  # [B, R, T]
    w = valid.to(probs.dtype)
    return (probs * w[..., None]).sum(1) / w.sum(1).clamp(min=1)[:, None]


class SparseVLM(StagedPruner):
    """Knobs ``layers`` (drop before each, scored by the layer before it) and ``keep`` (k_s / n0)."""

    knobs: ClassVar[tuple[str, ...]] = ("layers", "keep")
    reads_layer_weights: ClassVar[bool] = True  # scores with layer K_s − 1's q/k projections
    DEFAULT_LAYERS: ClassVar[tuple[int, ...]] = (3, 7, 16)

    def __init__(self, layers=None, keep=DEFAULT_KEEP, recycle: bool = True):
        super().__init__(layer=None)
        self.layers = layers if layers is None or isinstance(layers, (str, int, float)) else list(layers)
        self.keep = keep if keep is None or isinstance(keep, (str, int, float)) else list(keep)
        self.recycle = recycle
        self._raters: list[torch.Tensor] = []  # rater positions per sample, set before layer 0
        self._entering: list[int] = []  # n0 per sample

    # -- configuration ----------------------------------------------------------------------------
    def check(self, encoder, llm_layers: int) -> None:
        """``layers: null`` resolves here to LLaVA-1.5's layers scaled to this LLM's depth."""
        if self.layers is None:
            self.layers = scaled_layers(self.DEFAULT_LAYERS, llm_layers, first=1)
        check_layers(self.layers, 1, llm_layers, self.DEFAULT_LAYERS,
                     "a stage drops before each of these layers, scored by the layer before it")
        if isinstance(self.keep, (str, bytes, int, float)) or self.keep is None or len(self.keep) != len(self.layers):
            raise ConfigError("compressor.keep", f"one share of the image tokens per layer of compressor.layers "
                              f"({len(self.layers)}), got {self.keep!r}; e.g. the 64-token schedule "
                              "[0.1146, 0.0521, 0.0295] (66, 30, 17 of 576)")
        for i, share in enumerate(self.keep):
            check_share(share, f"compressor.keep[{i}]", "the share of the entering image tokens kept at this stage")
        if not isinstance(self.recycle, bool):
            raise ConfigError("compressor.recycle", f"true or false, got {self.recycle!r}")

    def budget_knobs(self, tokens: int, n: int, encoder) -> dict:
        """The configured schedule scaled by one factor f (shares capped at 1), the largest f whose
        last stage leaves at most ``tokens`` (kept + recycled); bisection, counts being exact."""
        base = [float(k) for k in self.keep]
        lo, hi = 0.0, 1.0 / min(base)
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.stage_counts(n, [min(1.0, k * mid) for k in base])[-1] <= tokens:
                lo = mid
            else:
                hi = mid
        return {"keep": [min(1.0, k * lo) for k in base]}

    # -- counting ---------------------------------------------------------------------------------
    def applies_at(self, layer_idx: int) -> bool:
        return self.compressing() and (layer_idx == 0 or layer_idx in list(self.layers))

    def stage_kept(self, n0: int, v: int, share: float) -> int:
        return max(0, min(round(float(share) * n0), v - 1))

    def stage_counts(self, n: int, keep=None) -> list[int]:
        """Image tokens after each stage for ``n`` entering the LLM: k_s + recycled clusters."""
        out, v = [], n
        for share in self.keep if keep is None else keep:
            if v > 0:
                k = self.stage_kept(n, v, share)
                v = k + (recycled(v - k)[1] if self.recycle else 0)
            out.append(v)
        return out

    def own_flops(self, n: int) -> float:
        """Per image, with d the LLM's hidden width and nominal R = 16 raters among t = 32 text tokens
        after the image (the real numbers follow the prompt): rater choice 2·n·t·d; per stage with v
        image tokens entering: k_proj of the v image tokens 2·v·d², q_proj of the raters 2·R·d², the
        R·v dot products 2·R·v·d, recycling's m x m distances 3·m²·d. Nominal in R and t; an upper
        bound under GQA (k_proj is d -> d_kv); norms, RoPE, softmax and the text keys of the softmax
        are left out."""
        if not self.compressing():
            return 0.0
        d, R = self.llm_hidden, NOMINAL_RATERS
        total, v = 2.0 * n * NOMINAL_TEXT * d, n
        for after, share in zip(self.stage_counts(n), self.keep):
            m = recycled(v - self.stage_kept(n, v, share))[0] if self.recycle and v else 0
            total += 2.0 * v * d * d + 2.0 * R * d * d + 2.0 * R * v * d + 3.0 * m * m * d
            v = after
        return total

    # -- raters (before layer 0) and the stages ---------------------------------------------------
    def choose_raters(self, state: SeqState) -> None:
        """Rater positions and n0 per sample, from the LLM's input embeddings."""
        self._raters, self._entering = [], []
        real = state.attention_mask.bool()
        vis = state.visual_mask & real
        ar = torch.arange(state.hidden.shape[1], device=real.device)
        with torch.no_grad():
            for b in range(state.hidden.shape[0]):
                v_idx = vis[b].nonzero().squeeze(1)
                q = int(state.query_index[b])
                self._entering.append(len(v_idx))
                if len(v_idx) == 0:
                    self._raters.append(state.position_ids[b, :0])
                    continue
                cand = ((ar > v_idx[-1]) & (ar <= q) & real[b] & ~vis[b]).nonzero().squeeze(1)
                if len(cand) == 0:
                    cand = torch.tensor([q], device=real.device)
                else:
                    h = state.hidden[b].float()
                    r = (h[v_idx] @ h[cand].T).softmax(-1).mean(0)
                    above = cand[r > r.mean()]
                    cand = above if len(above) else cand
                self._raters.append(state.position_ids[b, cand])

    def compress(self, state: SeqState, at: LayerContext) -> SeqState:
        if at.index == 0:
            self.choose_raters(state)
            return state
        stage = list(self.layers).index(at.index)
        prev = at.previous_input  # layer K_s − 1's input: the same tokens as ``state`` (its output)
        B = state.hidden.shape[0]
        real = prev.attention_mask.bool()
        vis = prev.visual_mask & real
        rows = [(torch.isin(prev.position_ids[b], self._raters[b]) & real[b]).nonzero().squeeze(1) for b in range(B)]
        R = max(1, max(len(r) for r in rows))
        idx = torch.stack([torch.cat([r, prev.query_index[b].expand(R - len(r))]) for b, r in enumerate(rows)])
        valid = torch.arange(R, device=idx.device)[None] < torch.tensor([len(r) for r in rows], device=idx.device)[:, None]
        try:
            with torch.no_grad():
                relation = rater_attention(prev, at.previous_layer, idx, valid)  # [B, T]
        finally:
            reshard_after_read(at.previous_layer)  # FSDP2: its forward ran already, nothing else reshards
        spans, positions = [], []
        for b in range(B):
            v_idx = vis[b].nonzero().squeeze(1)
            v = len(v_idx)
            if v == 0:
                spans.append(state.hidden[b, :0])
                positions.append(state.position_ids[b, :0])
                continue
            q = int(state.query_index[b])
            k = self.stage_kept(self._entering[b], v, self.keep[stage])
            score = relation[b, v_idx].clone()
            q_slot = (v_idx == q).nonzero().squeeze(1)
            if len(q_slot):
                score[q_slot] = float("inf")
                k = max(k, 1)
            order = score.argsort(descending=True, stable=True)
            kept = v_idx[order[:k].sort().values]
            tail = kept[kept == q]  # an image-token query stays the span's last token (replace_visual maps it there)
            kept = kept[kept != q]
            hid, pos = [state.hidden[b, kept]], [state.position_ids[b, kept]]
            if self.recycle and v > k:
                m, c = recycled(v - k)
                chosen = v_idx[order[k:k + m]]  # the deleted tokens the raters scored highest
                merged, centres = cluster_merge(state.hidden[b, chosen], c)
                hid.append(merged)
                pos.append(state.position_ids[b, chosen[centres]])
            hid.append(state.hidden[b, tail])
            pos.append(state.position_ids[b, tail])
            spans.append(torch.cat(hid))
            positions.append(torch.cat(pos))
        return state.replace_visual(spans, positions)
