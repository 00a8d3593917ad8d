"""FastV: drop the image tokens that the last instruction token attends to least.

Paper: Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models" (FastV), arXiv 2403.06764, Sec. 4 (Eq. for the
pruned count and the ranking) and the released code (``fast_v_attention_rank`` in their
``modeling_llama.py``).

After layer K the image tokens are ranked by the attention they receive from the last token of
the prompt, averaged over heads,

    s_j = 1/H · Σ_h softmax_j( q_h(x_query) · k_h(x_j) / sqrt(d_h) ),   j an image token,

and the top ``n − floor(R·n)`` image tokens (n visual tokens of the sample, R the drop ratio) are
kept; every text token is kept. Paper defaults: K = 2, R = 50% (576 -> 288 tokens); the count is
``ceil((1 − R)·n)``, the same as ``vtc.cost.schedules.fastv_visual_tokens_per_layer``.

Where the score comes from (``score_at``). FastV's code runs layer K−1 with
``output_attentions=True`` and ranks the image tokens by that layer's map: the query is layer K−1's
RMS-normalised input projected by its q_proj, the keys its k_proj of every token, RoPE at each
token's position (LightCompress's port, ``fastv.py``, does the same with a pre-hook on block K−1).
vtc does not ask for the map (an eager T x T attention); it recomputes the one row needed from the
state layer K−1 consumed (``LayerContext.previous_input``) with layer K−1's weights, softmax over
the query's causal, unpadded keys — the same numbers, while SDPA / flash-attention stay on:
 - ``score_at: previous`` (default): layer K−1's row, as FastV's code;
 - ``score_at: current``: the row layer K itself would compute on its input (layer K−1's output),
   vtc's earlier rule, kept as a named option; the two differ (other weights, other hidden states).
K = 0 has no official counterpart (there is no layer before the first): both settings score the
input embeddings with layer 0's weights, i.e. "prune before the LLM by layer 0's attention".
GQA: key heads are repeated to the query heads before the head average, as the model's attention
does.

The query is ``SeqState.query_index``: the last instruction token (the token that predicts the
first answer token in training, the last prompt token in generation), so no answer token ever
influences which image tokens are kept.

Position ids: kept tokens keep their original positions (FastV's ``position_ids = keep_indexs``);
with a KV cache, decoding continues from the last prompt token's position.

Knobs: ``layer`` (K) and ``ratio`` (R).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from vtc.compressors.base import RatioPruner, kept_count  # noqa: F401  (kept_count re-exported)
from vtc.errors import ConfigError
from vtc.model.encoder import reshard_after_read, unshard_for_read
from vtc.model.sequence import LayerContext, SeqState


# -- recomputing what a decoder layer's attention would see ---------------------------------------

def _family_module(layer: nn.Module):
    return sys.modules[type(layer).__module__]


def _rope_fns(layer: nn.Module):
    """(apply_rotary_pos_emb, repeat_kv) of the layer's model family (Llama's as a fallback)."""
    from transformers.models.llama import modeling_llama as llama

    mod = _family_module(layer)
    return getattr(mod, "apply_rotary_pos_emb", llama.apply_rotary_pos_emb), getattr(mod, "repeat_kv", llama.repeat_kv)


_ROPE_CACHE: dict[int, nn.Module] = {}


def rotary_embedding(layer: nn.Module) -> nn.Module:
    """The family's rotary embedding module built from the layer's config.

    The model's own ``rotary_emb`` lives on the decoder, which a compressor is not handed; the
    same class built from the same config gives the same cos/sin (its buffers are not
    persistent, so nothing is added to checkpoints). Cached per config object."""
    cfg = layer.self_attn.config
    key = id(cfg)
    rope = _ROPE_CACHE.get(key)
    if rope is None or rope.config is not cfg:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        prefix = type(layer).__name__.replace("DecoderLayer", "")
        cls = getattr(_family_module(layer), f"{prefix}RotaryEmbedding", LlamaRotaryEmbedding)
        rope = cls(config=cfg)
        _ROPE_CACHE[key] = rope
    return rope


def layer_qk(state: SeqState, layer: nn.Module, query: bool = True):
    """Queries of ``state.query_index`` and keys of every token, as layer ``layer`` computes them.

    Returns (x [B, T, d] the normalised layer input, q [B, H, 1, hd] or None, k [B, H_kv, T, hd]);
    RoPE applied at each token's position, per-head q/k norms (Qwen3-style) applied when the
    attention has them."""
    unshard_for_read(layer)  # FSDP2: gather layer K's shards before reading its weights
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(state.hidden)
    B, T, _ = x.shape
    k = attn.k_proj(x).view(B, T, -1, hd).transpose(1, 2)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    rope = rotary_embedding(layer)
    cos, sin = rope.to(x.device)(x, state.position_ids)
    apply_rope, _ = _rope_fns(layer)
    rows = torch.arange(B, device=x.device)
    qi = state.query_index
    q = None
    if query:
        q = attn.q_proj(x[rows, qi][:, None]).view(B, 1, -1, hd).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q, _ = apply_rope(q, q, cos[rows, qi][:, None], sin[rows, qi][:, None])
    k, _ = apply_rope(k, k, cos, sin)
    return x, q, k


def query_attention(state: SeqState, layer: nn.Module) -> torch.Tensor:
    """Softmax attention of each sample's query token over all tokens, head-averaged: [B, T].

    Only the query row is computed; keys after the query (causal) and padding get zero."""
    _, q, k = layer_qk(state, layer)
    attn = layer.self_attn
    _, repeat_kv = _rope_fns(layer)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scale = getattr(attn, "scaling", attn.head_dim ** -0.5)
    scores = (q.float() @ k.float().transpose(-1, -2)).squeeze(2) * scale  # [B, H, T]
    T = k.shape[2]
    allowed = (torch.arange(T, device=k.device)[None] <= state.query_index[:, None]) & state.attention_mask.bool()
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1).mean(1)


SCORE_AT = ("previous", "current")


def scoring_site(state: SeqState, at: LayerContext, score_at: str) -> tuple[SeqState, nn.Module]:
    """(state, layer) a score is recomputed from: the input and weights of layer K−1
    (``previous``; layer 0 itself at K = 0) or of layer K (``current``). Both states hold the same
    tokens: nothing changes the sequence between layer K−1 and layer K's compressor."""
    if score_at == "previous" and at.previous_layer is not None:
        prev = at.previous_input
        if prev.hidden.shape[:2] != state.hidden.shape[:2]:
            raise RuntimeError("layer K-1 consumed another token layout than layer K receives")
        return prev, at.previous_layer
    return state, at.layer


