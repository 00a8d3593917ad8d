"""Analytic FLOPs for LLaVA-style models with compressed visual tokens.

Pure arithmetic on shapes: no weights, no torch. Every number this module returns follows one
convention, stated here once and to be quoted wherever a number from it is reported:

* **FLOPs = 2 x MACs** (one multiply-accumulate = two floating-point operations).
* **Forward pass only.** A training step is taken as **3 x forward** for a fully trainable
  model (backward = 2 x forward: gradients w.r.t. activations and w.r.t. weights);
  :func:`train_step_flops` refines this for frozen parts (1x or 2x, see there).
* **Counted:** every matrix multiply with a weight (q/k/v/o projections, FFN, projector MLP,
  LM head) and the two attention products, scores ``Q @ K^T`` and ``P @ V``.
  Attention is counted over the full ``n x kv_len`` score matrix even when it is causal (a
  dense SDPA kernel computes all of it; flash kernels skip roughly half, which this module
  does not model).
* **Ignored:** softmax, norms, activations, residual adds, biases, rotary embeddings, the
  token embedding lookup, the ViT patch embedding (a conv: 576 x 588 x 1024 MACs for
  CLIP-L/14-336, ~0.3 GMACs), the compressors' own work (pooling, scoring) and ViT pooling
  heads. These are each below a few percent of a layer.
* Counts are **per sample** (one image, one sequence); multiply by the batch size.

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

"Equivalent visual tokens" = the mean over LLM layers of the visual tokens each layer saw
(design.md's convention): a model that keeps ``L_after`` tokens after layer K of N has
``(K·L + (N−K)·L_after)/N``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

__all__ = [
    "FLOPS_PER_MAC",
    "TRAIN_STEP_MULTIPLIER",
    "llm_layer_macs",
    "vit_layer_macs",
    "projector_macs",
    "lm_head_macs",
    "ModelShape",
    "LLAVA_15_7B",
    "forward_flops",
    "train_step_flops",
    "visual_tokens_per_layer",
    "llavolta_cr",
    "llavolta_visual_tokens_per_layer",
    "fastv_visual_tokens_per_layer",
    "fastv_llm_flops_ratio",
    "format_flops",
    "format_table",
]

FLOPS_PER_MAC = 2
"""FLOPs = 2 x MACs."""

TRAIN_STEP_MULTIPLIER = 3
"""A training step of a fully trainable model = 3 x its forward FLOPs (forward + 2x backward)."""


# --------------------------------------------------------------------------------------------
# Per-layer MACs
# --------------------------------------------------------------------------------------------


def _check_nonneg(**kw: int) -> None:
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
    _check_nonneg(n=n, d=d, m=m, kv_len=kv_len)
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
    _check_nonneg(n=n, d=d, m=m, n_mlp=n_mlp)
    return 4 * n * d * d + 2 * n * n * d + 2 * n_mlp * d * m


def projector_macs(n: int, dims: Sequence[int]) -> int:
    """MACs of an MLP chain ``Linear(dims[0]→dims[1]) … Linear(dims[-2]→dims[-1])`` on ``n`` tokens.

    LLaVA-1.5's mlp2x_gelu is ``[1024, 4096, 4096]``; a linear projector is ``[1024, 4096]``;
    LLaVA-STF's STF head is ``[4096, 16384, 4096]`` on 144 tokens.
    """
    _check_nonneg(n=n)
    dims = list(dims)
    if len(dims) < 2:
        raise ValueError(f"projector dims need at least an input and an output width, got {dims}")
    return n * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def lm_head_macs(n: int, d: int, vocab: int) -> int:
    """MACs of the LM head on ``n`` positions: ``n·d·vocab``."""
    _check_nonneg(n=n, d=d, vocab=vocab)
    return n * d * vocab


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


def _as_obj(cfg: Any) -> Any:
    """Accept HF config objects, plain dicts and OmegaConf DictConfigs alike."""
    if isinstance(cfg, Mapping):
        return SimpleNamespace(**{str(k): v for k, v in cfg.items()})
    return cfg


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        v = getattr(cfg, name, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide a LLaVA-style model's FLOPs.

    Vision tower: ``vision_layers`` encoder layers of width ``vision_d``, MLP ``vision_m``, on
    ``vision_tokens`` tokens per image *including* ``vision_prefix`` prefix tokens (CLS), which
    are dropped before the projector (LLaVA: 577 = 576 patches + CLS, 576 reach the projector).
    ``vision_layers`` counts the layers that are *run*: LLaVA's released code and HF's
    ``LlavaForConditionalGeneration`` run all 24 CLIP layers and read layer −2's output; an
    encoder truncated after the feature layer runs 23 (``dataclasses.replace(s,
    vision_layers=23)``). ``vision_layers=0`` leaves the tower out (cached features).

    LLM: ``llm_layers`` decoder layers, hidden ``llm_d``, FFN ``llm_m``, ``llm_heads`` query
    heads, ``llm_kv_heads`` k/v heads, ``vocab``; ``include_lm_head`` adds the LM head.
    """

    vision_layers: int
    vision_d: int
    vision_m: int
    vision_tokens: int
    projector_dims: tuple[int, ...]
    llm_layers: int
    llm_d: int
    llm_m: int
    llm_heads: int
    llm_kv_heads: int
    vocab: int
    vision_prefix: int = 1
    llm_head_dim: int | None = None
    llm_ffn: str = "swiglu"
    include_lm_head: bool = True
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "projector_dims", tuple(int(x) for x in self.projector_dims))
        if len(self.projector_dims) < 2:
            raise ValueError(f"projector_dims needs >= 2 widths, got {self.projector_dims}")
        if self.vision_prefix > self.vision_tokens:
            raise ValueError("vision_prefix cannot exceed vision_tokens")
        # validates heads/kv heads/head_dim once, up front
        llm_layer_macs(1, self.llm_d, self.llm_m, self.llm_kv_heads, self.llm_heads,
                       self.llm_ffn, head_dim=self.llm_head_dim)

    @property
    def vision_patches(self) -> int:
        """Tokens per image that leave the encoder for the projector (prefix/CLS dropped)."""
        return self.vision_tokens - self.vision_prefix

    @classmethod
    def from_hf_configs(
        cls,
        vision_config: Any,
        text_config: Any,
        projector_dims: Sequence[int] | None = None,
        *,
        include_lm_head: bool = True,
        name: str = "",
    ) -> ModelShape:
        """Build from HF configs (objects, dicts or DictConfigs).

        Vision: ``CLIPVisionConfig`` or ``SiglipVisionConfig`` (a composite ``CLIPConfig``/
        ``SiglipConfig`` is unwrapped through ``.vision_config``). Tokens per image =
        ``(image_size // patch_size)²`` plus one CLS for CLIP (``model_type`` containing
        ``clip``); SigLIP has no CLS (its attention-pooling head is not used by LLaVA-style
        models and is not counted).

        Text: ``LlamaConfig``/``Qwen2Config``/``MistralConfig``-like: ``num_hidden_layers``,
        ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
        ``num_key_value_heads`` (default = heads), ``head_dim`` (default d/heads),
        ``vocab_size``. These families all use a gated (SwiGLU) MLP.

        ``projector_dims`` default: LLaVA-1.5's mlp2x_gelu, ``[vision_d, llm_d, llm_d]``.
        """
        v = _as_obj(vision_config)
        if _get(v, "vision_config") is not None:
            v = _as_obj(v.vision_config)
        t = _as_obj(text_config)
        if _get(t, "text_config") is not None:
            t = _as_obj(t.text_config)

        image_size = _get(v, "image_size")
        patch_size = _get(v, "patch_size")
        if image_size is None or patch_size is None:
            raise ValueError("vision config needs image_size and patch_size")
        side = int(image_size) // int(patch_size)
        model_type = str(_get(v, "model_type", default="")).lower()
        prefix = 1 if "clip" in model_type else 0
        vd = int(_get(v, "hidden_size"))
        td = int(_get(t, "hidden_size"))
        heads = int(_get(t, "num_attention_heads"))
        kv_heads = int(_get(t, "num_key_value_heads", default=heads))
        head_dim = _get(t, "head_dim")
        if head_dim is not None and int(head_dim) * heads == td:
            head_dim = None  # the default, keep the shape canonical
        return cls(
            vision_layers=int(_get(v, "num_hidden_layers")),
            vision_d=vd,
            vision_m=int(_get(v, "intermediate_size")),
            vision_tokens=side * side + prefix,
            vision_prefix=prefix,
            projector_dims=tuple(projector_dims) if projector_dims is not None else (vd, td, td),
            llm_layers=int(_get(t, "num_hidden_layers")),
            llm_d=td,
            llm_m=int(_get(t, "intermediate_size")),
            llm_heads=heads,
            llm_kv_heads=kv_heads,
            llm_head_dim=None if head_dim is None else int(head_dim),
            vocab=int(_get(t, "vocab_size")),
            include_lm_head=include_lm_head,
            name=name,
        )


