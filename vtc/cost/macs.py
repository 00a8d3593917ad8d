"""Per-operation MACs: one LLM decoder layer, one ViT encoder layer, a projector MLP chain, the LM head.

The building blocks of every count in :mod:`vtc.cost` (the convention, what is counted and what is
ignored, is stated once in :mod:`vtc.cost.flops`). Pure arithmetic on ints; multiply by
``FLOPS_PER_MAC`` for FLOPs.

Formulas (n tokens, hidden d, FFN width m), per layer:

* LLM decoder layer, SwiGLU (LLaMA/Vicuna/Qwen2)::

      MACs = 4·n·d² + 2·n²·d + 3·n·d·m

  This is the paper formula (FastV, LLaVolta; see /work/shared/design.md). ``4nd²`` is the
  q, k, v, o projections and assumes as many k/v heads as query heads. With grouped-query
  attention the k and v projections shrink to ``d_kv = n_kv_heads·head_dim`` columns, so the
  projections cost ``2·n·d·d_q + 2·n·d·d_kv`` with ``d_q = n_heads·head_dim`` (``= d`` for
  LLaMA-family models: ``2nd² + 2nd·d_kv``). The attention products cost ``2·n·kv_len·d_q``
  (``kv_len = n`` in prefill/training). A plain GELU FFN (``ffn='gelu'``) costs ``2·n·d·m``
  instead of the gated ``3·n·d·m``.
* ViT encoder layer (GELU MLP, CLIP/SigLIP): ``4·n·d² + 2·n²·d + 2·n·d·m``.
* Projector MLP chain ``dims = [d0, d1, ..., dk]`` on n tokens: ``n·Σ d_i·d_{i+1}``.
* LM head: ``n_logits·d·vocab``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "FLOPS_PER_MAC",
    "llm_layer_macs",
    "vit_layer_macs",
    "projector_macs",
    "lm_head_macs",
]

FLOPS_PER_MAC = 2
"""FLOPs = 2 x MACs."""


def check_nonneg(**kw: int) -> None:
    """Raise ValueError naming the first negative count (None = not given, allowed)."""
    for k, v in kw.items():
        if v is None:
            continue
        if v < 0:
            raise ValueError(f"{k} must be >= 0, got {v}")


def llm_layer_macs(
    n: int,
    d: int,
    m: int,
    n_kv_heads: int | None = None,
    n_heads: int | None = None,
    ffn: str = "swiglu",
    kv_len: int | None = None,
    head_dim: int | None = None,
) -> int:
    """MACs of one decoder layer on ``n`` query tokens (multiply by 2 for FLOPs).

    Default (``n_kv_heads`` is None or equals ``n_heads``, ``ffn='swiglu'``, ``kv_len=None``):
    the paper formula ``4·n·d² + 2·n²·d + 3·n·d·m``.

    Args:
        n: tokens that go through the layer (query rows).
        d: hidden size.
        m: FFN intermediate size.
        n_kv_heads, n_heads: for grouped-query attention. Both needed when they differ; the
            k and v projections then have ``n_kv_heads·head_dim`` output columns each.
        ffn: ``'swiglu'`` (gate, up, down: ``3·n·d·m``) or ``'gelu'`` (up, down: ``2·n·d·m``).
        kv_len: keys/values each query attends to. None: ``n`` (prefill, training). For a
            decode step with a KV cache, ``n`` new rows attend to ``kv_len`` keys
            (cache + new): attention products cost ``2·n·kv_len·d_q``.
        head_dim: per-head width; default ``d // n_heads`` (``d_q = d``). Only models whose
            ``n_heads·head_dim != d`` (e.g. Qwen3, Gemma) need it.
    """
    check_nonneg(n=n, d=d, m=m, kv_len=kv_len)
    if n_heads is None and head_dim is not None:
        raise ValueError("head_dim needs n_heads")
    if n_heads is None:
        if n_kv_heads is not None:
            raise ValueError("n_kv_heads needs n_heads (the k/v width is n_kv_heads·d/n_heads)")
        d_q = d_kv = d
    else:
        if head_dim is None:
            if d % n_heads:
                raise ValueError(f"d={d} is not divisible by n_heads={n_heads}; pass head_dim")
            head_dim = d // n_heads
        kvh = n_heads if n_kv_heads is None else n_kv_heads
        if kvh <= 0 or n_heads % kvh:
            raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={kvh}")
        d_q = n_heads * head_dim
        d_kv = kvh * head_dim
    kv = n if kv_len is None else kv_len

    # q and o: d <-> d_q; k and v: d -> d_kv. With d_q = d_kv = d this is 4nd².
    proj = 2 * n * d * d_q + 2 * n * d * d_kv
    # scores Q K^T and P V: each n x kv x d_q (K/V heads are shared across query groups, the
    # products still run per query head).
    attn = 2 * n * kv * d_q
    if ffn == "swiglu":
        mlp = 3 * n * d * m
    elif ffn == "gelu":
        mlp = 2 * n * d * m
    else:
        raise ValueError(f"ffn must be 'swiglu' or 'gelu', got {ffn!r}")
    return proj + attn + mlp


def vit_layer_macs(n: int, d: int, m: int, n_mlp: int | None = None) -> int:
    """MACs of one ViT encoder layer (MHA + GELU MLP) on ``n`` tokens: ``4nd² + 2n²d + 2ndm``.
    ``n_mlp``: tokens left for the MLP when the layer merges tokens between its attention and its
    MLP (ToMe): ``4nd² + 2n²d + 2·n_mlp·dm``."""
    n_mlp = n if n_mlp is None else n_mlp
    check_nonneg(n=n, d=d, m=m, n_mlp=n_mlp)
    return 4 * n * d * d + 2 * n * n * d + 2 * n_mlp * d * m


def projector_macs(n: int, dims: Sequence[int]) -> int:
    """MACs of an MLP chain ``Linear(dims[0]→dims[1]) … Linear(dims[-2]→dims[-1])`` on ``n`` tokens.

    LLaVA-1.5's mlp2x_gelu is ``[1024, 4096, 4096]``; a linear projector is ``[1024, 4096]``;
    LLaVA-STF's STF head is ``[4096, 16384, 4096]`` on 144 tokens.
    """
    check_nonneg(n=n)
    dims = list(dims)
    if len(dims) < 2:
        raise ValueError(f"projector dims need at least an input and an output width, got {dims}")
    return n * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def lm_head_macs(n: int, d: int, vocab: int) -> int:
    """MACs of the LM head on ``n`` positions: ``n·d·vocab``."""
    check_nonneg(n=n, d=d, vocab=vocab)
    return n * d * vocab
