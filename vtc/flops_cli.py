"""``python -m vtc.flops [hydra overrides]``: analytic FLOPs of a configured model, no weights.

Builds the encoder and LLM of the composed config on the meta device (so a 7B config costs
nothing), applies the compressor's token accounting, and prints one row per compressor asked for
(``compressors=none,pool,vcc``; default: the configured one and ``none`` for reference).

    python -m vtc.flops encoder=clip_l14_336 llm=vicuna_7b compressors=none,pool,stf,fastv,vcc
    python -m vtc.flops model.init_from=/models/llava-1.5-7b-hf compressors=none,pool,vcc

With ``model.init_from=DIR`` (+ ``model.vision_tower_path`` for original-LLaVA directories) the
shapes are those of the released model, read from its config files only (no weight is opened).
The LM head's vocabulary is the tokenizer's length for a config-built LLM (llm=tiny: its tokenizer
at ``llm.tokenizer_path``, when built), else the config's ``vocab_size``; the line under the table
says which one was used, and when it was only assumed.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from vtc.config import CONF_DIR, compose_conf, node_kwargs
from vtc.flops import forward_flops, format_flops, format_table


ASSUMED_VOCAB = 32000  # LLaMA / Vicuna's vocabulary: the guess when nothing on disk says otherwise


@functools.lru_cache(maxsize=8)
def _tokenizer_len(path: str) -> int:
    from vtc.data.tokenizer import load_tokenizer

    return len(load_tokenizer(path))  # with <image> added, exactly as train.py sizes the LLM


def meta_vocab(cfg) -> tuple[int, str]:
    """(vocabulary of the configured LLM's LM head, where that number comes from), decided as
    ``build_lmm`` decides it: a config-built LLM (no ``llm.path``, no ``model.init_from``) gets
    exactly its tokenizer's length, whatever its config says; an LLM read from a directory (or a
    released model's config, copied in by ``resolve_init_from``) has its config's ``vocab_size``."""
    given = OmegaConf.select(cfg, "llm.config.vocab_size", default=None)
    from_dir = (OmegaConf.is_missing(cfg.llm, "path") or cfg.llm.get("path") is not None
                or bool(OmegaConf.select(cfg, "model.init_from", default=None)))
    if from_dir and given is not None:
        return int(given), "the LLM config's vocab_size"
    try:
        tok_path = OmegaConf.select(cfg, "llm.tokenizer_path", default=None)
    except Exception:  # noqa: BLE001 - it interpolates a mandatory path left unset (llm.path=???)
        tok_path = None
    if tok_path and os.path.isdir(str(tok_path)):
        return _tokenizer_len(str(tok_path)), f"the tokenizer's length ({tok_path})"
    if given is not None:
        return int(given), f"the LLM config's vocab_size (no tokenizer at {tok_path})"
    return ASSUMED_VOCAB, (f"ASSUMED: no tokenizer at {tok_path} (`python train.py` with the same data "
                           "config builds it), so the LM head's FLOPs are a guess")


def build_meta(cfg, compressor_cfg):
    """An LMM on the meta device from the config's own fields; only the tokenizer is read (its
    length is the vocabulary of a config-built LLM, ``meta_vocab``)."""
    from vtc.model.lmm import LMM

    vocab, _ = meta_vocab(cfg)
    cfg = cfg.copy()
    OmegaConf.update(cfg, "encoder.path", None)  # shapes come from the config fields, not files
    OmegaConf.update(cfg, "llm.path", None)
    enc_kw = node_kwargs(cfg.encoder, drop=("pretrain", "image_size"))
    llm_kw = node_kwargs(cfg.llm, drop=("tokenizer_path",))
    llm_kw["config"]["vocab_size"] = vocab
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
        pipeline = model.pipeline  # a chain composes: in-LLM members pool what the pre-LLM ones leave
        n_in = pipeline.tokens_in_llm(info.num_patches)
        per_layer = pipeline.tokens_per_layer(n_in, model.llm.num_layers)
        f = forward_flops(shape, text_tokens, per_layer, vision_tokens_per_layer=pipeline.encoder_tokens(info.num_patches),
                          projector_tokens=n_in, lm_head_tokens=1)
        total = f["total"] + pipeline.own_flops(info.num_patches)
        base = base or (f["llm"], total)
        rows.append({
            "compressor": name if name != "configured" else pipeline.describe(),
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


USAGE = "usage: python -m vtc.flops [-h] [compressors=A,B,...] [text_tokens=N] [HYDRA_OVERRIDE ...]"
KEYS = """arguments: Hydra overrides of the train config (conf/train.yaml), e.g. encoder=clip_l14_336
llm=vicuna_7b projector=mlp2x_gelu compressor=pool compressor.stride=4 model.init_from=DIR, and
two keys of this command:
  compressors=A,B,...  compressor configs (conf/compressor/<name>.yaml), one row each; `configured`
                       is the composed config's own compressor (default: none,configured)
  text_tokens=N        text tokens in the prefill (default: 64)
  -h, --help           this text"""


def help_text() -> str:
    return f"{USAGE}\n\n{__doc__.strip()}\n\n{KEYS}"


def parse_args(argv: list[str]) -> tuple[list[str] | None, int, list[str]]:
    """(compressor names, text tokens, Hydra overrides); ``-h``/``--help`` prints the help and
    exits 0, any other dash option exits 2 (Hydra would report it as an unparsable override)."""
    names, text_tokens, overrides = None, 64, []
    for a in argv:
        if a in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if a.startswith("-"):
            print(f"{USAGE}\npython -m vtc.flops: unknown option {a!r} (arguments are Hydra overrides key=value; "
                  "--help lists them)", file=sys.stderr)
            raise SystemExit(2)
        if a.startswith("compressors="):
            names = [n for n in a.split("=", 1)[1].split(",") if n]
        elif a.startswith("text_tokens="):
            text_tokens = int(a.split("=", 1)[1])
        else:
            overrides.append(a)
    return names, text_tokens, overrides


def lm_head_line(cfg) -> str:
    """The LM head's FLOPs (in every row's total) and which vocabulary they assume: the one
    number of the table that a guessed vocabulary changes."""
    from vtc.accounting import model_shape
    from vtc.flops import FLOPS_PER_MAC, lm_head_macs

    shape = model_shape(build_meta(cfg, cfg.compressor))
    vocab, source = meta_vocab(cfg)
    flops = FLOPS_PER_MAC * lm_head_macs(1, shape.llm_d, shape.vocab)
    return (f"LM head (1 logit position, in every total): {flops} FLOPs ({format_flops(flops)}) = 2 x d {shape.llm_d} "
            f"x vocab {shape.vocab}; vocabulary: {vocab}, {source}")


def main(argv: list[str] | None = None) -> str:
    import vtc.config  # noqa: F401  (resolvers)

    argv = list(sys.argv[1:] if argv is None else argv)
    names, text_tokens, overrides = parse_args(argv)
    cfg = compose_conf("train", overrides)
    from vtc.interop.llava import resolve_init_from

    resolve_init_from(cfg)  # model.init_from: encoder/llm/projector from the directory's configs
    names = names or ["none", "configured"]
    table = format_table(rows_for(cfg, names, text_tokens))
    header = (f"Forward FLOPs per sample (FLOPs = 2 x MACs; prefill: {text_tokens} text tokens, logits for "
              f"1 position; encoder run to its selected layer)")
    print(header)
    print(table)
    print(lm_head_line(cfg))
    return table
