"""LoRA on the LLM (``llm.lora``; vtc/model/lora.py, vtc/assembly/lora.py): what trains, what a few
steps change, resuming, the merged export against the adapters, an in-LLM compressor scoring with
the adapted projections, the config check's refusals, eval on a LoRA checkpoint = eval on its
merged export."""
from __future__ import annotations

import copy
import sys

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import OmegaConf

from vtc.assembly.checks import check_config
from vtc.assembly.lora import apply_lora
from vtc.compressors.fastv import FastV
from vtc.config import compose_conf
from vtc.errors import ConfigError
from vtc.model.llm import LanguageModel
from vtc.model.lora import add_lora, has_lora, is_adapter, lora_layers, merge_lora
from vtc.train.module import LMMModule
from vtc.lmm import LMM
from tests.tiny import spy, tiny_encoder, tiny_lmm, toy_batch


def shake_adapters(model, std: float = 0.3, seed: int = 1) -> None:
    """Non-zero lora_B (peft starts it at zero: a no-op), as training would leave it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model.llm.model):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * std)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    st = model.build_sequence(batch["input_ids"], batch["attention_mask"], None, batch["pixel_values"],
                              batch["image_index"])
    out, _, _ = model.llm.run_layers(st, model.pipeline.active("llm"))
    return model.llm.logits(out.hidden) * out.attention_mask[..., None]


# -- what trains --------------------------------------------------------------------------------


def test_only_adapters_and_the_other_train_parts_train_and_the_count_is_r_times_in_plus_out():
    """conf/llm/tiny.yaml's LLM: d=128, FFN 512, 4 layers, 4 KV heads (k/v are 128 wide)."""
    cfg = compose_conf("train", ["llm.lora.r=8"])
    torch.manual_seed(0)
    llm = LanguageModel.build(config={**OmegaConf.to_container(cfg.llm.config), "vocab_size": 50})
    model = LMM(tiny_encoder(), llm, None, "mlp2x_gelu", image_token_id=49, pad_token_id=0, eos_token_id=2)
    apply_lora(model, cfg)
    module = LMMModule(model, train_parts=("projector", "compressor", "llm"))
    r, d, f, layers = 8, 128, 512, 4
    per_layer = 4 * r * (d + d) + 2 * r * (d + f) + r * (f + d)  # q k v o; gate up; down
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    llm_trainable = sum(p.numel() for n, p in trainable.items() if n.startswith("llm."))
    assert llm_trainable == layers * per_layer == 11776 * r
    assert all(is_adapter(n) for n in trainable if n.startswith("llm."))
    assert {n.split(".")[0] for n in trainable} == {"projector", "llm"}  # the encoder stays frozen
    assert sum(p.numel() for n, p in trainable.items() if n.startswith("projector.")) == sum(
        p.numel() for p in model.projector.parameters())
    assert module.cost_parts == ("projector", "compressor")  # FLOPs: no weight gradients in the LLM
    # Without llm in train_parts the adapters are frozen too (the config check refuses that run).
    module = LMMModule(model, train_parts=("projector",))
    assert not any(p.requires_grad for p in model.llm.parameters())


# -- training, checkpoints, resuming ------------------------------------------------------------


def lora_tiny(seed: int = 0, r: int = 4) -> LMM:
    model = tiny_lmm(seed=seed)
    torch.manual_seed(seed)
    add_lora(model.llm, r=r, alpha=2 * r, dropout=0.0)  # no dropout: steps replay exactly on resume
    return model


def batches(n: int = 2) -> list[dict]:
    out = []
    for i in range(n):
        b = toy_batch(seed=i)
        b["ids"] = [f"s{i}-{j}" for j in range(3)]
        out.append(b)
    return out


class Losses(Callback):
    def __init__(self, stop_at: int | None = None):
        self.losses, self.stop_at = {}, stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def fit(module, steps: int, stop_at: int | None = None, ckpt_path: str | None = None,
        save_to: str | None = None) -> tuple[L.Trainer, dict]:
    """``save_to``: a folder the run checkpoints into every 2 steps (``last.ckpt``), as train.py's
    ModelCheckpoint does."""
    rec = Losses(stop_at)
    saving = [ModelCheckpoint(dirpath=save_to, every_n_train_steps=2, save_last=True)] if save_to else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=bool(saving),
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[rec, *saving])
    loader = torch.utils.data.DataLoader(batches(), batch_size=None)  # one epoch = 2 steps
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt_path)
    return trainer, rec.losses