def check_score_at(value) -> None:
    if value not in SCORE_AT:
        raise ConfigError("compressor.score_at", f"must be one of {list(SCORE_AT)} (previous: layer K-1's attention, "
                          f"the released code's rule; current: layer K's), got {value!r}")


class FastV(RatioPruner):
    """Knobs ``layer`` (K) and ``ratio`` (R); counts and checks come from ``RatioPruner``."""

    def __init__(self, layer: int | None = 2, ratio: float = 0.5, score_at: str = "previous"):
        super().__init__(layer, ratio)
        self.score_at = score_at

    def check(self, encoder, llm_layers: int) -> None:
        check_score_at(self.score_at)
        super().check(encoder, llm_layers)

    def scores(self, state: SeqState, at: LayerContext) -> torch.Tensor:
        st, layer = scoring_site(state, at, self.score_at)
        try:
            with torch.no_grad():
                return query_attention(st, layer)
        finally:
            if layer is at.previous_layer:
                reshard_after_read(layer)

    def compress(self, state: SeqState, at: LayerContext) -> SeqState:
        att = self.scores(state, at)
        # The query is kept, and counts toward the budget, when it is itself an image token (the
        # plain template's caption follows the image directly): it must predict the answer.
        att[torch.arange(att.shape[0], device=att.device), state.query_index] = float("inf")
        real = state.attention_mask.bool()
        vis = state.visual_mask & real
        keep = real & ~vis
        for b in range(att.shape[0]):
            idx = vis[b].nonzero().squeeze(1)
            n_keep = kept_count(len(idx), self.ratio)
            if n_keep == 0:
                continue
            top = att[b, idx].topk(n_keep).indices
            keep[b, idx[top]] = True
        return state.select(keep)
