"""Parallelism applied from outside the model (torchtitan's habit): the model code never knows.

FSDP2 (``torch.distributed.fsdp.fully_shard``) under Lightning's ``ModelParallelStrategy``
(``trainer=fsdp2``): ``LMMModule.configure_model`` calls ``configure_fsdp2``, which shards the LMM
block by block with ``apply_fsdp2``. The plan (``fsdp2_units``), innermost first:

  1. each LLM decoder layer                         (trainable when ``llm`` trains)
  2. each vision-encoder layer                      (frozen, as LLaVA freezes CLIP)
  3. the rest of the encoder (patch/position embeddings, pre/post layer norms)
  4. the LLM's token embedding, final norm and LM head (one unit each; kept in the root when the
     embedding is tied to the head, e.g. Qwen2-0.5B)
  5. the root: the LMM itself (projector, compressor weights, anything left)

Every unit is a module whose own ``forward`` is called by the model code (an FSDP2 unit gathers its
parameters in its forward pre-hook), and no unit mixes parts, so a unit is either wholly frozen or
wholly trainable for every ``train_parts`` (``mixed_requires_grad_units`` checks it). FSDP2 would
cope with mixed units, but frozen encoder layers as their own units never enter gradient
reduce-scatters and never keep gradient buffers. ``LMM.generate`` is registered as a forward
method of the root, so evaluation (greedy decoding) gathers the root's parameters like forward does.

Sharding arithmetic (``shard_numel``): fully_shard shards every parameter separately along dim 0
(``Shard(0)``): the rows are split with ``torch.chunk`` into ``W`` pieces of ``ceil(d0 / W)`` rows;
rank ``r`` holds rows ``[r*c, min((r+1)*c, d0))`` (possibly none) and allocates the padded
``c * prod(rest)`` elements. ``per_rank_table`` applies that to every parameter of every unit of
the plan, without a process group, on a model built on the meta device.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from torch import nn

# -- the plan -------------------------------------------------------------------------------------


def _tied(llm) -> bool:
    head = getattr(llm.model, "lm_head", None)
    emb = llm.decoder.embed_tokens
    return head is not None and getattr(head, "weight", None) is emb.weight


def fsdp2_units(lmm) -> list[tuple[str, nn.Module]]:
    """The modules ``apply_fsdp2`` hands to ``fully_shard``, in that order; the root is last."""
    units: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(lmm.llm.layers):
        units.append((f"llm.layers.{i}", layer))
    for i, layer in enumerate(lmm.encoder.layers):
        units.append((f"encoder.layers.{i}", layer))
    units.append(("encoder", lmm.encoder))
    dec = lmm.llm.decoder
    if not _tied(lmm.llm):
        units.append(("llm.embed_tokens", dec.embed_tokens))
        units.append(("llm.lm_head", lmm.llm.model.lm_head))
    units.append(("llm.norm", dec.norm))
    units.append(("root", lmm))
    return units


def unit_params(lmm) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """Each unit's own parameters (name, parameter): those of its module not already claimed by an
    earlier (inner) unit, exactly the set fully_shard manages for that unit."""
    claimed: set[int] = set()
    out = []
    for name, mod in fsdp2_units(lmm):
        own = []
        for pname, p in mod.named_parameters():
            if id(p) in claimed:
                continue
            claimed.add(id(p))
            own.append((pname, p))
        out.append((name, own))
    return out


def mixed_requires_grad_units(lmm) -> list[str]:
    """Units that would hold both frozen and trainable parameters (should be none)."""
    return [name for name, ps in unit_params(lmm) if len({p.requires_grad for _, p in ps}) > 1]


# -- applying it ----------------------------------------------------------------------------------


def apply_fsdp2(lmm, mesh, mp_policy=None, reshard_after_forward: bool = True):
    """Shard ``lmm`` in place with FSDP2 over ``mesh`` (a 1-D data-parallel DeviceMesh), block by
    block (``fsdp2_units``), then the root. ``mp_policy``: an optional
    ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. bf16 parameters, fp32 reductions);
    left ``None``, parameters are gathered in their stored dtype and Lightning's precision
    plugin (``bf16-mixed`` autocast) does the mixed precision."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    units = fsdp2_units(lmm)
    for _, module in units[:-1]:
        fully_shard(module, **kwargs)
    fully_shard(lmm, **kwargs)
    # Calls must go through a forward of the root: generate is made one.
    register_fsdp_forward_method(lmm, "generate")
    return lmm


