"""vtc.cost (macs, shape, flops, schedules, table): the analytic formulas checked against independent counts.

The independent count is torch's own ``FlopCounterMode`` on real transformers modules (tiny
configs). It counts matmul-type aten ops (mm, addmm, bmm, convolution, and the CUDA SDPA
kernels) at 2 FLOPs per multiply-accumulate, ignores the bias add of addmm and every
elementwise op: the same convention as vtc.cost.flops. So with eager attention (scores and P·V as
plain matmuls) the two must agree exactly. No lightning import here.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vtc.cost.flops import forward_flops, train_step_flops
from vtc.cost.macs import llm_layer_macs, lm_head_macs, projector_macs, vit_layer_macs
from vtc.cost.schedules import (
    fastv_llm_flops_ratio,
    fastv_visual_tokens_per_layer,
    llavolta_cr,
    llavolta_visual_tokens_per_layer,
    visual_tokens_per_layer,
)
from vtc.cost.shape import LLAVA_15_7B, ModelShape
from vtc.cost.table import format_flops, format_table

transformers = pytest.importorskip("transformers")
from transformers import CLIPVisionConfig, LlamaConfig, Qwen2Config, SiglipVisionConfig  # noqa: E402
from transformers.models.clip.modeling_clip import CLIPEncoderLayer  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaRotaryEmbedding,
)


def count(fn) -> tuple[int, dict[str, int]]:
    """Total FLOPs and per-op FLOPs that torch's counter sees while ``fn`` runs (no grad)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    per_op = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    return fc.get_total_flops(), per_op


