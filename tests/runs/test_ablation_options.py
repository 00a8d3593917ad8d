"""The compressor ablation's options (conf/ablation/*_16.yaml, *_4.yaml) reach their budgets, and
every compressor config has both options in conf/experiment/compressor_ablation.yaml's sweep or a
stated reason not to.

Each option composes the real train config with ``experiment=compressor_ablation``, passes
``check_config``, and runs one forward of a tiny model of the config's geometry (112 px / 14 px
patches = 64 tokens, the config's encoder and LLM depths) on a toy batch: the visual tokens the
LLM's last layer saw must equal the budget in the option's name. No training.
"""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from vtc.assembly.checks import check_config
from vtc.assembly.compressors import build_compressors
from vtc.config import CONF_DIR, compose_conf
from vtc.lmm import LMM
from tests.tiny import IMG, tiny_encoder, tiny_llm, toy_batch

BUDGETS = (16, 4)
PATCHES = 64  # the tiny world's 8x8 grid
OPTIONS = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml")
                 if p.stem.rsplit("_", 1)[-1] in {str(b) for b in BUDGETS})
COMPRESSORS = sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml"))

# Compressor configs without an option at a budget, and why (compressor name -> budgets left out).
# A compressor config not named here must have <name>_16 and <name>_4 in the sweep.
EXCLUDED: dict[str, tuple[int, ...]] = {
    # Not image methods at a budget: the uncompressed baseline (its option is none_64), video
    # pooling in time, and a chain of two methods that are swept on their own (stf, vcc).
    "none": BUDGETS,
    "temporal": BUDGETS,
    "pool_temporal": BUDGETS,
    "stf_vcc": BUDGETS,
    # ToMe: the tiny encoder runs 3 blocks and merges at most half the tokens per block, 8 patch
    # tokens at the least (compressor.r >= 32): 4 is unreachable (compressor_ablation.yaml's header).
    "tome": (4,),
    # PruMerge+: its count (IQR outliers of the CLS attention + a spatial fill + 1) depends on the
    # image and no knob sets it; measured 5 tokens for most images, 4..64 in all (the header).
    "prumerge_plus": BUDGETS,
}

# Visual tokens per LLM layer for the options whose layers do not all see the budget: the
# multi-stage in-LLM methods (their headers give the arithmetic). Every other option's layers all
# see the budget.
PER_LAYER = {
    "pyramid_drop_16": [32, 16, 16, 16],  # stages before layers 0 and 1, lambda 0.5
    "pyramid_drop_4": [16, 4, 4, 4],  # lambda 0.25
    "sparsevlm_16": [64, 16, 16, 16],  # before layer 1: 14 kept + 2 recycled
    "sparsevlm_4": [64, 4, 4, 4],  # 2 kept + 2 recycled
    # VoCo: every layer runs the 64 visual tokens and the m VoCo tokens; the text sees the m alone.
    "voco_16": [80, 80, 80, 80],
    "voco_4": [68, 68, 68, 68],
}

# Data-dependent counts (tokens off the budget allowed, by compressor). Empty: SparseVLM's recycled
# tokens are int(int(0.3 * d) + 1) // 10 + 1 clusters of the d deleted tokens, d a function of the
# 64 entering tokens alone, so its counts are exact; PruMerge+, the one method whose count follows
# the image, has no option (EXCLUDED). A future data-dependent option states its tolerance here.
TOLERANCE: dict[str, int] = {}


def sweep_options() -> list[str]:
    exp = OmegaConf.load(CONF_DIR / "experiment" / "compressor_ablation.yaml")
    return [s.strip() for s in str(exp.hydra.sweeper.params.ablation).split(",")]


def compose(*overrides: str):
    return compose_conf("train", list(overrides))


def budget_of(option: str) -> int:
    return int(option.rsplit("_", 1)[1])


def method_of(option: str) -> str:
    return option.rsplit("_", 1)[0]


def build(cfg) -> LMM:
    """The option's compressors on a small-width model of the config's geometry (as
    tests/compressors/test_composition.py's ``build``), in eval mode: the test-time budget."""
    torch.manual_seed(0)
    enc = tiny_encoder(image_size=cfg.encoder.image_size, patch=cfg.encoder.config.patch_size, width=32,
                       layers=cfg.encoder.config.num_hidden_layers, select_layer=cfg.encoder.select_layer)
    llm = tiny_llm(layers=cfg.llm.config.num_hidden_layers)
    compressor, added = build_compressors(cfg)
    return LMM(enc, llm, compressor, "mlp2x_gelu", image_token_id=IMG, pad_token_id=0, eos_token_id=2,
               stage_compressor=added).eval()


def test_the_options_exist():
    assert len(OPTIONS) >= 2 * 10, OPTIONS


@pytest.mark.parametrize("option", OPTIONS)
def test_option_reaches_its_budget(option):
    budget = budget_of(option)
    cfg = compose("experiment=compressor_ablation", f"ablation={option}")
    check_config(cfg)
    assert cfg.encoder.image_size // cfg.encoder.config.patch_size == 8  # the 8x8 grid the budgets are of
    model = build(cfg)
    depth = cfg.llm.config.num_hidden_layers
    batch = toy_batch(image_size=cfg.encoder.image_size)
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out.loss)
    images = [b for b, i in enumerate(batch["image_index"].tolist()) if i >= 0]
    assert images and out.seen.shape[0] == depth
    tol = TOLERANCE.get(method_of(option), 0)
    for b in images:
        if option in PER_LAYER:
            assert out.seen[:, b].tolist() == PER_LAYER[option], (option, b)
            continue
        last = int(out.seen[-1, b])
        assert abs(last - budget) <= tol, (option, b, out.seen[:, b].tolist())
        if not tol:
            assert out.seen[:, b].tolist() == [budget] * depth, (option, b)
    for b in set(range(len(batch["image_index"]))) - set(images):
        assert out.seen[:, b].tolist() == [0] * depth  # a text-only sample sees no visual token
    if not tol:  # the nominal count (FLOPs accounting) is the measured one
        pipe = model.pipeline
        nominal = pipe.tokens_per_layer(pipe.tokens_in_llm(PATCHES), depth)
        assert nominal == out.seen[:, images[0]].tolist(), (option, nominal)


def test_the_sweep_lists_every_option_baseline_first():
    swept = sweep_options()
    assert swept[0] == "none_64"
    assert len(swept) == len(set(swept))
    assert sorted(swept[1:]) == OPTIONS, "the sweep lists exactly the *_16 / *_4 options"


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_every_compressor_has_both_options_or_a_reason(compressor):
    """A new compressor config fails here until it gets <name>_16 and <name>_4 in the sweep (or an
    entry in EXCLUDED with its reason)."""
    swept = set(sweep_options())
    target = None
    for budget in BUDGETS:
        if budget in EXCLUDED.get(compressor, ()):
            continue
        option = f"{compressor}_{budget}"
        assert option in swept, (f"conf/compressor/{compressor}.yaml has no {option} in the compressor_ablation "
                                 f"sweep: add conf/ablation/{option}.yaml and list it, or name it in EXCLUDED")
        if target is None:
            target = compose(f"compressor={compressor}").compressor._target_
        # the option runs this compressor config, not another one's
        assert compose("experiment=compressor_ablation", f"ablation={option}").compressor._target_ == target
