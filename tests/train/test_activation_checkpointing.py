"""Activation checkpointing (``activation_checkpointing``, vtc/distributed/activation_checkpointing.py):
the same loss and gradients with and without it, with in-LLM compressors too; the layers are
checkpointed when it is on and not when off, through Lightning's configure_model; FSDP2 and DDP on
2 gloo processes; the config check's refusals; the memory benchmark at tiny sizes."""
from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.tiny import tiny_lmm, toy_batch
from vtc.config import CONF_DIR
from vtc.distributed.activation_checkpointing import apply_activation_checkpointing, is_checkpointed, parse_parts
from vtc.errors import ConfigError

ALL_PARTS = ("encoder", "compressor", "projector", "llm")


def compressor(name: str):
    from vtc.compressors.fastv import FastV
    from vtc.compressors.pyramid_drop import PyramidDrop
    from vtc.compressors.vcc import VisualContextCompressor

    return {"none": lambda: None, "vcc": lambda: VisualContextCompressor(layer=1, stride=2),
            "pyramid_drop": lambda: PyramidDrop(layers=[1, 2], ratio=0.5),
            "fastv": lambda: FastV(layer=1, ratio=0.5)}[name]()


def loss_and_grads(name: str, parts, batch) -> tuple[torch.Tensor, dict]:
    model = tiny_lmm(compressor(name)).train()  # every part trains, the encoder included
    apply_activation_checkpointing(model, parts)
    out = model(batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["none", "vcc", "pyramid_drop", "fastv"])
def test_same_loss_and_gradients_with_and_without(name):
    batch = toy_batch()
    loss0, grads0 = loss_and_grads(name, [], batch)
    loss1, grads1 = loss_and_grads(name, ["llm", "encoder"], batch)
    assert torch.equal(loss0, loss1)
    assert sorted(grads0) == sorted(grads1) and any(k.startswith("encoder.") for k in grads0)
    for k in grads0:  # recomputation runs the same kernels on the same inputs: bit for bit
        assert torch.equal(grads0[k], grads1[k]), k


def test_layers_are_checkpointed_when_on_and_not_when_off():
    from vtc.train.module import LMMModule

    keys = list(tiny_lmm().state_dict())
    for parts, llm_on, enc_on in [((), False, False), (("llm",), True, False), (("llm", "encoder"), True, True)]:
        module = LMMModule(tiny_lmm(), activation_checkpointing=parts)
        module.configure_model()
        module.configure_model()  # Lightning calls it again for test: applied once
        lmm = module.model
        assert [is_checkpointed(m) for m in lmm.llm.layers] == [llm_on] * 3
        assert [is_checkpointed(m) for m in lmm.encoder.layers] == [enc_on] * 3
        assert not is_checkpointed(lmm.llm.decoder.norm)
        assert list(lmm.state_dict()) == keys  # no wrapper: names, checkpoints, FSDP2 units unchanged