def tiny_llama(heads=4, kv_heads=4, d=64, m=176, layers=1, attn="eager", vocab=100):
    cfg = LlamaConfig(
        hidden_size=d,
        intermediate_size=m,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=layers,
        vocab_size=vocab,
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return cfg


def run_llama_layer(cfg, n, past=0):
    """Count one LlamaDecoderLayer on ``n`` new tokens after ``past`` cached ones."""
    layer = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    rope = LlamaRotaryEmbedding(cfg)
    d = cfg.hidden_size
    cache = None
    if past:
        cache = transformers.DynamicCache(config=cfg)
        pos0 = torch.arange(past)[None]
        x0 = torch.randn(1, past, d)
        with torch.no_grad():
            layer(x0, position_ids=pos0, past_key_values=cache, use_cache=True,
                  position_embeddings=rope(x0, pos0))
    pos = torch.arange(past, past + n)[None]
    x = torch.randn(1, n, d)
    pe = rope(x, pos)  # computed outside the counter: rotary tables are not layer FLOPs
    return count(lambda: layer(x, position_ids=pos, past_key_values=cache,
                               use_cache=cache is not None, position_embeddings=pe))


# ---------------------------------------------------------------- LLM decoder layer


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_llm_layer_matches_counter_eager(heads, kv_heads, n):
    d, m = 64, 176
    cfg = tiny_llama(heads, kv_heads, d, m)
    total, per_op = run_llama_layer(cfg, n)
    ours = 2 * llm_layer_macs(n, d, m, n_kv_heads=kv_heads, n_heads=heads)
    assert total == ours, (per_op, ours)
    # and by hand, independently of vtc.cost.flops: q,o d->d; k,v d->d_kv; scores and PV; SwiGLU
    d_kv = kv_heads * d // heads
    by_hand = 2 * (2 * n * d * d + 2 * n * d * d_kv + 2 * n * n * d + 3 * n * d * m)
    assert ours == by_hand
    if kv_heads == heads:  # the paper formula
        assert llm_layer_macs(n, d, m) == 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def test_llm_layer_matches_counter_sdpa():
    """With SDPA the counter sees the attention products only where torch registered a flop
    formula for the kernel that runs: the CUDA flash/efficient/cudnn kernels are registered,
    the CPU kernel (aten._scaled_dot_product_flash_attention_for_cpu) is not in torch 2.13, so
    on CPU the counter misses exactly the two attention products, 2·(2·n²·d) FLOPs."""
    n, d, m = 19, 64, 176
    cfg = tiny_llama(4, 2, d, m, attn="sdpa")
    total, per_op = run_llama_layer(cfg, n)
    ours = 2 * llm_layer_macs(n, d, m, n_kv_heads=2, n_heads=4)
    attention_products = 2 * (2 * n * n * d)
    if any("scaled_dot_product" in k for k in per_op):
        assert total == ours, per_op
    else:
        assert ours - total == attention_products, (per_op, ours)


@pytest.mark.parametrize("past,n", [(30, 1), (12, 4)])
def test_llm_layer_decode_kv_len(past, n):
    """Decode step: n new rows attend to past + n keys through the KV cache."""
    d, m = 64, 176
    cfg = tiny_llama(4, 2, d, m)
    total, per_op = run_llama_layer(cfg, n, past=past)
    ours = 2 * llm_layer_macs(n, d, m, n_kv_heads=2, n_heads=4, kv_len=past + n)
    assert total == ours, (per_op, ours)
    # decode differs from prefill of n tokens only in the attention products
    prefill = 2 * llm_layer_macs(n, d, m, n_kv_heads=2, n_heads=4)
    assert ours - prefill == 2 * 2 * n * past * d


def test_llm_layer_gelu_and_head_dim():
    n, d, m = 10, 64, 256
    # a plain-GELU, MHA decoder layer costs exactly what a ViT layer costs
    assert llm_layer_macs(n, d, m, ffn="gelu") == vit_layer_macs(n, d, m)
    assert llm_layer_macs(n, d, m, ffn="swiglu") - llm_layer_macs(n, d, m, ffn="gelu") == n * d * m
    # head_dim wider than d / heads (Qwen3-style): q/o and attention scale with heads·head_dim
    hd, h, kvh = 32, 4, 2
    assert llm_layer_macs(n, d, m, kvh, h, head_dim=hd) == (
        2 * n * d * h * hd + 2 * n * d * kvh * hd + 2 * n * n * h * hd + 3 * n * d * m
    )
    with pytest.raises(ValueError):
        llm_layer_macs(n, d, m, ffn="relu")
    with pytest.raises(ValueError):
        llm_layer_macs(n, d, m, n_kv_heads=3, n_heads=4)
    with pytest.raises(ValueError):
        llm_layer_macs(n, d, m, n_kv_heads=2)  # ambiguous without n_heads


# ---------------------------------------------------------------- ViT, projector, head


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("n", [5, 17])
def test_vit_layer_matches_counter(attn, n):
    d, m = 64, 256
    cfg = CLIPVisionConfig(hidden_size=d, intermediate_size=m, num_attention_heads=4,
                           attn_implementation=attn)
    torch.manual_seed(0)
    layer = CLIPEncoderLayer(cfg).eval()
    x = torch.randn(1, n, d)
    total, per_op = count(lambda: layer(x, None))
    ours = 2 * vit_layer_macs(n, d, m)
    assert ours == 2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)
    if attn == "sdpa" and not any("scaled_dot_product" in k for k in per_op):
        # see test_llm_layer_matches_counter_sdpa: the CPU SDPA kernel is not counted
        assert ours - total == 2 * (2 * n * n * d), per_op
    else:
        assert total == ours, per_op


def test_projector_and_lm_head_match_counter():
    n, dims = 11, [24, 96, 40, 40]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    mlp = nn.Sequential(*layers[:-1])
    x = torch.randn(1, n, dims[0])
    total, _ = count(lambda: mlp(x))
    assert total == 2 * projector_macs(n, dims)
    assert projector_macs(n, dims) == n * (24 * 96 + 96 * 40 + 40 * 40)

    head = nn.Linear(40, 1000, bias=False)
    h = torch.randn(1, n, 40)
    total, _ = count(lambda: head(h))
    assert total == 2 * lm_head_macs(n, 40, 1000)


# ---------------------------------------------------------------- whole model