def test_steps_change_the_adapters_not_the_base_and_a_resumed_run_continues_exactly(tmp_path):
    model = lora_tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = LMMModule(model, lr=1e-2, projector_lr=1e-3, warmup_ratio=0.0)
    trainer, straight = fit(module, 4)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if is_adapter(k)}
    assert adapters and {k for k in adapters if "lora_B" in k} <= changed  # B leaves zero: the adapters act now
    assert {k for k in changed if k.startswith("llm.")} <= adapters  # no base weight of the LLM moved
    assert not any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("projector.") for k in changed)
    # The projector has its own learning rate (LLaVA's mm_projector_lr).
    proj = {id(p) for p in model.projector.parameters()}
    lrs = {g["initial_lr"] for g in trainer.optimizers[0].param_groups if any(id(p) in proj for p in g["params"])}
    assert lrs == {1e-3}

    # The same run stopped after 2 steps, checkpointed, resumed into a fresh model: the same losses.
    module_b = LMMModule(lora_tiny(), lr=1e-2, projector_lr=1e-3, warmup_ratio=0.0)
    _, first = fit(module_b, 4, stop_at=2, save_to=str(tmp_path))
    path = str(tmp_path / "last.ckpt")
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert any("lora_A" in k for k in saved) and any(".base_layer." in k for k in saved)
    fresh = LMMModule(lora_tiny(seed=5), lr=1e-2, projector_lr=1e-3, warmup_ratio=0.0)
    _, rest = fit(fresh, 4, ckpt_path=path)
    assert sorted(first) == [1, 2] and sorted(rest) == [3, 4]
    for step in (1, 2, 3, 4):
        assert abs({**first, **rest}[step] - straight[step]) < 1e-6, (step, first, rest, straight)


# -- merging --------------------------------------------------------------------------------------


def test_merged_model_equals_the_adapted_one_and_holds_no_peft_layer():
    model = lora_tiny().eval()
    shake_adapters(model)
    b = toy_batch()
    adapted = logits(model, b)
    base = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora_layers(base.llm.model):
            layer.lora_B["default"].weight.zero_()
    assert (adapted - logits(base, b)).abs().max() > 1e-2  # the adapters matter here
    plain_keys = set(tiny_lmm().state_dict())
    assert merge_lora(model.llm) == 3 * 7  # 3 layers x (q k v o gate up down)
    assert not has_lora(model) and set(model.state_dict()) == plain_keys
    assert (logits(model, b) - adapted).abs().max() < 1e-5


def test_fastv_scores_with_the_adapted_projections():
    """FastV recomputes layer K-1's query row with its q_proj/k_proj modules: with LoRA those run
    the adapters, so it keeps what the merged model keeps, and not what the base model keeps."""
    def kept(model, b):
        rec = spy(model.compressor)
        logits(model, b)
        out = rec["out"]
        return [out.position_ids[i][out.visual_mask[i]].tolist() for i in range(len(out.lengths))], out.hidden

    torch.manual_seed(0)
    model = tiny_lmm(FastV(layer=2, ratio=0.5))
    add_lora(model.llm, r=4, alpha=8)
    shake_adapters(model, std=1.0)
    merged, base = copy.deepcopy(model), copy.deepcopy(model)
    merge_lora(merged.llm)
    with torch.no_grad():
        for _, layer in lora_layers(base.llm.model):
            layer.lora_B["default"].weight.zero_()
    b = toy_batch()
    ours, hidden = kept(model, b)
    theirs, hidden_merged = kept(merged, b)
    assert ours == theirs
    assert (hidden - hidden_merged).abs().max() < 1e-5 * hidden.abs().max() * 10  # float32 rounding, relative
    assert kept(base, b)[0] != ours


# -- the config check -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key, words", [
    (["llm.lora.r=0"], "llm.lora.r", "positive integer"),
    (["llm.lora.r=2.5"], "llm.lora.r", "positive integer"),
    (["llm.lora.r=8", "llm.lora.alpha=0"], "llm.lora.alpha", "positive number"),
    (["llm.lora.r=8", "llm.lora.alpha=big"], "llm.lora.alpha", "positive number"),
    (["llm.lora.r=8", "llm.lora.dropout=1.0"], "llm.lora.dropout", "[0, 1)"),
    (["llm.lora.r=8", "llm.lora.target_modules=[q_proj,lm_head]"], "llm.lora.target_modules", "stays frozen"),
    (["llm.lora.r=8", "llm.lora.target_modules=[q_proj,wq]"], "llm.lora.target_modules", "['wq'] are not linear"),
    (["llm.lora.r=8", "train_parts=[projector]"], "llm.lora.r", "add llm to train_parts"),
    (["llm.lora.r=8", "trainer=fsdp2"], "llm.lora.r", "trainer=ddp"),
    (["llm.lora.r=8", "trainer=fsdp"], "llm.lora.r", "trainer=ddp"),
])
def test_bad_lora_settings_are_refused_naming_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        check_config(compose_conf("train", overrides))
    assert e.value.key == key and words in str(e.value)


