"""GPU-only checks (issue 6, item 4): run with ``pytest -m gpu`` whenever a CUDA GPU is at hand;
every test here is skipped without one.

(a) flash-attention: the tiny LMM with ``flash_attention_2`` (LLM and encoder) in bf16 gives the
    logits and loss of ``sdpa`` in bf16, for no compressor and for every shipped compressor (at the
    tiny settings their own tests use); ``resolve_attn_implementation("auto", "cuda")`` picks
    flash exactly when flash-attn imports.
(b) bf16-mixed training on CUDA lowers the loss of a fixed batch.
(c) FSDP2 on CUDA (nccl) through tests/dist_train.py, the script of the CPU proof, with the
    trainer moved to ``accelerator=gpu``: 2 GPUs (when present) and 1 GPU, losses against a
    single-device run.
(d) greedy generation with the KV cache on CUDA equals CPU (fp32).
(e) activation checkpointing on CUDA: the same loss and gradients (fp32, bf16 autocast), a lower
    ``max_memory_allocated`` (vtc.bench.memory), and FSDP1 (trainer=fsdp, Lightning's
    CheckpointWrapper by the knob's policy) on 1 GPU against the single-device losses.

This file is also the launcher's script for (c): ``torchrun ... tests/test_gpu.py --trainer fsdp2
--out DIR`` runs dist_train.main with its trainer builder swapped for a GPU one (the CPU script
pins accelerator=cpu; the rest of its machinery, batches and loss records are reused as is).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

# bf16 keeps 8 mantissa bits (relative rounding ~4e-3); sdpa and flash-attention round their
# partial sums differently, and three encoder + three LLM layers compound that. The tiny model's
# logits are O(1), so a few roundings of 4e-3 each stay well inside 5e-2 absolute.
BF16_TOL = 5e-2
# fp32 runs of one GPU vs FSDP2: ten times the CPU proof's 1e-5, because cuBLAS / cuDNN choose
# kernels (and so summation orders) by shape, and a rank's half batch is a different shape.
GPU_LOSS_TOL = 1e-4
STEPS = 6


def flash_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


# -- (a) flash-attention vs sdpa ------------------------------------------------------------------

def _compressors() -> dict:
    """Each shipped compressor at the tiny-model settings of its own test file (the defaults are
    sized for 576 patches; the tiny encoder has 16). Values: (factory, tiny_lmm keyword args)."""
    from vtc.compressors.cdpruner import CDPruner
    from vtc.compressors.dart import DART
    from vtc.compressors.divprune import DivPrune
    from vtc.compressors.downsample import Downsample
    from vtc.compressors.fastv import FastV
    from vtc.compressors.m3 import Matryoshka
    from vtc.compressors.pool import AvgPool2d
    from vtc.compressors.prumerge_plus import PruMergePlus
    from vtc.compressors.pyramid_drop import PyramidDrop
    from vtc.compressors.random_prune import RandomPrune
    from vtc.compressors.sparsevlm import SparseVLM
    from vtc.compressors.stf import SpatialTokenFusion
    from vtc.compressors.stf_mbtf import STFMultiBlock
    from vtc.compressors.tome import ToMe
    from vtc.compressors.vcc import VisualContextCompressor
    from vtc.compressors.visionzip import VisionZip
    from vtc.compressors.vispruner import VisPruner
    from vtc.compressors.voco import VoCo

    return {
        "none": (lambda: None, {}),
        "pool": (lambda: AvgPool2d(2), {}),
        "stf": (lambda: SpatialTokenFusion(window=2), {}),
        "stf_mbtf": (lambda: STFMultiBlock(), {}),
        "m3": (lambda: Matryoshka(tokens=4), {}),
        "visionzip": (lambda: VisionZip(6, 3), {}),
        "prumerge_plus": (lambda: PruMergePlus(), {"image_size": 112}),
        # prop_attn adds a size bias to attention, which flash_attention_2 cannot take (ToMe
        # refuses that pairing itself); without it ToMe runs under flash like the others.
        "tome": (lambda: ToMe(r=3, prop_attn=False), {}),
        "vcc": (lambda: VisualContextCompressor(layer=0, stride=3), {}),
        "fastv": (lambda: FastV(layer=1, ratio=0.5), {}),
        "dart": (lambda: DART(1, 0.5), {}),
        "random_prune": (lambda: RandomPrune(keep=8), {}),
        "divprune": (lambda: DivPrune(keep=16), {"image_size": 112}),
        "vispruner": (lambda: VisPruner(keep=16), {"image_size": 112}),
        "cdpruner": (lambda: CDPruner(layer=0, keep=8), {}),
        "pyramid_drop": (lambda: PyramidDrop(layers=[1, 2], ratio=0.5), {}),
        "sparsevlm": (lambda: SparseVLM(layers=[1, 2], keep=[0.25, 0.125]), {"image_size": 112}),
        "downsample": (lambda: Downsample(grid=2), {}),
        # Its mask cannot go to flash_attention_2 (refused, naming the key): checked on sdpa alone.
        "voco": (lambda: VoCo(tokens=2), {}),
    }


COMPRESSORS = ["none", "pool", "stf", "stf_mbtf", "m3", "visionzip", "prumerge_plus", "tome", "vcc", "fastv", "dart",
               "random_prune", "divprune", "vispruner", "cdpruner", "pyramid_drop", "sparsevlm", "downsample",
               "voco"]


def test_every_compressor_config_is_covered():
    from vtc.bench.common import compressor_names

    assert sorted(_compressors()) == sorted(COMPRESSORS) == sorted(compressor_names())


def _cuda_lmm(name: str, attn: str, dtype=torch.bfloat16):
    from tests.tiny import tiny_lmm

    factory, kw = _compressors()[name]
    model = tiny_lmm(factory(), seed=0, **kw)
    for part in (model.llm.model, model.encoder.model):
        # transformers' own switch: it validates that the kernel is installed and supported.
        part.set_attn_implementation(attn)
    return model.to("cuda", dtype).eval(), kw.get("image_size", 56)


def _to(batch: dict, device, dtype=None) -> dict:
    out = {k: v.to(device) for k, v in batch.items()}
    if dtype is not None:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@torch.no_grad()
def _logits_and_loss(model, batch: dict):
    """Loss of ``model(batch)`` and the logits at every real (unpadded) LLM position, by running
    the same sequence and layer loop as the forward."""
    loss = model(batch).loss.float()
    state = model.build_sequence(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 batch["pixel_values"], batch["image_index"])
    out, seen, _ = model.llm.run_layers(state, model.compressor)
    logits = model.llm.logits(out.hidden)[out.attention_mask.bool()].float()
    return logits, loss, torch.stack(seen)


@pytest.mark.parametrize("name", COMPRESSORS)
def test_flash_attention_matches_sdpa_in_bf16(name):
    if not flash_available():
        pytest.skip("flash_attn is not installed (pip install 'vtc[gpu]')")
    from tests.tiny import toy_batch

    sdpa, size = _cuda_lmm(name, "sdpa")
    flash, _ = _cuda_lmm(name, "flash_attention_2")
    assert flash.llm.model.config._attn_implementation == "flash_attention_2"
    batch = _to(toy_batch(image_size=size), "cuda")
    if name == "voco":  # its attention mask cannot go to flash-attention: sdpa runs, flash is refused
        from vtc.errors import ConfigError

        assert torch.isfinite(sdpa(batch).loss)
        with pytest.raises(ConfigError) as e:
            flash(batch)
        assert e.value.key == "llm.attn_implementation"
        return
    l_ref, loss_ref, seen_ref = _logits_and_loss(sdpa, batch)
    l_fa, loss_fa, seen_fa = _logits_and_loss(flash, batch)
    assert torch.equal(seen_ref, seen_fa), "the compressor kept different token counts"
    assert l_ref.shape == l_fa.shape
    diff, ldiff = (l_ref - l_fa).abs().max().item(), (loss_ref - loss_fa).abs().item()
    print(f"\n{name}: max |logit diff| {diff:.2e}, |loss diff| {ldiff:.2e} (bf16, tolerance {BF16_TOL:g})")
    assert diff < BF16_TOL and ldiff < BF16_TOL


def test_auto_attention_picks_flash_exactly_when_installed():
    from vtc.model.llm import resolve_attn_implementation

    want = "flash_attention_2" if flash_available() else "sdpa"
    assert resolve_attn_implementation("auto", "cuda") == want
    assert resolve_attn_implementation("auto", "cpu") == "sdpa"
    assert resolve_attn_implementation("sdpa", "cuda") == "sdpa"


# -- (b) bf16-mixed training ----------------------------------------------------------------------

def test_bf16_mixed_training_lowers_the_loss():
    """Lightning's bf16-mixed is fp32 weights under ``torch.autocast(bfloat16)``; the same here."""
    from tests.tiny import tiny_lmm, toy_batch

    model = tiny_lmm(seed=0).to("cuda").train()
    model.encoder.eval()
    for p in model.encoder.parameters():  # frozen, as train_parts defaults
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = _to(toy_batch(), "cuda")
    losses = []
    for _ in range(8):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    print(f"\nbf16-mixed losses: {[round(x, 4) for x in losses]}")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert next(model.llm.parameters()).dtype == torch.float32  # master weights stay fp32


