"""Visual tokens per LLM layer under the compression methods' schedules, and the papers' closed forms.

LLaVolta (arXiv 2406.20092): pooling with stride S before layer K, and its compression ratio
:func:`llavolta_cr`. FastV (arXiv 2403.06764): drop a fraction R of the image tokens after layer K,
and its LLM FLOPs ratio :func:`fastv_llm_flops_ratio`. The per-layer lists feed
:func:`vtc.cost.flops.forward_flops`.
"""

from __future__ import annotations

import math
from dataclasses import replace

from vtc.cost.flops import forward_flops
from vtc.cost.macs import check_nonneg
from vtc.cost.shape import ModelShape

__all__ = [
    "visual_tokens_per_layer",
    "llavolta_cr",
    "llavolta_visual_tokens_per_layer",
    "fastv_visual_tokens_per_layer",
    "fastv_llm_flops_ratio",
]


def visual_tokens_per_layer(N: int, L: int, K: int, L_after: int) -> list[int]:
    """``L`` visual tokens in LLM layers ``< K``, ``L_after`` in layers ``>= K`` (N layers)."""
    if not 0 <= K <= N:
        raise ValueError(f"K must be in [0, N={N}], got {K}")
    check_nonneg(L=L, L_after=L_after)
    return [L] * K + [L_after] * (N - K)


def llavolta_cr(N: int, K: int, S: float, L: float | None = None) -> float:
    """LLaVolta's compression ratio (arXiv 2406.20092): ``CR = N·L / ((N−K)·L/S + K·L)``.

    N LLM layers, pooling with stride S before layer K, L visual tokens (it cancels: the
    result is ``N / ((N−K)/S + K)``; ``L`` is kept for the formula's sake). Uses ``L/S``
    exactly, so it is the ratio of token-layers, not of FLOPs (text tokens and the quadratic
    attention term are not in it). Example: N=32, K=2, S=8 -> 5.565 (557%).
    """
    if not 0 <= K <= N:
        raise ValueError(f"K must be in [0, N={N}], got {K}")
    if S <= 0:
        raise ValueError(f"S must be > 0, got {S}")
    L = 1.0 if L is None else float(L)
    return (N * L) / ((N - K) * L / S + K * L)


def llavolta_visual_tokens_per_layer(N: int, L: int, K: int, S: int) -> list[int]:
    """Visual tokens per LLM layer under LLaVolta pooling (kernel = stride = S before layer K).

    After pooling, ``L // S`` tokens (``avg_pool1d``'s default floor; exact for 576 and
    S in {2, 4, 8, 16}).
    """
    if S < 1:
        raise ValueError(f"S must be >= 1, got {S}")
    return visual_tokens_per_layer(N, L, K, L // S)


def fastv_visual_tokens_per_layer(N: int, L: int, K: int = 2, R: float = 0.5) -> list[int]:
    """Visual tokens per LLM layer under FastV (arXiv 2403.06764): after layer K, drop a
    fraction R of the image tokens (keep ``L − floor(R·L)``). Defaults are the paper's K=2,
    R=50%. Text tokens are never dropped.
    """
    if not 0.0 <= R <= 1.0:
        raise ValueError(f"R must be in [0, 1], got {R}")
    return visual_tokens_per_layer(N, L, K, L - math.floor(R * L))


def fastv_llm_flops_ratio(
    shape: ModelShape,
    text_tokens: int,
    L: int,
    K: int = 2,
    R: float = 0.5,
    ffn: str | None = None,
) -> float:
    """LLM-only prefill FLOPs of FastV divided by those of the unpruned model.

    ``(K·f(n) + (N−K)·f(n̂)) / (N·f(n))`` with ``n = text + L``, ``n̂ = text + L − floor(R·L)``
    and f the per-layer cost of :func:`vtc.cost.macs.llm_layer_macs`. Vision tower, projector and LM head
    are left out (they are the same on both sides). ``ffn`` overrides the shape's FFN kind
    (``'gelu'`` gives the plain ``2ndm`` FFN term instead of SwiGLU's ``3ndm``).

    The ratio depends on the text length, which is never pruned. LLaVA-1.5-7B, L=576, K=2,
    R=0.5: 0 text tokens -> 0.526, 35 -> 0.553, 64 -> 0.572, 128 -> 0.610 (SwiGLU; the 2ndm
    FFN gives ~0.002 less). FastV's headline "45% theoretical FLOPs reduction" (ratio 0.55)
    thus corresponds to a short prompt of ~35 text tokens.
    """
    if ffn is not None:
        shape = replace(shape, llm_ffn=ffn)
    full = forward_flops(shape, text_tokens, [L] * shape.llm_layers)["llm"]
    pruned = forward_flops(
        shape, text_tokens, fastv_visual_tokens_per_layer(shape.llm_layers, L, K, R)
    )["llm"]
    return pruned / full