def test_good_lora_settings_pass_and_eval_checks_only_the_adapters():
    check_config(compose_conf("train", ["llm.lora.r=16"]))
    check_config(compose_conf("train", ["llm.lora.r=16", "llm.lora.target_modules=[q_proj,v_proj]", "trainer=ddp"]))
    check_config(compose_conf("train", ["llm.lora.r=16", "trainer=fsdp2"]), training=False)


# -- eval on the checkpoint = eval on the merged export -------------------------------------------


def test_eval_of_a_lora_checkpoint_equals_eval_of_its_merged_export(tmp_path, monkeypatch, capsys):
    """The steps eval.py takes for ckpt_path=... and for model.init_from=<export>; the export is
    read back with peft made unimportable."""
    from vtc.assembly.checkpoint import load_checkpoint, load_weights
    from vtc.data.tokenizer import build_tiny_tokenizer, load_tokenizer
    from vtc.eval import export
    from vtc.eval.init_from import init_from_config
    from vtc.eval.task import eval_config
    from vtc.train.task import build_module

    root = tmp_path / "data"
    build_tiny_tokenizer(["what digit is in row 1 column 2 ? 7 none"], root / "tokenizer")
    small = ["encoder.config.hidden_size=32", "encoder.config.intermediate_size=64", "llm.config.hidden_size=32",
             "llm.config.intermediate_size=64", "llm.config.num_hidden_layers=2"]
    cfg = compose_conf("train", [f"data.root={root}", "~data.generate", "encoder.pretrain=null", "encoder.path=null",
                                 f"paths.output_dir={tmp_path}", "test=false", "llm.lora.r=4", "llm.lora.alpha=8", *small])
    check_config(cfg)
    torch.manual_seed(0)
    module = build_module(cfg, load_tokenizer(cfg.llm.tokenizer_path))
    shake_adapters(module.model)  # as if trained
    module.run_config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    ckpt_path = str(tmp_path / "lora.ckpt")
    saved = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(saved)  # what train.py's checkpoints carry: the run config
    torch.save(saved, ckpt_path)

    # eval.py ckpt_path=...
    ckpt = load_checkpoint(ckpt_path)
    run_cfg = eval_config(compose_conf("eval", [f"ckpt_path={ckpt_path}", f"paths.output_dir={tmp_path}"]), ckpt)
    check_config(run_cfg, training=False)
    tok = load_tokenizer(run_cfg.llm.tokenizer_path)
    lora_module = build_module(run_cfg, tok)
    load_weights(lora_module, ckpt["state_dict"], compressor_changed=False)
    lora_model = lora_module.model.eval()
    assert has_lora(lora_model)
    b = export.random_batch(lora_model)
    base = copy.deepcopy(lora_model)
    with torch.no_grad():
        for _, layer in lora_layers(base.llm.model):
            layer.lora_B["default"].weight.zero_()
    assert (logits(lora_model, b) - logits(base, b)).abs().max() > 1e-2  # the checkpoint's adapters matter

    out = str(tmp_path / "export")
    assert export.main(["--ckpt", ckpt_path, "--out", out, "--check"]) == 0
    diff = float(capsys.readouterr().out.split("max |logit difference| = ")[1])  # transformers' Llava reads it
    assert diff < 1e-4
    monkeypatch.setitem(sys.modules, "peft", None)  # from here on `import peft` fails
    from safetensors import safe_open

    with safe_open(f"{out}/model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)

    # eval.py model.init_from=<export>
    run_cfg2 = init_from_config(compose_conf("eval", [f"model.init_from={out}", f"paths.output_dir={tmp_path}"]))
    check_config(run_cfg2, training=False)
    merged_model = build_module(run_cfg2, load_tokenizer(run_cfg2.llm.tokenizer_path)).model.eval()
    assert not has_lora(merged_model)
    assert (logits(lora_model, b) - logits(merged_model, b)).abs().max() < 1e-5
    gen = dict(gen_input_ids=b["input_ids"], gen_attention_mask=b["attention_mask"],
               pixel_values=b["pixel_values"], items=b["image_index"], max_new_tokens=6)
    assert lora_model.generate(**gen)[0] == merged_model.generate(**gen)[0]