LLAVA_15_7B = ModelShape(
    # CLIP ViT-L/14-336: 24 layers, d 1024, MLP 4096, (336/14)² = 576 patches + CLS.
    vision_layers=24,
    vision_d=1024,
    vision_m=4096,
    vision_tokens=577,
    vision_prefix=1,
    # mlp2x_gelu
    projector_dims=(1024, 4096, 4096),
    # Vicuna-7B v1.5 (LLaMA-2-7B): 32 layers, d 4096, FFN 11008, 32 heads (MHA), vocab 32000.
    llm_layers=32,
    llm_d=4096,
    llm_m=11008,
    llm_heads=32,
    llm_kv_heads=32,
    vocab=32000,
    name="llava-1.5-7b",
)
"""LLaVA-1.5-7B: CLIP-L/14-336 + mlp2x_gelu + Vicuna-7B."""


# --------------------------------------------------------------------------------------------
# Whole forward pass
# --------------------------------------------------------------------------------------------


def forward_flops(
    shape: ModelShape,
    text_tokens: int,
    visual_tokens_per_layer: Sequence[int],
    vision_tokens_per_layer: Sequence[int | tuple[int, int]] | None = None,
    projector_tokens: int | None = None,
    lm_head_tokens: int | None = None,
) -> dict[str, float]:
    """Forward FLOPs of one sample (one image), split by component.

    Args:
        shape: the model.
        text_tokens: non-visual tokens in the sequence (system prompt, instruction, answer,
            image markers). Never compressed.
        visual_tokens_per_layer: visual tokens that LLM layer i sees, one entry per LLM layer
            (``len == shape.llm_layers``). Layer i runs on ``text_tokens + v[i]`` tokens.
        vision_tokens_per_layer: tokens that encoder layer j runs on (prefix/CLS included),
            one entry per encoder layer run (at most ``shape.vision_layers``; fewer when the
            tower is truncated). An entry may be a pair ``(attention tokens, MLP tokens)`` for a
            layer that merges between the two (ToMe). Default: ``shape.vision_tokens`` in all
            ``shape.vision_layers`` layers (no in-encoder compression).
        projector_tokens: tokens through the projector. Default: what leaves the encoder,
            ``vision_tokens_per_layer[-1] − shape.vision_prefix`` (576 for LLaVA-1.5). A
            compressor at the "pre_llm" site that runs before the projector (2-D pooling,
            STF) must pass its output count; one that runs after the projector (LLaVolta at
            K=0) leaves the default.
        lm_head_tokens: positions whose logits are computed. Default: every position of the
            last layer, ``text_tokens + v[-1]`` (a training/eval forward that computes all
            logits). Prefill before generation needs only the last position: pass 1.

    Returns:
        ``{'vision', 'projector', 'llm', 'lm_head', 'total'}`` in FLOPs (= 2 x MACs, forward
        only), plus ``'equivalent_visual_tokens'`` (mean visual tokens over LLM layers; not a
        FLOP count).
    """
    _check_nonneg(text_tokens=text_tokens, projector_tokens=projector_tokens,
                  lm_head_tokens=lm_head_tokens)
    v_llm = [int(x) for x in visual_tokens_per_layer]
    if len(v_llm) != shape.llm_layers:
        raise ValueError(
            f"visual_tokens_per_layer has {len(v_llm)} entries, the LLM has {shape.llm_layers} layers"
        )
    if any(x < 0 for x in v_llm):
        raise ValueError("visual token counts must be >= 0")

    if vision_tokens_per_layer is None:
        v_enc = [(shape.vision_tokens, shape.vision_tokens)] * shape.vision_layers
    else:
        v_enc = [(int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))
                 for x in vision_tokens_per_layer]
        if len(v_enc) > shape.vision_layers:
            raise ValueError(
                f"vision_tokens_per_layer has {len(v_enc)} entries, the encoder has "
                f"{shape.vision_layers} layers"
            )
        if any(a < 0 or b < 0 for a, b in v_enc):
            raise ValueError("vision token counts must be >= 0")

    if projector_tokens is None:
        projector_tokens = (v_enc[-1][1] if v_enc else shape.vision_tokens) - shape.vision_prefix
        projector_tokens = max(projector_tokens, 0)

    vision = FLOPS_PER_MAC * sum(vit_layer_macs(a, shape.vision_d, shape.vision_m, b) for a, b in v_enc)
    projector = FLOPS_PER_MAC * projector_macs(projector_tokens, shape.projector_dims)
    llm = FLOPS_PER_MAC * sum(
        llm_layer_macs(
            text_tokens + v,
            shape.llm_d,
            shape.llm_m,
            n_kv_heads=shape.llm_kv_heads,
            n_heads=shape.llm_heads,
            ffn=shape.llm_ffn,
            head_dim=shape.llm_head_dim,
        )
        for v in v_llm
    )
    if shape.include_lm_head:
        n_logits = (text_tokens + v_llm[-1]) if lm_head_tokens is None else lm_head_tokens
        lm_head = FLOPS_PER_MAC * lm_head_macs(n_logits, shape.llm_d, shape.vocab)
    else:
        lm_head = 0
    return {
        "vision": vision,
        "projector": projector,
        "llm": llm,
        "lm_head": lm_head,
        "total": vision + projector + llm + lm_head,
        "equivalent_visual_tokens": sum(v_llm) / len(v_llm) if v_llm else 0.0,
    }


