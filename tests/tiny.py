"""Tiny models and batches for tests and benchmarks (random init, no files, no network)."""
from __future__ import annotations

import torch

from vtc.compressors.base import Compressor
from vtc.data.batch import IGNORE_INDEX
from vtc.model.encoder import VisionEncoder
from vtc.model.llm import LanguageModel
from vtc.lmm import LMM

IMG = 49  # the image placeholder id of the toy vocabulary (size 50)


def tiny_encoder(image_size=56, patch=14, width=32, layers=3, heads=4, kind="clip", select_layer=-2):
    cfg = dict(image_size=image_size, patch_size=patch, hidden_size=width, intermediate_size=2 * width,
               num_hidden_layers=layers, num_attention_heads=heads)
    return VisionEncoder.build(kind=kind, config=cfg, select_layer=select_layer)


def tiny_llm(width=32, layers=3, heads=4, kv_heads=2, vocab=50):
    return LanguageModel.build(config=dict(
        model_type="llama", vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512))


def tiny_lmm(compressor: Compressor | None = None, seed: int = 0, **encoder_kw) -> LMM:
    """CLIP-style 56 px / 14 px encoder (4x4 = 16 patches, CLS), 3-layer Llama, vocab 50."""
    torch.manual_seed(seed)
    enc = tiny_encoder(**encoder_kw)
    llm = tiny_llm()
    return LMM(enc, llm, compressor, "mlp2x_gelu", image_token_id=IMG, pad_token_id=0, eos_token_id=2).eval()


