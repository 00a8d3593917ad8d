"""LoRA adapters on the LLM's linear layers (peft), added to a built ``LanguageModel`` from outside.

LLaVA-1.5's ``finetune_lora.sh``: rank 128, alpha 256, dropout 0.05, on every linear layer of the
LLM but the LM head (``find_all_linear_names`` in llava/train/train.py: q/k/v/o and gate/up/down
for Llama and Qwen2); the embeddings, norms and LM head stay frozen, the projector trains fully.

peft's ``inject_adapter_in_model`` swaps each target ``nn.Linear`` in place for a ``lora.Linear``
that holds the original layer (``base_layer``) and the adapters (``lora_A``, ``lora_B``); the
module tree keeps its paths, so the layer loop (vtc/model/llm.py) and the compressors that call a
layer's projections to recompute attention rows (FastV, DART, SparseVLM, PyramidDrop call
``self_attn.q_proj(x)`` / ``k_proj(x)``) run the adapted projections with no change. Parameter
names gain ``.base_layer`` / ``.lora_A.default`` / ``.lora_B.default``, so a checkpoint of a LoRA
run loads into a model built with the same ``llm.lora``; :func:`merge_lora` folds the adapters
into the base weights and restores plain ``nn.Linear`` layers (the exported model needs no peft).

peft is imported inside the functions: only a run with LoRA on pays for it.
"""
from __future__ import annotations

from torch import nn

# The adapters' parameters carry these in their names (peft's LoRA layers); nothing else in the
# LLMs vtc builds does.
ADAPTER_KEYS = ("lora_A", "lora_B")


def linear_target_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """LLaVA's ``find_all_linear_names`` over an HF causal LM: the last name of every ``nn.Linear``
    (``q_proj``, ..., ``down_proj``), sorted, without the LM head (LLaVA removes it: it is tied to
    the embedding in some models, and its vocabulary-wide adapter would cost as much as a layer)."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - set(skip))


def add_lora(llm, r: int, alpha: float, dropout: float = 0.0, target_modules: list[str] | None = None) -> list[str]:
    """Add LoRA adapters (rank ``r``, scale ``alpha / r``) to ``llm`` (a ``LanguageModel``) in
    place; returns the target names. ``target_modules=None``: every linear layer but the LM head.
    The adapters start as a no-op (peft's default: ``lora_B`` zero), so the model computes what it
    did before; everything but the adapters is left frozen (``LMMModule`` decides again from
    ``train_parts``)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = sorted(target_modules) if target_modules else linear_target_names(llm.model)
    config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=targets,
                        bias="none")
    inject_adapter_in_model(config, llm.model)
    return targets


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in ``module``; empty without LoRA (peft not imported
    then: a model without adapters never needs it)."""
    if not any(any(k in name for k in ADAPTER_KEYS) for name, _ in module.named_parameters()):
        return []
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_lora(module: nn.Module) -> bool:
    return bool(lora_layers(module))


def is_adapter(param_name: str) -> bool:
    return any(f".{k}." in f".{param_name}" for k in ADAPTER_KEYS)


def freeze_base(module: nn.Module) -> None:
    """Only the adapters of ``module`` train: every other parameter of it is frozen."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_adapter(name))


def merge_lora(llm) -> int:
    """Fold the adapters of ``llm`` (a ``LanguageModel``) into the base weights (W += B A alpha/r)
    and put the plain ``nn.Linear`` back in each adapted layer's place, in place; returns how
    many layers were merged (0 without LoRA). The merged model computes the same function, with
    no peft in it: its state dict has the base model's own keys."""
    layers = lora_layers(llm.model)
    for name, layer in layers:
        layer.merge(safe_merge=True)  # safe: refuses non-finite merged weights instead of writing them
        parent, _, child = name.rpartition(".")
        setattr(llm.model.get_submodule(parent), child, layer.get_base_layer())
    if layers and hasattr(llm.model, "peft_config"):
        del llm.model.peft_config  # peft's bookkeeping, left on the model by inject_adapter_in_model
    return len(layers)


def lora_parameter_count(llm) -> int:
    """Elements of the adapters: r * (in + out) per adapted layer."""
    return sum(p.numel() for name, p in llm.named_parameters() if is_adapter(name))
