"""``python -m vtc.flops [hydra overrides]``: analytic FLOPs of a configured model, no weights.

Builds the encoder and LLM of the composed config on the meta device (so a 7B config costs
nothing), applies the compressor's token accounting, and prints one row per compressor asked for
(``compressors=none,pool,vcc``; default: the configured one and ``none`` for reference).

    python -m vtc.flops encoder=clip_l14_336 llm=vicuna_7b compressors=none,pool,stf,fastv,vcc
    python -m vtc.flops model.init_from=/models/llava-1.5-7b-hf compressors=none,pool,vcc

With ``model.init_from=DIR`` (+ ``model.vision_tower_path`` for original-LLaVA directories) the
shapes are those of the released model, read from its config files only (no weight is opened).
"""
from __future__ import annotations

import sys

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vtc.config import CONF_DIR, compose_conf, node_kwargs
from vtc.flops import forward_flops, format_flops, format_table


def build_meta(cfg, compressor_cfg):
    """An LMM on the meta device from the config's own fields (paths are not read)."""
    from vtc.model.lmm import LMM

    cfg = cfg.copy()
    OmegaConf.update(cfg, "encoder.path", None)  # shapes come from the config fields, not files
    OmegaConf.update(cfg, "llm.path", None)
    enc_kw = node_kwargs(cfg.encoder, drop=("pretrain", "image_size"))
    llm_kw = node_kwargs(cfg.llm, drop=("tokenizer_path",))
    llm_kw["config"].setdefault("vocab_size", 32000)
    llm_kw["attn_implementation"] = "sdpa"
    # Plain dicts for the builders: a released model's config has nested fields (rope_parameters)
    # that transformers' strict config classes refuse as DictConfig.
    enc_kw["_convert_"] = llm_kw["_convert_"] = "all"
    with torch.device("meta"):
        encoder = instantiate(enc_kw)
        llm = instantiate(llm_kw)
        return LMM(encoder, llm, instantiate(compressor_cfg), projector=cfg.projector.kind)


def rows_for(cfg, names: list[str], text_tokens: int) -> list[dict]:
    from vtc.accounting import model_shape

    rows, base = [], None
    for name in names:
        comp_cfg = cfg.compressor if name == "configured" else OmegaConf.load(CONF_DIR / "compressor" / f"{name}.yaml")
        model = build_meta(cfg, comp_cfg)
        shape = model_shape(model)
        info = model.encoder.info
        comp = model.compressor
        n_in = comp.tokens_out(info.num_patches) if comp.site != "llm" else info.num_patches
        per_layer = comp.tokens_per_layer(n_in, model.llm.num_layers) if comp.site == "llm" else [n_in] * model.llm.num_layers
        f = forward_flops(shape, text_tokens, per_layer, vision_tokens_per_layer=comp.encoder_tokens(info.num_patches),
                          projector_tokens=n_in, lm_head_tokens=1)
        total = f["total"] + comp.own_flops(info.num_patches)
        base = base or (f["llm"], total)
        rows.append({
            "compressor": name if name != "configured" else comp.describe(),
            "visual_in": n_in,
            "equiv_tokens": round(f["equivalent_visual_tokens"], 1),
            "vision": format_flops(f["vision"]),
            "projector": format_flops(f["projector"]),
            "llm": format_flops(f["llm"]),
            "total": format_flops(total),
            "llm_vs_first": f"{f['llm'] / base[0]:.3f}",
            "total_vs_first": f"{total / base[1]:.3f}",
        })
    return rows


def main(argv: list[str] | None = None) -> str:
    import vtc.config  # noqa: F401  (resolvers)

    argv = list(sys.argv[1:] if argv is None else argv)
    names, text_tokens, overrides = None, 64, []
    for a in argv:
        if a.startswith("compressors="):
            names = [n for n in a.split("=", 1)[1].split(",") if n]
        elif a.startswith("text_tokens="):
            text_tokens = int(a.split("=", 1)[1])
        else:
            overrides.append(a)
    cfg = compose_conf("train", overrides)
    from vtc.interop.llava import resolve_init_from

    resolve_init_from(cfg)  # model.init_from: encoder/llm/projector from the directory's configs
    names = names or ["none", "configured"]
    table = format_table(rows_for(cfg, names, text_tokens))
    header = (f"Forward FLOPs per sample (FLOPs = 2 x MACs; prefill: {text_tokens} text tokens, logits for "
              f"1 position; encoder run to its selected layer)")
    print(header)
    print(table)
    return table
