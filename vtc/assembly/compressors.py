"""How a run's config composes its compressors and schedule, and what the config check refuses.

``build_compressors(cfg)`` is the one place the configured compressor (``cfg.compressor``: one
method or a ``Chain``) and the member a training schedule adds (``cfg.schedule.adds``) are
instantiated; the model builder and the config check both call it, so what is checked is what is
built. ``check_compression(cfg, info, depth)`` refuses, before data, model or MLflow run exist:
two compressors at one site, a member's own bad knob (under the key the user typed), a schedule
stage whose knobs do not fit the chain (naming the stage), a schedule adding a member with
parameters or not ending with it off, a method that needs a CLS token the encoder lacks, an
attention kernel a member cannot run with, and methods FSDP1 cannot run.
"""
from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vtc.compressors.chain import Pipeline
from vtc.compressors.schedule import validate_schedule
from vtc.errors import ConfigError
from vtc.model.llm import MASK_FUNCTION_KERNELS, resolve_attn_implementation


def schedule_of(cfg: DictConfig) -> dict:
    node = cfg.get("schedule")
    return OmegaConf.to_container(node, resolve=True) if node else {}


def build_compressors(cfg: DictConfig, training: bool = True):
    """(configured compressor, the schedule's added member or None). ``training=False`` (eval,
    export): the deployed model, which a schedule's added member is never part of."""
    compressor = instantiate(cfg.compressor)
    sched = schedule_of(cfg) if training else {}
    added = instantiate(sched["adds"]) if sched.get("adds") and sched.get("stages") else None
    return compressor, added


def _device_type(cfg: DictConfig) -> str:
    acc = str(OmegaConf.select(cfg, "trainer.accelerator") or "cpu")
    return "cuda" if acc in ("gpu", "cuda") else "cpu" if acc == "cpu" else acc


def check_attention(cfg: DictConfig, pipeline: Pipeline) -> None:
    """Kernels that cannot run here, and members that cannot run with the chosen kernel."""

    device = _device_type(cfg)
    kernels = {}
    for part in ("encoder", "llm"):
        choice = OmegaConf.select(cfg, f"{part}.attn_implementation") or "sdpa"
        kernel = resolve_attn_implementation(choice, "cuda" if device == "cuda" else "cpu")
        if kernel == "flash_attention_2" and device != "cuda":
            raise ConfigError(f"{part}.attn_implementation", "flash_attention_2 runs on CUDA GPUs only (trainer=gpu, "
                              "and `pip install -e .[gpu]`); use sdpa, or auto to pick it where it can run")
        kernels[part] = kernel
    tome = pipeline.by_site.get("vision")
    if tome is not None and getattr(tome, "prop_attn", False) and kernels["encoder"] == "flash_attention_2":
        raise ConfigError(f"{pipeline.keys['vision']}.prop_attn", "ToMe's proportional attention adds log(size) to "
                          "the logits, which flash_attention_2 cannot take; set encoder.attn_implementation=sdpa "
                          f"or {pipeline.keys['vision']}.prop_attn=false")
    member = pipeline.by_site.get("llm")
    if member is not None and hasattr(member, "attention_rule") and kernels["llm"] not in MASK_FUNCTION_KERNELS:
        raise ConfigError("llm.attn_implementation", f"{type(member).__name__} hides the visual tokens from the text "
                          f"by an attention mask, which {kernels['llm']} cannot take (it only skips padding); set "
                          "llm.attn_implementation=sdpa (or eager)")


def check_strategy(cfg: DictConfig, pipeline: Pipeline) -> None:
    target = str(OmegaConf.select(cfg, "trainer.strategy._target_") or OmegaConf.select(cfg, "trainer.strategy") or "")
    if not target.endswith("FSDPStrategy"):
        return
    for site, member in pipeline.by_site.items():
        if member.reads_layer_weights:
            raise ConfigError(pipeline.keys[site], f"{type(member).__name__} reads a layer's weights outside that "
                              "layer's forward, where FSDP1 (trainer=fsdp) keeps them as flat shards; use "
                              "trainer=fsdp2, which vtc unshards for it")


def check_compression(cfg: DictConfig, info, depth: int, training: bool = True) -> Pipeline:
    compressor, added = build_compressors(cfg, training)
    pipeline = Pipeline.of(compressor, added)
    pipeline.check(info, depth)
    for site, member in pipeline.by_site.items():
        if member.needs_cls and not info.has_cls:
            raise ConfigError(pipeline.keys[site], f"{type(member).__name__} reads the CLS token, which "
                              f"encoder={cfg.encoder.get('kind')} does not have")
    check_attention(cfg, pipeline)
    check_strategy(cfg, pipeline)
    if added is not None:
        import torch

        with torch.device("meta"):  # real-size widths cost nothing here
            added.setup(info, 8)
        if list(added.parameters()) or list(added.buffers()):
            raise ConfigError("schedule.adds", f"{type(added).__name__} has parameters; a schedule may add only a "
                              "parameter-free compressor (it is not part of the deployed model)")
    sched = schedule_of(cfg) if training else {}
    target = added if added is not None else compressor
    validate_schedule(sched, pipeline, target, added, info, depth)
    return pipeline