def test_lightning_fit_checkpoints_and_matches_the_run_without(tmp_path):
    """Two steps through a real Trainer (single device): configure_model checkpoints the layers and the
    losses are those of the same run without it."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from tests.dist_train import collate, make_samples
    from vtc.train.module import LMMModule

    class Losses(Callback):
        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    runs = {}
    for parts in ((), ("llm",)):
        torch.manual_seed(0)
        module = LMMModule(tiny_lmm(seed=0), lr=3e-3, warmup_ratio=0.0, activation_checkpointing=parts)
        loader = torch.utils.data.DataLoader(make_samples(4), batch_size=2, collate_fn=collate)
        rec = Losses()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=[rec], default_root_dir=str(tmp_path))
        trainer.fit(module, train_dataloaders=loader)
        assert all(is_checkpointed(m) == bool(parts) for m in module.model.llm.layers)
        runs[parts] = rec.losses
    assert len(runs[()]) == 2 and runs[()] == runs[("llm",)]


# -- FSDP2 and DDP, 2 gloo processes -----------------------------------------------------------------

def _distributed(rank: int, world: int, port: int, result_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from tests.dist_train import collate, make_samples
    from vtc.distributed.fsdp2 import apply_fsdp2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = collate(make_samples(4)[rank::world])
        mesh = init_device_mesh("cpu", (world,))
        out = {}
        for kind in ("fsdp2", "ddp"):
            for parts in ((), ("llm", "encoder")):
                lmm = tiny_lmm(compressor("vcc"), seed=0).train()
                apply_activation_checkpointing(lmm, parts)  # before sharding, as configure_model does
                model = apply_fsdp2(lmm, mesh) if kind == "fsdp2" else DistributedDataParallel(lmm)
                loss = model(batch).loss
                loss.backward()
                grads = {n: (p.grad.full_tensor() if kind == "fsdp2" else p.grad).clone()
                         for n, p in lmm.named_parameters() if p.grad is not None}
                out[(kind, parts)] = (loss.detach(), grads)
        for kind in ("fsdp2", "ddp"):
            (l0, g0), (l1, g1) = out[(kind, ())], out[(kind, ("llm", "encoder"))]
            assert torch.equal(l0, l1), (kind, l0, l1)
            assert sorted(g0) == sorted(g1) and g0
            for k in g0:
                assert torch.allclose(g0[k], g1[k], rtol=0, atol=1e-7), (kind, k)
        open(os.path.join(result_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_fsdp2_and_ddp_two_processes_same_loss_and_gradients(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    assert sorted(os.listdir(tmp_path)) == ["ok0", "ok1"]


# -- the config --------------------------------------------------------------------------------------

def cfg(*overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("value, says", [("llm", "not a list"), (True, "not a list"), (["decoder"], "unknown part"),
                                         (["llm", "vision"], "['vision']")])
def test_parse_refuses_bad_values_naming_the_key(value, says):
    with pytest.raises(ConfigError) as e:
        parse_parts(value)
    assert str(e.value).startswith("activation_checkpointing") and says in str(e.value)
    assert parse_parts(None) == parse_parts([]) == ()
    assert parse_parts(["encoder", "llm", "llm"]) == ("encoder", "llm")


def test_config_check_refuses_what_cannot_work():
    from vtc.assembly.checks import check_activation_checkpointing, check_config

    with pytest.raises(ConfigError, match=r"^activation_checkpointing: .*unknown part"):
        check_config(cfg("activation_checkpointing=[decoder]"))
    with pytest.raises(ConfigError, match=r"^activation_checkpointing: .*compile_llm=false"):
        check_activation_checkpointing(cfg("activation_checkpointing=[llm]", "compile_llm=true"))
    with pytest.raises(ConfigError, match=r"^activation_checkpointing: .*compile_llm=auto"):  # auto: on here
        check_activation_checkpointing(cfg("activation_checkpointing=[llm]", "compile_llm=auto"))
    check_activation_checkpointing(cfg("activation_checkpointing=[encoder]", "compile_llm=true"))  # LLM not wrapped
    check_activation_checkpointing(cfg("activation_checkpointing=[llm]", "compile_llm=auto", "trainer.max_steps=10"))
    with pytest.raises(ConfigError, match=r"^trainer.strategy.activation_checkpointing_policy: is not set"):
        check_activation_checkpointing(cfg("trainer=fsdp", "~trainer.strategy.activation_checkpointing_policy"))


def test_fsdp1_policy_is_the_same_knob():
    from hydra.utils import instantiate
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    c = cfg("trainer=fsdp")
    assert list(c.activation_checkpointing) == ["llm", "encoder"]  # as trainer=fsdp always checkpointed
    policy = instantiate(c.trainer.strategy)._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert {LlamaDecoderLayer, CLIPEncoderLayer} <= set(policy._module_classes)
    policy = instantiate(cfg("trainer=fsdp", "activation_checkpointing=[llm]").trainer.strategy)
    classes = set(policy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes)
    assert LlamaDecoderLayer in classes and CLIPEncoderLayer not in classes
    assert instantiate(cfg("trainer=fsdp", "activation_checkpointing=[]").trainer.strategy) \
        ._activation_checkpointing_kwargs == {}
    assert list(cfg().activation_checkpointing) == [] and list(cfg("trainer=fsdp2").activation_checkpointing) == []


# -- the benchmark -----------------------------------------------------------------------------------

def test_memory_bench_reports_a_lower_peak_with_checkpointing():
    from vtc.bench import common as C
    from vtc.bench import memory

    res = memory.run(C.QUICK, steps=1, repeats=1, threads=1, train_encoder=True, log=lambda m: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["off", "llm", "llm+encoder"]
    assert rows["llm"]["peak_bytes"] < rows["off"]["peak_bytes"]
    assert rows["llm+encoder"]["peak_bytes"] < rows["llm"]["peak_bytes"]
    assert rows["llm"]["held_bytes"] < rows["off"]["held_bytes"]
    assert all(r["loss_diff"] == 0.0 for r in rows.values())
    md = memory.to_markdown(res)
    assert "| [llm] |" in md and "| [llm, encoder] |" in md
