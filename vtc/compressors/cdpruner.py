"""CDPruner: keep the visual tokens that are diverse conditioned on the instruction (a conditional DPP).

Paper: Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs" (CDPruner, NeurIPS 2025), arXiv 2506.10967, Sec. 3 (conditional similarity,
DPP formulation, greedy MAP), and the released code (``LlavaMetaForCausalLM.encode_images`` in
``llava/model/llava_arch.py``, ``CLIPVisionTower.forward`` / ``load_text_tower`` in
``llava/model/multimodal_encoder/clip_encoder.py``).

For the n visual tokens x_1..x_n of a sample and an instruction embedding t:

    S_ij = cos(x_i, x_j)                                       (similarity, projected features)
    r_i  = (c_i − min_j c_j + 1e-6) / (max_j c_j − min_j c_j),  c_i = cos(x_i, t)   (relevance)
    L    = diag(r) · S · diag(r)                               (conditional kernel)
    keep = argmax_{|Y| = k} det(L_Y)  by greedy MAP inference  (Chen et al., NeurIPS 2018: fast
                                                                greedy with incremental Cholesky)

and the kept tokens stay in raster order (their ``torch.sort`` of the picks). Greedy step t picks
j = argmax_j d_j², where d_j² = L_jj − ||c_j||² is the Cholesky residual of candidate j given the
picks so far (= det(L_{Y∪j}) / det(L_Y)), then appends e = (L_{j,:} − c_jᵀ C) / d_j to the
factor C and updates d² −= e². Defaults (their LLaVA-1.5 scripts): 64 / 128 / 192 of 576 tokens
kept (``--visual_token_num``); the optional trade-off θ of Chen et al. (r ← exp(α·r),
α = θ / (2(1 − θ))) is commented out in their code, i.e. off by default.

What plays each part here (vtc has no CLIP text tower):
 - Site: an in-LLM compressor before decoder layer ``layer`` (default 0, i.e. on the LLM input
   embeddings: every layer sees the pruned set, the same cost as their pre-LLM pruning). At K > 0
   it reads layer K's input hidden states.
 - S: cosine similarity of the visual tokens' hidden states; at layer 0 these are the projector's
   outputs, exactly their ``mm_projector(image_features)``.
 - Instruction embedding t: the mean of the hidden states (at layer 0: the LLM input embeddings)
   of the instruction's text tokens, i.e. the tokens after the last visual token up to the last
   instruction token (``SeqState.query_index``); when there are none (image after the question),
   all real text tokens up to the query. Their t is the CLIP text tower's pooled embedding of the
   question alone (benchmark suffixes such as "Answer ... single word or phrase." stripped); ours
   also includes the chat template's "ASSISTANT:" tokens, and never the system prompt or answers.
   Their c_i compares CLIP-projected patch features with t in CLIP's joint space; ours compares
   the visual hidden states with t in the LLM's input space, where both live.
 - Sign: their code ranks by −cos (``(-relevance).mean(-1)``), which the authors call a CLIP-
   specific phenomenon (their issues #14, #22); we use +cos, the paper's relevance, since our
   space is the LLM's, not CLIP's. ``negate=True`` reproduces their sign.
 - Normalisation: their min / max run over the whole batch tensor (batch size 1 in their eval);
   here per sample, over its visual tokens. A zero range (all c_i equal) gives r ≡ 1.
 - θ: ``theta`` (None: off, their default). With θ set we use exp(α·(r − 1)), which scales L by
   the constant e^{−2α} (same picks as exp(α·r)) and keeps float32 from overflowing.
 - Positions: ``positions="compact"`` (default) renumbers the tokens after each dropped visual
   token down by the number dropped before it, which at layer 0 is exactly their pre-LLM pruning
   (the LLM never sees the pruned tokens' positions). It is consistent with a KV cache only when
   no earlier layer saw the unpruned sequence, so the check refuses it at K > 0;
   ``positions="keep"`` keeps original positions (FastV's ``state.select``).
 - Budget: ``keep`` visual tokens per sample (a video's whole span of frames counts as one set),
   all of them when a sample has no more than ``keep``.
 - Numerical safety (their code has none): residuals are kept ≥ 0, and once a sample's best
   residual is ≤ ``eps`` · max_i L_ii (the rest lie, to float precision, in the span of the picks)
   its remaining slots are filled by decreasing L_ii (= r_i², relevance), ties to the lower index.

Everything is batched: visual tokens are gathered into a padded [B, N, d] tensor, the k greedy
steps loop once for the whole batch (samples with fewer tokens or a smaller budget ignore their
extra steps); no per-sample loop. Selection runs under ``no_grad``; gradients reach the kept
tokens through ``SeqState.select``.

Knobs: ``layer``, ``keep``, ``theta``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtc.compressors.base import LLMCompressor
from vtc.errors import ConfigError
from vtc.model.sequence import SeqState


def dpp_greedy(kernel: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """Greedy MAP of a DPP with the fast Cholesky updates of Chen et al. (2018), batched.

    kernel [B, N, N] PSD, k [B] picks per sample, valid [B, N] the real candidates (default all).
    Returns [B, max k] indices in pick order, −1 beyond a sample's ``k``. A sample's pick count
    is min(k, #valid) in effect (extra steps after its candidates run out are −1 too)."""
    B, N, _ = kernel.shape
    dev = kernel.device
    L = kernel.float()
    valid = torch.ones(B, N, dtype=torch.bool, device=dev) if valid is None else valid.bool()
    k = torch.minimum(k.to(dev), valid.sum(1))
    K = int(k.max()) if B else 0
    rows = torch.arange(B, device=dev)
    diag = torch.diagonal(L, dim1=1, dim2=2).clone()
    floor = eps * diag.masked_fill(~valid, 0).amax(1).clamp_min(torch.finfo(torch.float32).tiny)  # [B]
    d2 = diag.clone()  # Cholesky residuals d_j²
    blocked = ~valid
    filling = torch.zeros(B, dtype=torch.bool, device=dev)
    any_filling = False
    C = L.new_zeros(K, B, N)
    picks = torch.full((B, K), -1, dtype=torch.long, device=dev)
    # Few tensor ops per step: at LLaVA's 576 tokens and 64-192 picks the loop's cost is op dispatch.
    for t in range(K):
        best, j = d2.masked_fill(blocked, float("-inf")).max(1)
        degenerate = best <= floor
        if any_filling or bool(degenerate.any()):  # residuals only shrink: once degenerate, a sample stays so
            filling |= degenerate
            any_filling = True
            j = torch.where(filling, diag.masked_fill(blocked, float("-inf")).argmax(1), j)
            best = d2[rows, j]
        row = L[rows, j]
        if t:
            row = row - torch.einsum("tb,tbn->bn", C[:t, rows, j], C[:t])
        e = row * best.clamp_min(floor).rsqrt()[:, None]
        if any_filling:
            e = e.masked_fill(filling[:, None], 0.0)
        C[t] = e
        d2 = (d2 - e * e).clamp_min_(0)
        picks[:, t] = j
        blocked[rows, j] = True
    # A sample's steps beyond its own k are not picks.
    return picks.masked_fill(torch.arange(K, device=dev)[None] >= k[:, None], -1)


def relevance(visual: torch.Tensor, instruction: torch.Tensor, valid: torch.Tensor, negate: bool = False,
              theta: float | None = None) -> torch.Tensor:
    """r [B, N]: min-max normalised cos(x_i, t) over each sample's valid tokens (module docstring);
    ``theta`` applies exp(α (r − 1)), α = θ / (2 (1 − θ)). Padding gets 0."""
    c = F.cosine_similarity(visual.float(), instruction.float()[:, None], dim=-1)
    if negate:
        c = -c
    lo = c.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    hi = c.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    r = (c - lo + 1e-6) / (hi - lo).clamp_min(1e-6)
    if theta is not None:
        alpha = theta / (2 * (1 - theta))
        r = torch.exp(alpha * (r - 1))
    return r.masked_fill(~valid, 0.0)


def conditional_kernel(visual: torch.Tensor, r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """L = diag(r) · S · diag(r), S the cosine similarity of ``visual`` [B, N, d]; zero off ``valid``."""
    x = F.normalize(visual.float(), dim=-1)
    S = x @ x.transpose(1, 2)
    L = r[:, :, None] * S * r[:, None, :]
    m = valid[:, :, None] & valid[:, None, :]
    return L.masked_fill(~m, 0.0)


class CDPruner(LLMCompressor):
    knobs: ClassVar[tuple[str, ...]] = ("layer", "keep", "theta")

    def __init__(self, layer: int | None = 0, keep: int = 64, theta: float | None = None, negate: bool = False,
                 positions: str = "compact", eps: float = 1e-6):
        super().__init__(layer)
        self.keep = keep
        self.theta = theta
        self.negate = negate
        self.positions = positions
        self.eps = eps

    # -- configuration ---------------------------------------------------------------------------
    def check(self, encoder, llm_layers: int) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 1:
            raise ConfigError("compressor.keep", f"the visual tokens kept per sample must be a positive integer, got "
                              f"{self.keep!r} (LLaVA-1.5: 64, 128 or 192 of 576; compressor=none keeps all)")
        th = self.theta
        if th is not None and (isinstance(th, bool) or not isinstance(th, (int, float)) or not 0 <= th < 1):
            raise ConfigError("compressor.theta", f"the relevance/diversity trade-off must be in [0, 1) or null "
                              f"(off: the kernel diag(r)·S·diag(r), their default), got {th!r}")
        if not isinstance(self.negate, bool):
            raise ConfigError("compressor.negate", f"must be true or false, got {self.negate!r}")
        if self.positions not in ("compact", "keep"):
            raise ConfigError("compressor.positions", f"must be 'compact' (renumber, as their pre-LLM pruning) or "
                              f"'keep' (original positions), got {self.positions!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ConfigError("compressor.eps", "the relative Cholesky residual floor must be in (0, 1), "
                              f"got {self.eps!r}")
        super().check(encoder, llm_layers)
        if self.positions == "compact" and self.layer not in (0, None):
            raise ConfigError("compressor.positions", f"'compact' renumbers positions, which only layer 0 can do "
                              f"(layers before {self.layer} cached the unpruned positions); set compressor.layer=0 "
                              "or compressor.positions=keep")

    def budget_knobs(self, tokens: int, n: int, encoder) -> dict:
        return {"keep": max(1, min(int(tokens), n))}

    def kept(self, n: int) -> int:
        return min(self.keep, n)

    def own_flops(self, n: int) -> float:
        """Per image of n visual tokens entering the LLM, d the LLM width (``llm_hidden``, set by
        setup), k = min(keep, n), a multiply-add = 2: unit-normalising the tokens 3·n·d; their dots
        with t 2·n·d; the Gram matrix S 2·n²·d; L = r_i·S_ij·r_j 2·n²; greedy step t (0-based): the
        dots c_jᵀC over t rows for every candidate 2·t·n, then subtract, divide, square-and-
        subtract and argmax ~5·n, summing to n·k·(k−1) + 5·n·k. The instruction mean (a few text
        tokens) is left out. LLaVA-1.5-7B, n=576, k=64: 2.73 GFLOPs, 99% of it the Gram matrix."""
        if not self.compressing():
            return 0.0
        d, k = self.llm_hidden, self.kept(n)
        return float(5 * n * d + 2 * n * n * d + 2 * n * n + n * k * (k - 1) + 5 * n * k)

    # -- the method ------------------------------------------------------------------------------
    def select(self, state: SeqState) -> torch.Tensor:
        """The kept-token mask [B, T]: every real text token and each sample's DPP picks."""
        real = state.attention_mask.bool()
        vis = state.visual_mask & real
        text = real & ~vis
        counts = vis.sum(1)
        N = int(counts.max()) if counts.numel() else 0
        if N == 0:
            return real
        B, T, _ = state.hidden.shape
        ar = torch.arange(T, device=real.device)
        idx = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, :N]  # visual positions first, in order
        valid = torch.arange(N, device=real.device)[None] < counts[:, None]
        h = state.hidden.detach().float()
        visual = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        last_vis = torch.where(vis, ar, -1).amax(1, keepdim=True)
        q = state.query_index[:, None]
        instr = text & (ar > last_vis) & (ar <= q)
        instr = torch.where(instr.any(1, keepdim=True), instr, text & (ar <= q))
        w = instr.float()
        t = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        r = relevance(visual, t, valid, self.negate, self.theta)
        L = conditional_kernel(visual, r, valid)
        k = torch.clamp(counts, max=self.keep)
        picks = dpp_greedy(L, k, valid, self.eps)
        chosen = torch.zeros(B, N + 1, dtype=torch.bool, device=real.device)
        chosen.scatter_(1, torch.where(picks >= 0, picks, N), True)  # −1 goes to the spare column
        keep_vis = torch.zeros_like(vis).scatter(1, idx, chosen[:, :N] & valid)
        return text | (keep_vis & vis)

    def compress(self, state: SeqState, at) -> SeqState:
        with torch.no_grad():
            keep = self.select(state)
        if self.positions == "compact":
            dropped = (state.attention_mask.bool() & ~keep).long().cumsum(1)
            state = replace(state, position_ids=state.position_ids - dropped)
        return state.select(keep)
