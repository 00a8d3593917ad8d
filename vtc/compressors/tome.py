"""Token Merging (ToMe) inside the vision encoder.

Paper: Bolya et al., "Token Merging: Your ViT But Faster", arXiv 2210.09461 (ICLR 2023), Sec. 3
("Token Merging", "Bipartite Soft Matching", "Tracking Token Size") and the released code
(github.com/facebookresearch/ToMe: ``tome/merge.py`` ``bipartite_soft_matching`` /
``merge_wavg``, ``tome/patch/timm.py`` ``ToMeBlock`` / ``ToMeAttention``).

Where. In every encoder block from ``start`` on, *between the attention and the MLP branch*
(the paper's placement, "in contrast to prior works, which place their reduction at the start of
the block"): ``h = h + Attn(LN1(h)); merge r tokens of h; h = h + MLP(LN2(h))``, so the MLP of a
merging block already runs on r fewer tokens. The block is run from the HF layer's own
sub-modules (``layer_norm1``, ``self_attn``, ``layer_norm2``, ``mlp``: the same four calls as
``CLIPEncoderLayer.forward`` / ``SiglipEncoderLayer.forward`` in transformers 5.x); blocks that
merge nothing are called whole, ``layer(h, mask)``.

Bipartite soft matching (one step, ``bipartite_merge``). With metric k_i = the block's attention
keys averaged over heads (``ToMeAttention`` returns ``k.mean(1)``), taken from the k_proj output
the attention itself computes (a forward hook; no second k_proj):
  1. alternate the tokens into A = {0, 2, 4, ...} and B = {1, 3, 5, ...};
  2. for each a in A its most similar b in B by cosine, s_a = max_b cos(k_a, k_b); the CLS token
     (A's first element) gets s = −inf, so it is never merged;
  3. the r edges with the largest s_a are merged: b's new value is the size-weighted average
         x_b' = (s_b·x_b + Σ_{a→b} s_a·x_a) / (s_b + Σ_{a→b} s_a),   size_b' = s_b + Σ_{a→b} s_a
     (``merge_wavg``: merge(x·size, sum) / merge(size, sum)); unmerged A tokens keep their value;
  4. the output is [unmerged A tokens in index order (CLS first), then all B tokens]. (The
     released code index-sorts the unmerged A tokens only when there is a CLS; we always do, so
     an encoder without CLS gets the same token set in a spatially ordered sequence.)
r is capped at (T − protected) // 2 per block (at most half the tokens), as in the paper.
Matching runs under ``no_grad`` as in the released code; gradients flow through the merge.

Proportional attention (Sec. 3, Eq. 1):  A = softmax(q·kᵀ/√d + log s), s the row vector of
token sizes: every key counts as the number of patches it stands for. It is passed to the HF
attention as an additive float mask [B, 1, 1, T] = log(size); transformers' SDPA path hands a
float mask to ``torch.nn.functional.scaled_dot_product_attention`` as ``attn_mask`` (added to
the scaled logits) and the eager path adds it before the softmax, so SDPA stays on (a float bias
rules out the flash kernel, not the memory-efficient one). Before the first merge all sizes are 1
and no mask is passed. ``flash_attention_2`` cannot take a bias: with ``prop_attn`` it is
rejected when the encoder is run.

Defaults and knobs. ``r`` = 8 tokens per block, one of the paper's reported settings (it picks r
per model and speed target, e.g. r = 8/13/16 for DeiT-S; LLaVA-1.5 has no paper default), with
proportional attention on (``prop_attn=True``: the released ``apply_patch`` default, advised for
off-the-shelf models such as a frozen CLIP);
or ``tokens``, a target number of patch tokens leaving the encoder, which overrides ``r``: the
n − tokens merges are spread over the merging blocks as evenly as the per-block cap allows
(earlier blocks take the remainder). Both are knobs; ``start`` is the first merging block
(0-based). For LLaVA-1.5 (CLIP-L/14-336, 577 tokens, 23 blocks run for layer −2) r = 8 leaves
577 − 23·8 = 393 tokens, 392 patch tokens.

Counting. Every image loses the same number of tokens, so ``tokens_out(n)`` is exact and the
batch stays a tensor. ``encoder_tokens_per_layer(n)`` gives the tokens each run encoder block's
attention sees (for encoder FLOPs; its MLP sees r fewer). The features leave with
``EncoderOutput.grid = None`` (merged tokens have no grid), so grid-based methods cannot follow.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from vtc.compressors.base import Compressor
from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int,
                    protect_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One ToMe step. x [B, T, C], size [B, T, 1] (float32), metric [B, T, c] -> (x', size')
    with T − r tokens. ``protect_first``: token 0 (CLS) is never merged."""
    B, T, C = x.shape
    protected = 1 if protect_first else 0
    r = min(r, (T - protected) // 2)
    if r <= 0:
        return x, size
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True)
        scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, |A|, |B|]
        if protect_first:
            scores[:, 0, :] = float("-inf")
        node_max, node_idx = scores.max(dim=-1)
        edge = node_max.argsort(dim=-1, descending=True, stable=True)
        src = edge[:, :r]  # A tokens merged away
        unm = edge[:, r:].sort(dim=-1).values  # A tokens kept, in index order
        dst = node_idx.gather(1, src)  # their B partners
    xs = x.float() * size
    xa, xb = xs[:, ::2], xs[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    out_a = xa.gather(1, unm[..., None].expand(-1, -1, C))
    size_a = sa.gather(1, unm[..., None])
    xb = xb.scatter_add(1, dst[..., None].expand(-1, -1, C), xa.gather(1, src[..., None].expand(-1, -1, C)))
    sb = sb.scatter_add(1, dst[..., None], sa.gather(1, src[..., None]))
    new_size = torch.cat([size_a, sb], dim=1)
    new_x = torch.cat([out_a, xb], dim=1) / new_size
    return new_x.to(x.dtype), new_size


def merge_schedule(n_tokens: int, protected: int, n_blocks: int, r: int | None, target: int | None) -> list[int]:
    """Tokens merged in each of ``n_blocks`` merging blocks for ``n_tokens`` tokens (CLS included).

    ``target`` (patch tokens to leave) overrides the constant ``r``. Raises ``ValueError`` when
    the target cannot be reached under the at-most-half-per-block cap."""
    t = n_tokens
    out = []
    if target is None:
        for _ in range(n_blocks):
            k = max(0, min(int(r or 0), (t - protected) // 2))
            out.append(k)
            t -= k
        return out
    left = (n_tokens - protected) - target
    for i in range(n_blocks):
        want = -(-left // (n_blocks - i)) if left > 0 else 0  # ceil: earlier blocks take the remainder
        k = min(want, (t - protected) // 2)
        out.append(k)
        t -= k
        left -= k
    if left > 0:
        raise ValueError(f"cannot merge down to {target} patch tokens in {n_blocks} blocks "
                         f"(at most half the tokens per block); reachable: {t - protected}")
    return out


@dataclass
class _Ctx:
    schedule: list[int]
    protect_first: bool
    size: torch.Tensor | None = None  # [B, T, 1] float32, None while every size is 1
    merged: list[int] = field(default_factory=list)


class ToMe(Compressor):
    site: ClassVar[str] = "vision"
    knobs: ClassVar[tuple[str, ...]] = ("r", "tokens")
    reads_layer_weights: ClassVar[bool] = True  # runs each block's attention and MLP itself

    def __init__(self, r: int | None = 8, tokens: int | None = None, start: int = 0, prop_attn: bool = True):
        super().__init__()
        self.r = r
        self.tokens = tokens
        self.start = start
        self.prop_attn = prop_attn
        self._info: EncoderInfo | None = None
        #: sizes [B, T, 1] after the last run block of the latest forward (for inspection/tests)
        self.last_sizes: torch.Tensor | None = None

    # -- configuration --------------------------------------------------------------------------
    def _schedule(self, info: EncoderInfo, n_patches: int) -> list[int]:
        """Merges per block for ``n_patches`` patch tokens: zeros before ``start``, then the plan."""
        prefix = 1 if info.has_cls else 0
        run = info.layer_index(info.select_layer)
        blocks = max(0, run - self.start)
        return [0] * min(self.start, run) + merge_schedule(n_patches + prefix, prefix, blocks, self.r, self.tokens)

    def schedule_for(self, info: EncoderInfo) -> list[int]:
        """Tokens merged in each encoder block run (0-based), for the encoder's own patch count."""
        return self._schedule(info, info.num_patches)

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        if self.tokens is None and (self.r is None or not isinstance(self.r, int) or self.r < 0):
            raise ConfigError("compressor.r", f"must be a non-negative integer (or set compressor.tokens), got {self.r!r}")
        run = encoder.layer_index(encoder.select_layer)
        if not isinstance(self.start, int) or not 0 <= self.start < max(run, 1):
            raise ConfigError("compressor.start", f"{self.start!r} is not one of the {run} encoder blocks run (0..{run - 1})")
        if self.tokens is not None:
            if not isinstance(self.tokens, int) or not 1 <= self.tokens <= encoder.num_patches:
                raise ConfigError("compressor.tokens", f"must be an integer in 1..{encoder.num_patches}, got {self.tokens!r}")
            try:
                self.schedule_for(encoder)
            except ValueError as e:
                raise ConfigError("compressor.tokens", str(e)) from None

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self._info = encoder

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        """``tokens`` patch tokens leaving the encoder (overrides r)."""
        return {"tokens": max(1, min(tokens, n))}

    def _setup_info(self) -> EncoderInfo:
        if self._info is None:
            raise RuntimeError("ToMe needs setup(encoder_info, ...) (done by LMM) before counting tokens")
        return self._info

    def tokens_out(self, n: int) -> int:
        return n - sum(self._schedule(self._setup_info(), n))

    def encoder_tokens_per_layer(self, n: int) -> list[int]:
        """Tokens (CLS included) that each run encoder block's attention sees, n patches in (its
        MLP sees the next entry's count: the merge sits between attention and MLP)."""
        info = self._setup_info()
        t = n + (1 if info.has_cls else 0)
        out = []
        for r in self._schedule(info, n):
            out.append(t)
            t -= r
        return out

    def encoder_tokens(self, n: int) -> list[tuple[int, int]]:
        """(attention, MLP) tokens per run block: each block's merge removes ``r`` tokens after its
        attention, so its MLP already runs on the reduced count."""
        attn = self.encoder_tokens_per_layer(n)
        return [(t, t - r) for t, r in zip(attn, self._schedule(self._setup_info(), n))]

    # -- the encoder hooks ----------------------------------------------------------------------
    def begin(self, h: torch.Tensor, encoder: nn.Module) -> _Ctx:
        info = encoder.info
        if self.prop_attn and encoder.model.config._attn_implementation == "flash_attention_2":
            raise ConfigError("compressor.prop_attn", "proportional attention adds log(size) to the logits, which "
                              "flash_attention_2 cannot; use encoder.attn_implementation=sdpa or prop_attn=false")
        if h.shape[1] != info.num_patches + (1 if info.has_cls else 0):
            raise RuntimeError(f"ToMe expects {info.num_patches} patch tokens, got {h.shape[1]}")
        self.last_sizes = None
        return _Ctx(schedule=self._schedule(info, info.num_patches), protect_first=info.has_cls)

    def layer_forward(self, i: int, layer: nn.Module, h: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        r = ctx.schedule[i] if i < len(ctx.schedule) else 0
        mask = None
        if self.prop_attn and ctx.size is not None:
            mask = ctx.size.log().to(h.dtype).transpose(1, 2)[:, None]  # [B, 1, 1, T]
        if r == 0:
            out = layer(h, mask)
        else:
            out = self._merging_block(layer, h, mask, r, ctx)
        ctx.merged.append(r)
        self.last_sizes = ctx.size
        return out

    def _merging_block(self, layer: nn.Module, h: torch.Tensor, mask, r: int, ctx: _Ctx) -> torch.Tensor:
        attn = layer.self_attn
        keys: list[torch.Tensor] = []
        handle = attn.k_proj.register_forward_hook(lambda _m, _a, out: keys.append(out))
        try:
            a, *_ = attn(hidden_states=layer.layer_norm1(h), attention_mask=mask)
        finally:
            handle.remove()
        h = h + a
        B, T, _ = h.shape
        metric = keys[-1].view(B, T, attn.num_heads, attn.head_dim).mean(2)  # keys, mean over heads
        size = ctx.size if ctx.size is not None else torch.ones(B, T, 1, device=h.device, dtype=torch.float32)
        h, ctx.size = bipartite_merge(h, size, metric, r, ctx.protect_first)
        return h + layer.mlp(layer.layer_norm2(h))

    def describe(self) -> str:
        what = f"tokens={self.tokens}" if self.tokens is not None else f"r={self.r}"
        return f"ToMe({what}, start={self.start}, prop_attn={self.prop_attn})"
