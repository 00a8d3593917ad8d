"""The compressor-zoo benchmark's models (:mod:`vtc.bench.compressors`): one vtc model per
compressor config, transformers' ``LlavaForConditionalGeneration`` with the same weights as the
reference, and the check that the two compute the same loss.

Every model comes from ``common.build_lmm`` with the same seed, so only the compressor (and the
parameters it owns) differs between entries.
"""
from __future__ import annotations

import gc
import time

import torch

from vtc.bench import common as C


def compressor_for(name: str, s: C.Sizes):
    if name == "m3":  # test-time scale 25% of the grid; training still runs every scale
        return C.load_compressor("m3", tokens=s.num_patches // 4)
    if name in ("random_prune", "divprune", "vispruner", "cdpruner"):  # 25% of the grid, as pool stride 2 keeps
        return C.load_compressor(name, keep=s.num_patches // 4)
    if name == "downsample":  # half the side: 25% of the grid
        return C.load_compressor(name, grid=int(s.num_patches ** 0.5) // 2)
    return C.load_compressor(name)


def build_hf(s: C.Sizes, vtc_model):
    """transformers' Llava of the same sizes, weights copied from the vtc model (encoder frozen)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tc = dict(C.text_config(s))
    tc.pop("model_type")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**C.vision_config(s)), text_config=LlamaConfig(**tc),
                      image_token_index=s.image_token_id, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      multimodal_projector_bias=True)
    cfg._attn_implementation = "sdpa"
    hf = LlavaForConditionalGeneration(cfg)
    hf.model.vision_tower.load_state_dict(vtc_model.encoder.model.state_dict())
    proj = vtc_model.projector  # mlp2x_gelu: Linear, GELU, Linear
    hf.model.multi_modal_projector.linear_1.load_state_dict(proj[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(proj[2].state_dict())
    hf.model.language_model.load_state_dict(vtc_model.llm.model.model.state_dict())
    hf.lm_head.load_state_dict(vtc_model.llm.model.lm_head.state_dict())
    for p in hf.model.vision_tower.parameters():
        p.requires_grad_(False)
    hf.train()
    hf.model.vision_tower.eval()
    return hf


class Entry:
    """One benchmarked configuration: a model, its optimizer and its step function (which returns
    the phase times {'fwd', 'bwd', 'opt', 'total'})."""

    def __init__(self, name, model, step, opt, batch):
        self.name, self.model, self.step_fn, self.opt, self.batch = name, model, step, opt, batch
        self.phases: list[dict] = []

    def step(self):
        return self.step_fn()

    def timed_step(self) -> float:
        gc.collect()
        gc.disable()
        try:
            ph = self.step_fn()
        finally:
            gc.enable()
        self.phases.append(ph)
        return ph["total"]


def make_entries(s: C.Sizes, names: list[str], batch: dict, with_hf: bool = True) -> list[Entry]:
    entries = []
    for name in names:
        model = C.build_lmm(s, compressor_for(name, s))
        opt = C.optimizer(model, s.lr)
        entries.append(Entry(name, model, (lambda m=model, o=opt: C.train_step_phased(m, batch, o)), opt, batch))
    if with_hf:
        base = next(e.model for e in entries if e.name == "none")
        hf = build_hf(s, base)
        hb = C.expand_for_hf(batch, s.num_patches, s.image_token_id)
        opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=s.lr)

        def hf_step(m=hf, o=opt, b=hb):
            t0 = time.perf_counter()
            o.zero_grad(set_to_none=True)
            out = m(**b)
            t1 = time.perf_counter()
            out.loss.backward()
            t2 = time.perf_counter()
            o.step()
            t3 = time.perf_counter()
            return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "total": t3 - t0}

        e = Entry("hf_llava", hf, hf_step, opt, hb)
        entries.append(e)
    return entries


def check_same_loss(s, entries) -> float:
    """|loss_vtc - loss_hf| on the batch before any step (same weights): the two compute the same."""
    base = next(e for e in entries if e.name == "none")
    hf = next((e for e in entries if e.name == "hf_llava"), None)
    if hf is None:
        return float("nan")
    with torch.no_grad():
        l1 = float(base.model(base.batch).loss)
        l2 = float(hf.model(**hf.batch).loss)
    return abs(l1 - l2)

