"""``vtc flops [hydra overrides]``: analytic FLOPs of a configured model, no weights.

Builds the encoder and LLM of the composed config on the meta device (so a 7B config costs
nothing), applies the compressor's token accounting, and prints one row per compressor asked for
(``compressors=none,pool,vcc``; default: the configured one and ``none`` for reference).

    vtc flops encoder=clip_l14_336 llm=vicuna_7b compressors=none,pool,stf,fastv,vcc
    vtc flops model.init_from=/models/llava-1.5-7b-hf compressors=none,pool,vcc

With ``model.init_from=DIR`` (+ ``model.vision_tower_path`` for original-LLaVA directories) the
shapes are those of the released model, read from its config files only (no weight is opened).
The LM head's vocabulary is the tokenizer's length for a config-built LLM (llm=tiny: its tokenizer
at ``llm.tokenizer_path``, when built), else the config's ``vocab_size``; the line under the table
says which one was used, and when it was only assumed.
"""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from vtc.assembly.build import build_meta, meta_vocab
from vtc.cli import prog_name
from vtc.config import CONF_DIR, compose_conf
from vtc.cost.accounting import model_shape
from vtc.cost.flops import forward_flops
from vtc.cost.macs import FLOPS_PER_MAC, lm_head_macs
from vtc.cost.table import format_flops, format_table
from vtc.interop.init_from import resolve_init_from


def rows_for(cfg, names: list[str], text_tokens: int) -> list[dict]:
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


ARGS = "[-h] [compressors=A,B,...] [text_tokens=N] [HYDRA_OVERRIDE ...]"
KEYS = """arguments: Hydra overrides of the train config (conf/train.yaml), e.g. encoder=clip_l14_336
llm=vicuna_7b projector=mlp2x_gelu compressor=pool compressor.stride=4 model.init_from=DIR, and
two keys of this command:
  compressors=A,B,...  compressor configs (conf/compressor/<name>.yaml), one row each; `configured`
                       is the composed config's own compressor (default: none,configured)
  text_tokens=N        text tokens in the prefill (default: 64)
  -h, --help           this text"""


def help_text() -> str:
    return f"usage: {prog_name(__name__)} {ARGS}\n\n{__doc__.strip()}\n\n{KEYS}"


def parse_args(argv: list[str]) -> tuple[list[str] | None, int, list[str]]:
    """(compressor names, text tokens, Hydra overrides); ``-h``/``--help`` prints the help and
    exits 0, any other dash option exits 2 (Hydra would report it as an unparsable override)."""
    names, text_tokens, overrides = None, 64, []
    for a in argv:
        if a in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if a.startswith("-"):
            print(f"usage: {prog_name(__name__)} {ARGS}\n{prog_name(__name__)}: unknown option {a!r} (arguments are Hydra overrides key=value; "
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
    shape = model_shape(build_meta(cfg, cfg.compressor))
    vocab, source = meta_vocab(cfg)
    flops = FLOPS_PER_MAC * lm_head_macs(1, shape.llm_d, shape.vocab)
    return (f"LM head (1 logit position, in every total): {flops} FLOPs ({format_flops(flops)}) = 2 x d {shape.llm_d} "
            f"x vocab {shape.vocab}; vocabulary: {vocab}, {source}")


def main(argv: list[str] | None = None) -> str:
    argv = list(sys.argv[1:] if argv is None else argv)
    names, text_tokens, overrides = parse_args(argv)
    cfg = compose_conf("train", overrides)
    resolve_init_from(cfg)  # model.init_from: encoder/llm/projector from the directory's configs
    names = names or ["none", "configured"]
    table = format_table(rows_for(cfg, names, text_tokens))
    header = (f"Forward FLOPs per sample (FLOPs = 2 x MACs; prefill: {text_tokens} text tokens, logits for "
              f"1 position; encoder run to its selected layer)")
    print(header)
    print(table)
    print(lm_head_line(cfg))
    return table


if __name__ == "__main__":
    main()