def toy_batch(image_size: int = 56, seed: int = 0) -> dict:
    """Three samples: image in the middle, image first with padding, text only."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[1, 5, IMG, 6, 7, 8, 9], [1, IMG, 5, 6, 0, 0, 0], [1, 5, 6, 7, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 5:7] = ids[0, 5:7]
    labels[1, 3] = 6
    labels[2, 3] = 7
    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values=torch.randn(2, 3, image_size, image_size, generator=g),
                image_index=torch.tensor([0, 1, -1]))


def single(batch: dict, i: int) -> dict:
    """Sample ``i`` of a toy batch as a batch of one, unpadded."""
    n = int(batch["attention_mask"][i].sum())
    img = int(batch["image_index"][i])
    return dict(
        input_ids=batch["input_ids"][i:i + 1, :n],
        attention_mask=batch["attention_mask"][i:i + 1, :n],
        labels=batch["labels"][i:i + 1, :n],
        pixel_values=batch["pixel_values"][[img]] if img >= 0 else batch["pixel_values"][:0],
        image_index=torch.tensor([0 if img >= 0 else -1]),
    )


def splice_images(text_embeds, input_ids, attention_mask, labels, image_index, visual, image_token_id):
    """``vtc.model.splice.splice`` for a batch of at most one image per sample: ``image_index``
    [B] (row of ``visual`` [N, V, d] or -1) as the items the splice takes."""
    from vtc.model.splice import splice

    rows = [(b, int(i)) for b, i in enumerate(image_index.tolist()) if int(i) >= 0]
    return splice(text_embeds, input_ids, attention_mask, labels, [b for b, _ in rows], [visual[i] for _, i in rows],
                  image_token_id)


def toy_video_batch(image_size: int = 56, frames: int = 4, seed: int = 0) -> dict:
    """toy_batch's three samples with a video of ``frames`` frames where the first had its image."""
    b = toy_batch(image_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.cat([torch.randn(frames, 3, image_size, image_size, generator=g), b["pixel_values"][1:2]])
    items = torch.tensor([[0, 0, frames, 1], [1, frames, 1, 0]])  # (sample, first row, frames, kind)
    out = {k: v for k, v in b.items() if k != "image_index"}
    return dict(out, pixel_values=pixels, visual_items=items)


def greedy_by_recompute(model: LMM, sample: dict, steps: int) -> list[int]:
    """Greedy tokens for one unpadded sample without a KV cache: the whole sequence is rebuilt and
    run through every layer (the in-LLM compressor included) at each step, with the query token
    fixed at the prompt's last instruction token, as ``generate`` compresses the prompt once.
    The reference a cached ``generate`` must equal."""
    from dataclasses import replace

    cur, q0, out = sample["input_ids"], None, []
    for _ in range(steps):
        st = model.build_sequence(cur, torch.ones_like(cur), None, sample["pixel_values"], sample["image_index"])
        q0 = int(st.query_index[0]) if q0 is None else q0
        o, _, _ = model.llm.run_layers(replace(st, query_index=torch.tensor([q0])), model.pipeline.active("llm"))
        t = int(model.next_token(model.llm.logits(o.hidden[0, -1])))
        if t == model.eos_token_id:
            break
        out.append(t)
        cur = torch.cat([cur, torch.tensor([[t]])], 1)
    return out


def spy(comp: Compressor) -> dict:
    """Record what an in-LLM compressor's ``compress`` is handed and returns: the dict's ``in``,
    ``out`` and ``at`` (the ``LayerContext``) are those of the latest call."""
    seen: dict = {}
    orig = comp.compress

    def wrapped(state, at):
        out = orig(state, at)
        seen["in"], seen["out"], seen["at"] = state, out, at
        return out

    comp.compress = wrapped
    return seen


def eager_attention_map(eager, idx: int, st, b: int) -> torch.Tensor:
    """Head-mean attention map [n, n] of decoder layer ``idx`` over sample ``b`` of the sequence
    ``st``, computed by HF's eager attention (``eager``: the LLM's HF model set to eager) with a
    plain causal mask: the full map, for tests only."""
    n = int(st.attention_mask[b].sum())
    layer = eager.model.layers[idx]
    x = layer.input_layernorm(st.hidden[b:b + 1, :n])
    cos, sin = eager.model.rotary_emb(x, st.position_ids[b:b + 1, :n])
    mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
    _, w = layer.self_attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    return w[0].mean(0)


def check_pre_llm_batch_equals_singles(model: LMM, batch: dict, steps: int = 3) -> torch.Tensor:
    """A pre-LLM method's tokens for a batch's images equal each image's alone, and the batch
    generates what each sample generates alone. Returns the batch's visual tokens."""
    vis = model.encode_images(batch["pixel_values"])
    full, _ = model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_index"],
                             steps)
    for i in range(len(batch["input_ids"])):
        s = single(batch, i)
        if len(s["pixel_values"]):
            alone = model.encode_images(s["pixel_values"])[0]
            assert torch.allclose(alone, vis[int(batch["image_index"][i])], atol=1e-5)
        assert model.generate(s["input_ids"], s["attention_mask"], s["pixel_values"], s["image_index"], steps)[0][0] \
            == full[i]
    return vis


def in_llm_config_stage_counts(name: str, comp, n: int = 64) -> list[int]:
    """Shared by the in-LLM dropping configs (PyramidDrop, SparseVLM): ``compressor=name`` composes
    with its layers scaled to the tiny 4-layer LLM, LLaVA's layers [8,16,24] are refused naming the
    key and the tiny LLM's scaled layers, and under ``schedule=coarse_to_fine`` the tokens ``comp``
    keeps of ``n`` at each stage are returned (for the caller's budget check)."""
    import pytest

    from vtc.assembly.checks import check_config
    from vtc.compressors.schedule import resolve_stages, schedule_stages
    from vtc.config import compose_conf
    from vtc.errors import ConfigError
    from vtc.model.encoder import EncoderInfo

    check_config(compose_conf("train", [f"compressor={name}"]))
    with pytest.raises(ConfigError) as e:
        check_config(compose_conf("train", [f"compressor={name}", "compressor.layers=[8,16,24]"]))
    assert e.value.key == "compressor.layers" and "[1, 2, 3]" in e.value.message
    cfg = compose_conf("train", [f"compressor={name}", "schedule=coarse_to_fine"])
    check_config(cfg)
    kept = []
    for knobs in resolve_stages(schedule_stages(cfg.schedule, 4), comp, n, EncoderInfo(336, 14, 1024, 24, True, -2)):
        comp.set_knobs(**knobs)
        kept.append(comp.kept(n))
    return kept