def is_fsdp2(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def configure_fsdp2(lightning_module) -> bool:
    """``LMMModule.configure_model``'s hook: shard ``lightning_module.model`` when the trainer's
    strategy is ``ModelParallelStrategy`` (once: fit then test calls the hook twice). Returns
    whether the model is sharded."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = getattr(lightning_module, "_trainer", None)
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return False
    lmm = lightning_module.model
    if is_fsdp2(lmm):
        return True
    mesh = lightning_module.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise NotImplementedError(
            f"trainer.strategy.tensor_parallel_size={mesh['tensor_parallel'].size()}: vtc applies FSDP2 only; "
            "set tensor_parallel_size=1 and data_parallel_size=devices*num_nodes (conf/trainer/fsdp2.yaml)"
        )
    apply_fsdp2(lmm, mesh["data_parallel"])
    return True


# -- the per-rank arithmetic (no process group) ---------------------------------------------------


def shard_numel(shape, world: int, rank: int) -> tuple[int, int]:
    """(held, padded) elements of a parameter of ``shape`` on ``rank`` of ``world`` under
    fully_shard's default Shard(0): rows split by torch.chunk, the last ranks possibly empty."""
    shape = tuple(shape)
    if not shape:  # a 0-d parameter is treated as one row
        shape = (1,)
    rows, rest = shape[0], math.prod(shape[1:])
    c = math.ceil(rows / world)
    held_rows = max(0, min(c, rows - rank * c))
    return held_rows * rest, c * rest


@dataclass
class UnitShards:
    name: str
    numel: int  # parameters of the unit
    trainable: bool
    held: list[int]  # per rank
    padded: list[int]  # per rank


def per_rank_table(lmm, world: int) -> list[UnitShards]:
    """For each FSDP unit of the plan: its parameter count and what each of ``world`` ranks holds."""
    rows = []
    for name, params in unit_params(lmm):
        held = [0] * world
        padded = [0] * world
        for _, p in params:
            for r in range(world):
                h, pd = shard_numel(p.shape, world, r)
                held[r] += h
                padded[r] += pd
        rows.append(UnitShards(name, sum(p.numel() for _, p in params),
                               any(p.requires_grad for _, p in params), held, padded))
    return rows


def format_rank_table(rows: list[UnitShards], world: int) -> str:
    """Markdown: per rank, parameters held (and allocated with FSDP2's padding), by part."""
    def group(name: str) -> str:
        if name.startswith("llm.layers."):
            return "LLM decoder layers"
        if name.startswith("encoder.layers."):
            return "encoder layers"
        if name.startswith("llm."):
            return "LLM embed / norm / head"
        if name == "encoder":
            return "encoder embeddings + norms"
        return "root (projector, compressor)"

    groups: dict[str, list[UnitShards]] = {}
    for r in rows:
        groups.setdefault(group(r.name), []).append(r)
    head = "| rank | " + " | ".join(groups) + " | held | allocated (padded) |"
    lines = [head, "|" + "---|" * (len(groups) + 3)]
    for rank in range(world):
        cells = [f"{sum(u.held[rank] for u in us):,}" for us in groups.values()]
        held = sum(u.held[rank] for u in rows)
        padded = sum(u.padded[rank] for u in rows)
        lines.append(f"| {rank} | " + " | ".join(cells) + f" | {held:,} | {padded:,} |")
    total = sum(u.numel for u in rows)
    cells = [f"{sum(u.numel for u in us):,}" for us in groups.values()]
    lines.append("| sum | " + " | ".join(cells) + f" | {total:,} | {sum(sum(u.padded) for u in rows):,} |")
    return "\n".join(lines)


def world_size_from(devices, num_nodes) -> int:
    """``devices * num_nodes`` for the data-parallel mesh; ``devices: auto`` (or -1) reads the
    launcher: WORLD_SIZE (torchrun), SLURM_NTASKS (srun), else the visible GPUs times nodes."""
    nodes = int(num_nodes)
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) * nodes
    if str(devices) not in ("auto", "-1"):
        return int(devices) * nodes
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    import torch

    return max(torch.cuda.device_count(), 1) * nodes


def layer_classes(names: list[str]) -> set[type]:
    """Classes from dotted paths, for FSDPStrategy's auto-wrap and activation-checkpointing
    policies (conf/trainer/fsdp.yaml); a module that this transformers lacks is skipped."""
    import importlib

    out = set()
    for name in names:
        mod, _, cls = str(name).rpartition(".")
        try:
            out.add(getattr(importlib.import_module(mod), cls))
        except (ImportError, AttributeError):
            continue
    if not out:
        raise ValueError(f"none of the layer classes {list(names)} could be imported")
    return out


# -- sharded checkpoints --------------------------------------------------------------------------

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path) -> bool:
    """A folder written by ModelParallelStrategy / FSDPStrategy(state_dict_type=sharded):
    torch.distributed.checkpoint shards + ``.metadata`` + Lightning's ``meta.pt``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def checkpoint_meta(path) -> dict:
    """Everything but weights and optimizer states: the whole file of a single-file checkpoint
    (memory-mapped, not read), ``meta.pt`` of a sharded one. Loaded with weights_only=True."""
    import torch

    path = os.fspath(path)
    if is_sharded_checkpoint(path):
        return torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


# -- python -m vtc.parallel -----------------------------------------------------------------------


def meta_lmm(overrides: list[str]):
    """The configured LMM on the meta device (no weights, no files), parts frozen as
    ``train_parts`` says, as LMMModule freezes them."""
    from vtc.config import compose_conf
    from vtc.flops_cli import build_meta

    cfg = compose_conf("train", overrides)
    lmm = build_meta(cfg, cfg.compressor)
    for part in ("encoder", "compressor", "projector", "llm"):
        for p in getattr(lmm, part).parameters():
            p.requires_grad_(part in cfg.train_parts)
    return lmm


DEFAULT_OVERRIDES = ["encoder=clip_l14_336", "llm=vicuna_7b", "projector=mlp2x_gelu"]
HELP = f"""usage: python -m vtc.parallel [-h] [--world N] [HYDRA_OVERRIDE ...]

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
    """``python -m vtc.parallel [--world N] [hydra overrides]``: the FSDP2 plan's parameters per
    rank of a configured model, built on the meta device. Default: LLaVA-1.5-7B on 8 ranks."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(HELP)
        raise SystemExit(0)
    world = 8
    if "--world" in argv:
        i = argv.index("--world")
        if i + 1 >= len(argv) or not argv[i + 1].isdigit() or int(argv[i + 1]) < 1:
            print(f"{HELP.splitlines()[0]}\npython -m vtc.parallel: --world takes a positive integer", file=sys.stderr)
            raise SystemExit(2)
        world = int(argv[i + 1])
        del argv[i:i + 2]
    # A dash option is never a Hydra override: name it here instead of a Hydra parse error.
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
        print(f"{HELP.splitlines()[0]}\npython -m vtc.parallel: unknown option {unknown[0]!r} (--help lists the "
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