def test_forward_flops_matches_tiny_llava():
    """forward_flops on shapes read from real HF configs vs. the counter on the real models:
    CLIPVisionModel (all layers run) + mlp2x_gelu + LlamaForCausalLM (logits at every
    position). The counter also sees the ViT patch-embedding convolution, which vtc.cost.flops
    ignores by convention: it is subtracted (and is the only convolution)."""
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, image_size=56, patch_size=14,
                          attn_implementation="eager")
    tc = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=3, vocab_size=300,
                     attn_implementation="eager")
    shape = ModelShape.from_hf_configs(vc, tc)
    assert shape.vision_tokens == 17 and shape.vision_patches == 16
    assert shape.projector_dims == (32, 64, 64)

    torch.manual_seed(0)
    vision = transformers.CLIPVisionModel(vc).eval()
    proj = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64))
    llm = LlamaForCausalLM(tc).eval()
    text = 9
    pixels = torch.randn(1, 3, 56, 56)

    def forward():
        feats = vision(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # drop CLS
        emb = torch.cat([proj(feats), torch.randn(1, text, 64)], dim=1)
        llm(inputs_embeds=emb)

    total, per_op = count(forward)
    conv = per_op.pop("aten.convolution")
    assert conv == 2 * 16 * (3 * 14 * 14) * 32
    ours = forward_flops(shape, text, [16] * 3)
    assert total - conv == ours["total"], (per_op, ours)
    assert ours["equivalent_visual_tokens"] == 16


def test_fastv_on_tiny_llama_layers():
    """Per-layer accounting with a changing token count: run the decoder layers of a tiny
    LLaMA by hand, dropping half of the image tokens after layer K as FastV does."""
    tc = tiny_llama(4, 4, 64, 176, layers=6)
    model = LlamaForCausalLM(tc).eval().model
    text, L, K = 5, 16, 2
    h = torch.randn(1, L + text, 64)
    pos = torch.arange(L + text)[None]
    counted = 0
    for i, layer in enumerate(model.layers):
        if i == K:  # keep every other image token, keep all text, positions carried along
            keep = torch.cat([torch.arange(0, L, 2), torch.arange(L, L + text)])
            h, pos = h[:, keep], pos[:, keep]
        pe = model.rotary_emb(h, pos)
        c, _ = count(lambda: layer(h, position_ids=pos, position_embeddings=pe))
        counted += c
        with torch.no_grad():
            h = layer(h, position_ids=pos, position_embeddings=pe)
    shape = ModelShape.from_hf_configs(CLIPVisionConfig(), tc)
    per_layer = fastv_visual_tokens_per_layer(6, L, K, 0.5)
    assert per_layer == [16, 16, 8, 8, 8, 8]
    assert forward_flops(shape, text, per_layer)["llm"] == counted


# ---------------------------------------------------------------- LLaVolta, FastV, LLaVA-1.5


def test_llavolta_cr_by_hand():
    N, L = 32, 576
    # CR = N·L / ((N−K)·L/S + K·L), each stage of the four schemes, computed by hand:
    by_hand = {
        (2, 8): 32 * 576 / (30 * 576 / 8 + 2 * 576),  # 18432 / 3312
        (2, 2): 32 * 576 / (30 * 576 / 2 + 2 * 576),  # 18432 / 9792
        (16, 2): 32 * 576 / (16 * 576 / 2 + 16 * 576),  # 18432 / 13824
        (16, 8): 32 * 576 / (16 * 576 / 8 + 16 * 576),  # 18432 / 10368
    }
    for (K, S), want in by_hand.items():
        got = llavolta_cr(N, K, S, L)
        print(f"LLaVolta CR K={K:2d} S={S}: {got:.4f} ({got:.1%})")
        assert got == pytest.approx(want, rel=1e-12)
        assert llavolta_cr(N, K, S) == pytest.approx(want, rel=1e-12)  # L cancels
        # CR is token-layers full / token-layers compressed = L / equivalent visual tokens
        eq = forward_flops(LLAVA_15_7B, 64, llavolta_visual_tokens_per_layer(N, L, K, S))[
            "equivalent_visual_tokens"]
        assert L / eq == pytest.approx(want, rel=1e-12)
    assert llavolta_cr(32, 2, 8) == pytest.approx(5.5652173913, rel=1e-9)  # 557%
    assert llavolta_cr(32, 2, 2) == pytest.approx(32 / 17)
    assert llavolta_cr(32, 16, 2) == pytest.approx(4 / 3)
    assert llavolta_cr(32, 16, 8) == pytest.approx(16 / 9)
    assert llavolta_cr(32, 0, 4) == pytest.approx(4)  # K=0: pooled everywhere
    assert visual_tokens_per_layer(4, 10, 1, 3) == [10, 3, 3, 3]


def test_fastv_ratio_llava_7b():
    """FastV K=2, R=50%, 576 image + 64 text tokens, Vicuna-7B, LLM prefill only."""
    ratio = fastv_llm_flops_ratio(LLAVA_15_7B, text_tokens=64, L=576, K=2, R=0.5)
    gelu = fastv_llm_flops_ratio(LLAVA_15_7B, 64, 576, ffn="gelu")
    print(f"FastV K=2 R=0.5 LLM FLOPs ratio (SwiGLU 3ndm): {ratio:.4f}; with a 2ndm FFN: {gelu:.4f}")

    # by hand: f(n) = 4nd² + 2n²d + 3ndm, n = 640 before layer 2, 352 after
    d, m = 4096, 11008

    def f(n):
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    want = (2 * f(640) + 30 * f(352)) / (32 * f(640))
    assert ratio == pytest.approx(want, rel=1e-12)
    assert 0.56 < ratio < 0.58
    # the token-only estimate (linear terms, no attention): (2·640 + 30·352) / (32·640)
    assert (2 * 640 + 30 * 352) / (32 * 640) == pytest.approx(0.578125)
    assert ratio < 0.578125  # the quadratic attention term shrinks faster than the rest


def test_llava_15_7b_forward_totals():
    text = 64
    full = forward_flops(LLAVA_15_7B, text, [576] * 32)
    pooled = forward_flops(LLAVA_15_7B, text, llavolta_visual_tokens_per_layer(32, 576, 2, 8))
    fastv = forward_flops(LLAVA_15_7B, text, fastv_visual_tokens_per_layer(32, 576))
    rows = [dict(method=k, **v) for k, v in
            (("llava-1.5-7b", full), ("llavolta K2 S8", pooled), ("fastv K2 R.5", fastv))]
    print("\nLLaVA-1.5-7B forward FLOPs per sample (576 image + 64 text tokens):")
    print(format_table(rows))

    n = 576 + text
    # LLM ≈ 2·params·tokens with 6.5e9 non-embedding decoder params (6.7e9 incl. embeddings)
    assert full["llm"] == pytest.approx(2 * 6.7e9 * n, rel=0.05)
    decoder_params = 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    attn = 32 * 2 * (2 * n * n * 4096)
    assert full["llm"] == 2 * decoder_params * n + attn
    # CLIP-L: ~0.3e9 params over 577 tokens, 24 layers
    assert full["vision"] == pytest.approx(2 * 0.30e9 * 577, rel=0.15)
    assert full["projector"] == 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert full["lm_head"] == 2 * n * 4096 * 32000
    assert full["total"] == sum(full[k] for k in ("vision", "projector", "llm", "lm_head"))
    assert 8e12 < full["total"] < 1e13
    # vision and projector are untouched by LLM-site compression
    assert pooled["vision"] == full["vision"] and pooled["projector"] == full["projector"]
    assert pooled["equivalent_visual_tokens"] == (2 * 576 + 30 * 72) / 32
    # prefill for generation needs one logit row
    one = forward_flops(LLAVA_15_7B, text, [576] * 32, lm_head_tokens=1)
    assert one["lm_head"] == 2 * 4096 * 32000
    # encoder truncated at layer -2: 23 layers run
    trunc = forward_flops(dataclasses.replace(LLAVA_15_7B, vision_layers=23), text, [576] * 32)
    assert trunc["vision"] == pytest.approx(full["vision"] * 23 / 24)
    # an in-encoder compressor (ToMe-like) and a pre-projector one (2x2 pooling)
    tome = forward_flops(LLAVA_15_7B, text, [144] * 32,
                           vision_tokens_per_layer=[577 - 16 * i for i in range(24)])
    assert tome["projector"] == 2 * (577 - 16 * 23 - 1) * (1024 * 4096 + 4096 * 4096)
    pool2d = forward_flops(LLAVA_15_7B, text, [144] * 32, projector_tokens=144)
    assert pool2d["projector"] == full["projector"] / 4


def test_train_step_flops():
    fwd = forward_flops(LLAVA_15_7B, 64, [576] * 32)
    assert train_step_flops(fwd) == 3 * fwd["total"]
    # LLaVA instruction tuning: frozen CLIP runs forward only
    assert train_step_flops(fwd, frozen=("vision",)) == (
        fwd["vision"] + 3 * (fwd["projector"] + fwd["llm"] + fwd["lm_head"]))
    # LLaVA pretraining: projector trained, gradients flow back through the frozen LLM
    assert train_step_flops(fwd, frozen=("vision", "llm", "lm_head")) == (
        fwd["vision"] + 3 * fwd["projector"] + 2 * (fwd["llm"] + fwd["lm_head"]))
    with pytest.raises(ValueError):
        train_step_flops(fwd, frozen=("encoder",))


# ---------------------------------------------------------------- configs, validation, table


def test_from_hf_configs_llava_and_others():
    clip = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)
    vicuna = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    assert ModelShape.from_hf_configs(clip, vicuna, [1024, 4096, 4096]) == LLAVA_15_7B
    # plain dicts (e.g. from Hydra) work alike
    assert ModelShape.from_hf_configs(clip.to_dict(), vicuna.to_dict()) == LLAVA_15_7B

    siglip = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=384, patch_size=14)
    qwen = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)
    s = ModelShape.from_hf_configs(siglip, qwen)
    assert (s.vision_tokens, s.vision_prefix, s.vision_patches) == (729, 0, 729)
    assert (s.llm_heads, s.llm_kv_heads, s.llm_head_dim) == (14, 2, None)
    assert s.projector_dims == (1152, 896, 896)
    out = forward_flops(s, 20, [729] * 24)
    n = 749
    assert out["llm"] == 2 * 24 * (2 * n * 896 * 896 + 2 * n * 896 * 128 + 2 * n * n * 896
                                   + 3 * n * 896 * 4864)


