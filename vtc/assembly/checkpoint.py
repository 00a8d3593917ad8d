"""A train.py checkpoint read back: the file (never code: ``weights_only``), its weights into a
model, and the trained ``LMM`` as the run built it, for eval.py, export and the analyses."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

from vtc.assembly.build import build_lmm
from vtc.data.tokenizer import load_tokenizer
from vtc.distributed.checkpoints import is_sharded_checkpoint
from vtc.errors import ConfigError
from vtc.lmm import LMM


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        # trainer=fsdp2 (and fsdp's sharded state dict) save a folder of shards per checkpoint;
        # eval reads one weights-only file, which vtc.distributed.consolidate gathers from the shards.
        if is_sharded_checkpoint(path):
            out = path.rstrip("/") + ".consolidated.ckpt"
            raise ConfigError("ckpt_path", f"{path!r} is a sharded checkpoint folder (trainer=fsdp2/fsdp), which "
                              f"eval.py does not read; gather it into one file first: python -m vtc.distributed.consolidate "
                              f"--ckpt {path} --out {out}, then eval.py ckpt_path={out}")
        if os.path.isdir(path):
            raise ConfigError("ckpt_path", f"{path!r} is a folder, not a checkpoint file; give a .ckpt file in it "
                              "(e.g. checkpoints/last.ckpt)")
        raise ConfigError("ckpt_path", f"{path!r} is not a file")
    # weights_only: a checkpoint from someone else can hold tensors and plain data, never code.
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if "vtc" not in ckpt:
        raise ConfigError("ckpt_path", f"{path} has no vtc config; was it written by train.py?")
    return ckpt


def load_weights(module, state_dict: dict, compressor_changed: bool, prefix: str = "model.") -> None:
    """A checkpoint's ``state_dict`` into ``module``: the ``LMMModule`` (keys ``model.*``), or with
    ``prefix=""`` the bare ``LMM``, after ``lmm_state``. Nothing may be missing or left over but,
    with ``compressor_changed``, the compressor's own parameters."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    # A test-time compressor may bring or drop its own parameters; nothing else may differ.
    ok = (f"{prefix}compressor.",) if compressor_changed else ()
    bad_missing = [k for k in missing if not k.startswith(ok)] if ok else list(missing)
    bad_unexpected = [k for k in unexpected if not k.startswith(ok)] if ok else list(unexpected)
    if compressor_changed and any(k.startswith(f"{prefix}compressor.") for k in missing):
        raise ConfigError(
            "compressor",
            "the test-time compressor has parameters the checkpoint lacks "
            f"({[k for k in missing if k.startswith(f'{prefix}compressor.')][:3]}...); "
            "only parameter-free compressors can be applied without training",
        )
    if bad_missing or bad_unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {bad_missing[:5]}, unexpected {bad_unexpected[:5]}")




def lmm_state(state_dict: dict) -> dict:
    """The ``LMM``'s own keys of an ``LMMModule`` state dict (``model.*`` without the prefix)."""
    return {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}


def load_trained(path: str) -> tuple[LMM, object, DictConfig]:
    """(model in eval mode, tokenizer, run config) of a train.py checkpoint, built as the run built
    it (``training=True``: with the member a schedule adds, which ends switched off)."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["vtc"]["config"])
    tokenizer = load_tokenizer(cfg.llm.tokenizer_path)
    model = build_lmm(cfg, tokenizer, training=True)
    load_weights(model, lmm_state(ckpt["state_dict"]), compressor_changed=False, prefix="")
    return model.eval(), tokenizer, cfg
