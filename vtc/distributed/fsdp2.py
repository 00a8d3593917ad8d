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