def test_validation():
    with pytest.raises(ValueError):
        forward_flops(LLAVA_15_7B, 64, [576] * 31)  # one entry per LLM layer
    with pytest.raises(ValueError):
        forward_flops(LLAVA_15_7B, 64, [576] * 32, vision_tokens_per_layer=[577] * 25)
    with pytest.raises(ValueError):
        visual_tokens_per_layer(32, 576, 33, 10)
    with pytest.raises(ValueError):
        llavolta_cr(32, 2, 0)
    with pytest.raises(ValueError):
        projector_macs(10, [1024])
    assert projector_macs(0, [1024, 4096]) == 0
    assert math.isclose(forward_flops(LLAVA_15_7B, 64, [0] * 32)["equivalent_visual_tokens"], 0)


def test_format_table():
    rows = [
        {"method": "full", "total": 9.08e12, "tokens": 576},
        {"method": "llavolta", "total": 2.1e12, "tokens": 135.0, "cr": 5.565217},
    ]
    table = format_table(rows)
    print("\n" + table)
    lines = table.splitlines()
    assert lines[0].split() == ["method", "total", "tokens", "cr"]
    assert set(lines[1]) <= {"-", " "}
    assert "9.08 T" in lines[2] and "2.10 T" in lines[3] and "5.565" in lines[3]
    # numeric columns right-aligned: the 'total' values end at the same column
    assert lines[2].index("9.08 T") + 6 == lines[3].index("2.10 T") + 6
    assert format_table([]) == ""
    assert format_table(rows, columns=["method"]).splitlines()[2] == "full"
    assert format_flops(1.5e9) == "1.50 G" and format_flops(12) == "12"