# -- (c) FSDP2 on CUDA through tests/dist_train.py ------------------------------------------------

def gpu_trainer(name: str, devices: int, steps: int, out: Path, callbacks: list):
    """dist_train.build_trainer on GPUs: the shipped conf/trainer/NAME.yaml with accelerator=gpu
    (ModelParallelStrategy then picks nccl), fp32 so losses compare tightly."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from vtc.config import CONF_DIR

    overrides = [f"trainer={name}", "trainer.accelerator=gpu", f"trainer.devices={devices}",
                 "trainer.precision=32-true", f"trainer.max_steps={steps}", "trainer.gradient_clip_val=1.0"]
    overrides += os.environ.get("VTC_GPU_TEST_OVERRIDES", "").split()  # (e): the FSDP1 runs
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    callbacks = [*callbacks, _count_checkpointed(out)]
    return instantiate(cfg.trainer, default_root_dir=str(out), logger=False, callbacks=callbacks,
                       enable_progress_bar=False, limit_val_batches=0, use_distributed_sampler=False,
                       log_every_n_steps=1)


def _count_checkpointed(out: Path):
    """A callback writing OUT/checkpointed.txt: how many layers are activation-checkpointed once
    training starts (Lightning's CheckpointWrapper under FSDP1, vtc's hooks elsewhere)."""
    from lightning.pytorch.callbacks import Callback
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from vtc.distributed.activation_checkpointing import is_checkpointed

    class CountCheckpointed(Callback):
        def on_train_start(self, trainer, pl_module):
            n = sum(isinstance(m, CheckpointWrapper) or is_checkpointed(m) for m in trainer.model.modules())
            if trainer.is_global_zero:
                (out / "checkpointed.txt").write_text(str(n))

    return CountCheckpointed()


def _torchrun(nproc: int, *args: str, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__).resolve()), "--steps", str(STEPS), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _losses(*dirs: Path) -> dict[int, float]:
    out = {}
    for d in dirs:
        out.update({int(k): v for k, v in json.loads((d / "losses.json").read_text()).items()})
    return out


def _compare(label: str, got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), (got, ref)
    diff = max(abs(got[k] - ref[k]) for k in ref)
    print(f"\n{label}: {[round(got[k], 6) for k in sorted(got)]} vs one GPU "
          f"{[round(ref[k], 6) for k in sorted(ref)]}, max |diff| {diff:.2e} (tolerance {GPU_LOSS_TOL:g})")
    assert diff < GPU_LOSS_TOL


@pytest.fixture(scope="module")
def gpu_reference(tmp_path_factory) -> Path:
    """One GPU, trainer=gpu, the same global batches: in a subprocess, so this pytest process
    holds no CUDA context or process group that the torchrun children could collide with."""
    out = tmp_path_factory.mktemp("gpu_ref")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trainer", "gpu", "--out", str(out),
           "--steps", str(STEPS)]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def test_fsdp2_one_gpu_matches_single_device(gpu_reference, tmp_path):
    _torchrun(1, "--trainer", "fsdp2", "--out", str(tmp_path))
    _compare("fsdp2, 1 GPU", _losses(tmp_path), _losses(gpu_reference))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for nccl FSDP2")
def test_fsdp2_two_gpus_match_one_and_resume(gpu_reference, tmp_path):
    from vtc.distributed.checkpoints import is_sharded_checkpoint

    a, b = tmp_path / "a", tmp_path / "b"
    _torchrun(2, "--trainer", "fsdp2", "--out", str(a), "--stop-at", "3")
    ckpt = a / "ckpt" / "last.ckpt"
    assert is_sharded_checkpoint(ckpt) and len(list(ckpt.glob("*.distcp"))) == 2
    _torchrun(2, "--trainer", "fsdp2", "--out", str(b), "--resume", str(ckpt))
    _compare("fsdp2, 2 GPUs (nccl), resumed at step 3", _losses(a, b), _losses(gpu_reference))


# -- (d) generation with the KV cache -------------------------------------------------------------

@pytest.mark.parametrize("name", ["none", "fastv", "stf", "voco"])
def test_generation_on_cuda_equals_cpu(name):
    from tests.tiny import tiny_lmm, toy_batch

    factory, kw = _compressors()[name]
    b = toy_batch(image_size=kw.get("image_size", 56))
    args = (b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"], 6)
    cpu = tiny_lmm(factory(), seed=0, **kw)
    gpu = tiny_lmm(factory(), seed=0, **kw).to("cuda")
    # fp32 on both sides; TF32 would round matmuls to 10 mantissa bits on CUDA only.
    prev = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        tok_cpu, seen_cpu = cpu.generate(*args)
        tok_gpu, seen_gpu = gpu.generate(*(a.to("cuda") if torch.is_tensor(a) else a for a in args))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    assert tok_gpu == tok_cpu
    assert torch.equal(seen_gpu.cpu(), seen_cpu)


# -- (e) activation checkpointing on CUDA ---------------------------------------------------------

@pytest.mark.parametrize("autocast", [False, True])
def test_activation_checkpointing_same_loss_and_gradients_on_cuda(autocast):
    """fp32 and bf16 autocast (the recomputation re-enters the forward's autocast state): the same
    loss and gradients with the LLM and encoder layers checkpointed, vcc pooling inside the LLM."""
    from tests.tiny import tiny_lmm, toy_batch
    from vtc.compressors.vcc import VisualContextCompressor
    from vtc.distributed.activation_checkpointing import apply_activation_checkpointing

    batch = _to(toy_batch(), "cuda")
    results = []
    for parts in ((), ("llm", "encoder")):
        model = tiny_lmm(VisualContextCompressor(layer=1, stride=2), seed=0).to("cuda").train()
        apply_activation_checkpointing(model, parts)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    tol = 1e-2 if autocast else 1e-6
    assert torch.allclose(l0, l1, atol=tol) and sorted(g0) == sorted(g1)
    for k in g0:
        assert torch.allclose(g0[k], g1[k], atol=tol, rtol=tol), k


def test_activation_checkpointing_lowers_cuda_peak_memory():
    """vtc.bench.memory's CUDA path (torch.cuda.max_memory_allocated) at its tiny sizes."""
    from vtc.bench import common as C
    from vtc.bench import memory

    res = memory.run(C.QUICK, steps=1, repeats=1, device="cuda", train_encoder=True, log=print)
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["llm"]["peak_bytes"] < rows["off"]["peak_bytes"]
    assert rows["llm+encoder"]["peak_bytes"] < rows["llm"]["peak_bytes"]


def test_activation_checkpointing_fsdp1_one_gpu_same_losses(tmp_path, monkeypatch):
    """trainer=fsdp (FSDP1: Lightning wraps the layers of the knob's parts in CheckpointWrapper, here
    the 3 LLM and 3 encoder layers) trains to the losses of trainer=fsdp with activation_checkpointing=[].
    Both without gradient clipping: Lightning refuses norm clipping under FSDP1 (FSDPPrecision)."""
    runs = {}
    for knob, wrapped in (("[llm,encoder]", 6), ("[]", 0)):
        out = tmp_path / knob.strip("[]").replace(",", "_")
        monkeypatch.setenv("VTC_GPU_TEST_OVERRIDES", f"trainer.gradient_clip_val=null activation_checkpointing={knob}")
        _torchrun(1, "--trainer", "fsdp", "--out", str(out))
        assert (out / "checkpointed.txt").read_text() == str(wrapped)
        runs[knob] = _losses(out)
    _compare("fsdp (FSDP1) 1 GPU, activation checkpointing [llm, encoder] vs []", runs["[llm,encoder]"], runs["[]"])


# -- script entry for (c) -------------------------------------------------------------------------

if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from tests import dist_train

    dist_train.build_trainer = gpu_trainer  # fit() looks it up in its module at call time
    dist_train.main(sys.argv[1:])
