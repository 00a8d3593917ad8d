"""Scale-out pieces that need no second process: the trainer configs compose into the right
strategies, attention `auto` resolves to SDPA without CUDA, the FSDP2 plan and its sharding
arithmetic, and the consolidation's optimizer renumbering."""
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from vtc.config import CONF_DIR
from vtc.config import world_size_from
from vtc.distributed.fsdp2 import fsdp2_units, mixed_requires_grad_units, per_rank_table, shard_numel, unit_params
from tests.tiny import tiny_lmm


def trainer_cfg(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides)).trainer


def test_fsdp2_config_is_a_data_parallel_model_parallel_strategy():
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = trainer_cfg("trainer=fsdp2", "trainer.devices=4", "trainer.num_nodes=2")
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert strategy._data_parallel_size == 8 and strategy._tensor_parallel_size == 1
    assert strategy._save_distributed_checkpoint
    assert cfg.precision == "bf16-mixed" and cfg.accelerator == "gpu"


def test_world_size_from_devices_nodes_or_the_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert world_size_from(8, 2) == 16
    assert world_size_from("2", 1) == 2
    assert world_size_from([0, 1, 2], 2) == 6
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert world_size_from("auto", 2) == 16
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world_size_from("auto", 1) == 4


def test_ddp_config():
    from lightning.pytorch.strategies import DDPStrategy

    cfg = trainer_cfg("trainer=ddp")
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._process_group_backend is None  # Lightning: nccl on CUDA, gloo on CPU
    assert strategy._ddp_kwargs["find_unused_parameters"] is False


def test_fsdp_config_wraps_and_checkpoints_decoder_and_encoder_layers():
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    cfg = trainer_cfg("trainer=fsdp")
    strategy = instantiate(cfg.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert cfg.precision == "bf16-mixed" and strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] is True
    wrap = strategy.kwargs["auto_wrap_policy"]
    ac = strategy._activation_checkpointing_kwargs
    layers = {LlamaDecoderLayer, CLIPEncoderLayer, SiglipEncoderLayer}
    assert layers <= set(wrap._module_classes)
    assert layers <= set(ac["auto_wrap_policy"]._module_classes)


def test_attention_auto_resolves_to_sdpa_without_cuda():
    from vtc.model.encoder import VisionEncoder
    from vtc.model.llm import LanguageModel, resolve_attn_implementation

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_attn_implementation("auto", "cuda") in ("sdpa", "flash_attention_2")
    enc = VisionEncoder.build(kind="clip", config=dict(image_size=28, patch_size=14, hidden_size=16,
                              intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
                              attn_implementation="auto")
    assert enc.model.config._attn_implementation == "sdpa"
    llm = LanguageModel.build(config=dict(model_type="llama", vocab_size=20, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2),
                              attn_implementation="auto")
    assert llm.model.config._attn_implementation == "sdpa"


def test_plan_units_are_whole_parts_and_never_mix_frozen_and_trainable():
    lmm = tiny_lmm()
    names = [n for n, _ in fsdp2_units(lmm)]
    assert names[:3] == ["llm.layers.0", "llm.layers.1", "llm.layers.2"]
    assert names[3:6] == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2"]
    assert names[-1] == "root"
    owned = [id(p) for _, ps in unit_params(lmm) for _, p in ps]
    assert len(owned) == len(set(owned)) == len(list(lmm.parameters()))  # every parameter, once
    for trainable in (("projector", "compressor", "llm"), ("projector", "compressor"), ("llm",)):
        for part in ("encoder", "compressor", "projector", "llm"):
            for p in getattr(lmm, part).parameters():
                p.requires_grad_(part in trainable)
        assert mixed_requires_grad_units(lmm) == []


def test_shard_numel_matches_torch_chunk():
    for rows, world in [(577, 8), (10, 8), (4096, 8), (3, 2), (50, 2)]:
        chunks = torch.arange(rows).chunk(world)
        for r in range(world):
            held, padded = shard_numel((rows, 3), world, r)
            assert held == (len(chunks[r]) * 3 if r < len(chunks) else 0)
            assert padded == len(chunks[0]) * 3
        assert sum(shard_numel((rows, 3), world, r)[0] for r in range(world)) == rows * 3


def test_per_rank_table_sums_to_the_model():
    lmm = tiny_lmm()
    rows = per_rank_table(lmm, 8)
    total = sum(p.numel() for p in lmm.parameters())
    assert sum(sum(r.held) for r in rows) == total
    assert all(h <= p for r in rows for h, p in zip(r.held, r.padded))


def test_consolidate_renumbers_a_named_optimizer_state():
    from vtc.distributed.consolidate import _renumber_optimizer

    named = {"state": {"b": {"step": torch.tensor(1.0)}, "a": {"step": torch.tensor(2.0)}},
             "param_groups": [{"lr": 1.0, "params": ["a"]}, {"lr": 2.0, "params": ["c", "b"]}]}
    out = _renumber_optimizer(named)
    assert [g["params"] for g in out["param_groups"]] == [[0], [1, 2]]
    assert set(out["state"]) == {0, 2} and float(out["state"][2]["step"]) == 1.0
    assert _renumber_optimizer(out) is out  # already numbered