_COMPONENTS = ("vision", "projector", "llm", "lm_head")


def train_step_flops(forward: Mapping[str, float], frozen: Sequence[str] = ()) -> float:
    """FLOPs of one training step from :func:`forward_flops`'s split.

    Convention: a trainable component costs 3x its forward (forward, gradient w.r.t. its
    input, gradient w.r.t. its weights, each ~1x). A frozen component costs 2x when some
    component before it (in the order vision → projector → llm → lm_head) is trainable
    (gradients must flow back through it), and 1x when nothing before it is trainable (no
    backward at all). The input-gradient of the first trainable component is counted too
    (a slight over-count by one projector input matmul). ``frozen=()`` gives the plain
    ``3 x forward``. LLaVA pretraining: ``frozen=('vision', 'llm', 'lm_head')``; LLaVA
    instruction tuning: ``frozen=('vision',)``.
    """
    unknown = set(frozen) - set(_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; expected some of {_COMPONENTS}")
    total = 0.0
    trainable_upstream = False
    for c in _COMPONENTS:
        f = forward[c]
        if c in frozen:
            total += (2 if trainable_upstream else 1) * f
        else:
            total += TRAIN_STEP_MULTIPLIER * f
            trainable_upstream = True
    return total


# --------------------------------------------------------------------------------------------
# Token schedules of the compression methods
# --------------------------------------------------------------------------------------------


def visual_tokens_per_layer(N: int, L: int, K: int, L_after: int) -> list[int]:
    """``L`` visual tokens in LLM layers ``< K``, ``L_after`` in layers ``>= K`` (N layers)."""
    if not 0 <= K <= N:
        raise ValueError(f"K must be in [0, N={N}], got {K}")
    _check_nonneg(L=L, L_after=L_after)
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
    and f the per-layer cost of :func:`llm_layer_macs`. Vision tower, projector and LM head
    are left out (they are the same on both sides). ``ffn`` overrides the shape's FFN kind
    (``'gelu'`` gives the plain ``2ndm`` FFN term instead of SwiGLU's ``3ndm``).

    The ratio depends on the text length, which is never pruned. LLaVA-1.5-7B, L=576, K=2,
    R=0.5: 0 text tokens -> 0.526, 35 -> 0.553, 64 -> 0.572, 128 -> 0.610 (SwiGLU; the 2ndm
    FFN gives ~0.002 less). FastV's headline "45% theoretical FLOPs reduction" (ratio 0.55)
    thus corresponds to a short prompt of ~35 text tokens.
    """
    if ffn is not None:
        from dataclasses import replace

        shape = replace(shape, llm_ffn=ffn)
    full = forward_flops(shape, text_tokens, [L] * shape.llm_layers)["llm"]
    pruned = forward_flops(
        shape, text_tokens, fastv_visual_tokens_per_layer(shape.llm_layers, L, K, R)
    )["llm"]
    return pruned / full


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_flops(x: float) -> str:
    """``1.23e12`` -> ``'1.23 T'`` (SI prefixes, FLOPs)."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}"
    return f"{x:.0f}"


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return format_flops(v) if abs(v) >= 1e6 else str(v)
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return format_flops(v)
        return f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts); columns = ``columns`` or the union of the keys in
    first-seen order. Numbers >= 1e6 are printed with SI prefixes (``'1.23 T'``), other floats
    with 4 significant digits; text columns are left-aligned, numeric ones right-aligned.
    """
    rows = list(rows)
    if columns is None:
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(str(k))
    else:
        cols = list(columns)
    if not cols:
        return ""
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    numeric = [
        all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
            for r in rows if r.get(c) is not None)
        for c in cols
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(vals: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cols), sep] + [line(r) for r in cells])


if __name__ == "__main__":  # python -m vtc.flops [hydra overrides] [compressors=a,b] [text_tokens=N]
    from vtc.flops_cli import main

    main()
