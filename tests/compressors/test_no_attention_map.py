"""No compressor materialises an attention map under SDPA.

The contract: scores are recomputed for the rows they need (FastV's query row, SparseVLM's raters,
VisionZip's CLS row), so the model's attention stays a fused SDPA / flash-attention call that never
writes a [B, heads, T, T] weight tensor. Every shipped compressor (the list tests/test_gpu.py keeps
in step with conf/compressor/) runs a training forward and a cached generation under a
``TorchFunctionMode`` that sees every tensor the Python code creates (SDPA's internals are one
call and stay invisible, as on a GPU). A float tensor shaped like a full attention map,
[..., heads, T, T] with T the tokens of the sequence, fails the test. The detector is checked on
the eager kernel, which must be caught.
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.test_gpu import COMPRESSORS, _compressors
from tests.tiny import tiny_lmm, toy_batch

HEADS = 4  # tiny_lmm: 4 query heads in the LLM and in the encoder
MIN_TOKENS = 12  # shorter than every sequence the toy batch makes (encoder 17+, LLM 20+ tokens)


class AttentionMapSpy(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.maps: list[tuple[str, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 4 and t.shape[-3] == HEADS
                    and t.shape[-1] == t.shape[-2] >= MIN_TOKENS):
                self.maps.append((getattr(func, "__name__", str(func)), tuple(t.shape)))
        return out


def run(model, batch) -> list:
    with AttentionMapSpy() as spy:
        model.train()
        model(batch).loss.backward()
        model.eval()
        model.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_index"], 2)
    return spy.maps


def build(name: str, attn: str = "sdpa"):
    factory, kw = _compressors()[name]
    model = tiny_lmm(factory(), **kw)
    for part in (model.llm.model, model.encoder.model):
        part.set_attn_implementation(attn)
    return model, toy_batch(image_size=kw.get("image_size", 56))


@pytest.mark.parametrize("name", COMPRESSORS)
def test_sdpa_run_materialises_no_attention_map(name):
    model, batch = build(name)
    assert run(model, batch) == []


def test_the_detector_catches_an_eager_attention_map():
    model, batch = build("fastv", attn="eager")
    maps = run(model, batch)
    assert maps and all(shape[-3] == HEADS for _, shape in maps)
