"""``vtc parallel [--world N] [hydra overrides]``: the FSDP2 plan's parameters per rank of a
configured model, built on the meta device (``vtc.distributed.fsdp2``)."""
from __future__ import annotations

import sys

from vtc.assembly.build import meta_lmm
from vtc.cli import prog_name
from vtc.distributed.fsdp2 import format_rank_table, fsdp2_units, mixed_requires_grad_units, per_rank_table

DEFAULT_OVERRIDES = ["encoder=clip_l14_336", "llm=vicuna_7b", "projector=mlp2x_gelu"]
HELP = f"""usage: {{prog}} [-h] [--world N] [HYDRA_OVERRIDE ...]

The FSDP2 plan (trainer=fsdp2) of a configured model: its units, and per rank of N the parameters
each holds and allocates (fully_shard's Shard(0) padding), by part. The model is built on the meta
device: no weights, no GPU, no process group.

arguments:
  --world N        ranks of the data-parallel mesh (default: 8)
  HYDRA_OVERRIDE   overrides of the train config (conf/train.yaml), e.g. llm=qwen2_0_5b
                   train_parts=[projector,llm] compressor=pool; none given:
                   {' '.join(DEFAULT_OVERRIDES)} (LLaVA-1.5-7B)
  -h, --help       this text"""


def main(argv: list[str] | None = None) -> str:
    """``vtc parallel [--world N] [hydra overrides]``: the FSDP2 plan's parameters per
    rank of a configured model, built on the meta device. Default: LLaVA-1.5-7B on 8 ranks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog_name(__name__)
    help_text = HELP.format(prog=prog)
    if "-h" in argv or "--help" in argv:
        print(help_text)
        raise SystemExit(0)
    world = 8
    if "--world" in argv:
        i = argv.index("--world")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            print(f"{help_text.splitlines()[0]}\n{prog}: --world takes a positive integer", file=sys.stderr)
            raise SystemExit(2)
        world = int(argv[i + 1])
        del argv[i:i + 2]
    # A dash option is never a Hydra override: name it here instead of a Hydra parse error.
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        print(f"{help_text.splitlines()[0]}\n{prog}: unknown option {unknown[0]!r} (--help lists the "
              "arguments)", file=sys.stderr)
        raise SystemExit(2)
    overrides = argv or DEFAULT_OVERRIDES
    lmm = meta_lmm(overrides)
    rows = per_rank_table(lmm, world)
    total = sum(r.numel for r in rows)
    trainable = sum(r.numel for r in rows if r.trainable)
    text = "\n".join([
        f"FSDP2 plan of `{' '.join(overrides)}` on {world} ranks: {len(rows)} units "
        f"({sum(n.startswith('llm.layers.') for n, _ in fsdp2_units(lmm))} decoder layers, "
        f"{sum(n.startswith('encoder.layers.') for n, _ in fsdp2_units(lmm))} encoder layers, "
        f"{len(rows) - 1 - sum(n.startswith(('llm.layers.', 'encoder.layers.')) for n, _ in fsdp2_units(lmm))} "
        "other units, root); "
        f"{total:,} parameters, {trainable:,} trainable; units mixing frozen and trainable: "
        f"{mixed_requires_grad_units(lmm) or 'none'}.",
        "",
        format_rank_table(rows, world),
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
