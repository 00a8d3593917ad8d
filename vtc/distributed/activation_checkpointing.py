"""Activation (gradient) checkpointing of the LLM's decoder layers and the encoder's blocks,
applied from outside the model: ``activation_checkpointing`` in conf/train.yaml, a list of parts
(``[llm]``, ``[llm, encoder]``, ``[]``).

A checkpointed layer keeps only its inputs for backward and runs its forward again when backward
reaches it: activation memory falls from every intermediate of every layer to one layer's at a
time, for about one more forward of those layers (experiments/bench/memory.md).

How: ``torch.distributed._composable.checkpoint`` (non-reentrant ``torch.utils.checkpoint``
installed as forward pre/post hooks). Unlike a ``CheckpointWrapper`` it leaves the module tree as it
is: the layer keeps its class, its attributes (in-LLM compressors read ``layer.self_attn``, FastV and
DART recompute rows with it), its parameter names (state dicts, checkpoints, the FSDP2 plan's units)
and its forward signature. In-LLM compressors act between layers, on the layers' outputs, so a
layer recomputed in backward sees exactly the inputs it saw forward: same loss, same gradients
(tests/train/test_activation_checkpointing.py, bit for bit on the CPU).

Where each strategy gets it (one policy, ``checkpoint_targets`` / ``part_layer_classes``):
  - single device, DDP, FSDP2: ``LMMModule.configure_model`` calls ``configure_activation_checkpointing``
    before ``configure_fsdp2``: the hooks go on first, so FSDP2's own hooks (gather, reshard) also run
    around the recomputation in backward;
  - FSDP1 (``trainer=fsdp``): Lightning's FSDPStrategy checkpoints after it wraps, by layer class;
    conf/trainer/fsdp.yaml builds that policy from the same knob with ``part_layer_classes``.

What it does not combine with: ``compile_llm`` (the hooks would recompute the eager layer in
backward, which saves other tensors than the compiled one did: torch raises a CheckpointError);
the config check refuses the pair. A frozen part keeps no activations for backward, so listing the
encoder saves memory only when ``train_parts`` has it (it is harmless otherwise: nothing is recomputed).
ToMe's merging blocks call a block's submodules directly and are not checkpointed.
"""
from __future__ import annotations

from torch import nn

from vtc.distributed.fsdp2 import layer_classes
from vtc.errors import ConfigError

KEY = "activation_checkpointing"
PARTS = ("llm", "encoder")


def parse_parts(value) -> tuple[str, ...]:
    """The parts a ``activation_checkpointing`` value names (null = none), in order, once each; a
    value that is not a list of ``llm`` / ``encoder`` raises ConfigError naming the key."""
    if value is None:
        return ()
    example = "use a list: activation_checkpointing=[llm], [llm,encoder] or [] (none)"
    if isinstance(value, (str, bool, int, float)):
        raise ConfigError(KEY, f"{value!r} is not a list of parts; {example}")
    try:
        names = [str(v) for v in value]
    except TypeError:
        raise ConfigError(KEY, f"{value!r} is not a list of parts; {example}") from None
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        raise ConfigError(KEY, f"unknown part(s) {unknown}; the parts with layers to checkpoint are "
                          f"{list(PARTS)} ({example})")
    return tuple(dict.fromkeys(names))


def checkpoint_targets(lmm, parts) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer the parts checkpoint: each LLM decoder layer, each encoder block."""
    parts = parse_parts(parts)
    out: list[tuple[str, nn.Module]] = []
    if "llm" in parts:
        out += [(f"llm.layers.{i}", layer) for i, layer in enumerate(lmm.llm.layers)]
    if "encoder" in parts:
        out += [(f"encoder.layers.{i}", layer) for i, layer in enumerate(lmm.encoder.layers)]
    return out


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``apply_activation_checkpointing`` checkpointed ``module`` (the composable APIs a module
    has had applied are in its registry; reading it, unlike ``checkpoint.state``, changes nothing)."""
    from torch.distributed._composable.contract import _get_registry

    return "checkpoint" in (_get_registry(module) or {})


def apply_activation_checkpointing(lmm, parts) -> list[str]:
    """Checkpoint the layers of ``parts`` in place (once: a layer already checkpointed is left as it
    is, since Lightning calls ``configure_model`` again for test). Returns the names checkpointed now."""
    from torch.distributed._composable import checkpoint

    done = []
    for name, module in checkpoint_targets(lmm, parts):
        if not is_checkpointed(module):
            checkpoint(module)  # non-reentrant, RNG state preserved (dropout recomputes the same mask)
            done.append(name)
    return done


def configure_activation_checkpointing(lightning_module, parts) -> list[str]:
    """``LMMModule.configure_model``'s hook (before FSDP2 shards the layers). Under FSDP1
    (Lightning's FSDPStrategy) nothing: the strategy applies the same policy itself, after wrapping
    (conf/trainer/fsdp.yaml), and checkpointing twice would recompute twice."""
    from lightning.pytorch.strategies import FSDPStrategy

    trainer = getattr(lightning_module, "_trainer", None)
    if trainer is not None and isinstance(trainer.strategy, FSDPStrategy):
        return []
    return apply_activation_checkpointing(lightning_module.model, parts)


def part_layer_classes(parts, layers: dict) -> set[type] | None:
    """The layer classes of ``parts``, from ``layers`` = {part: [dotted class paths]}, for
    FSDPStrategy's ``auto_wrap_policy`` and ``activation_checkpointing_policy`` (conf/trainer/fsdp.yaml);
    None when ``parts`` is empty (Lightning: no checkpointing). Classes this transformers lacks are skipped."""
    parts = parse_parts(parts)
    if not parts:
        return None
    return layer_classes([name for part in parts for name in (layers.get(part) or [])])
