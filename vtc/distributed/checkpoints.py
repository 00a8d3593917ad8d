"""Sharded checkpoints on disk: how to tell one from a single file, and how to read its meta part.

ModelParallelStrategy (trainer=fsdp2) and FSDPStrategy(state_dict_type=sharded) write a folder per
checkpoint; ``vtc.distributed.consolidate`` gathers one into a single file eval.py reads.
"""
from __future__ import annotations

import os

import torch

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_sharded_checkpoint(path) -> bool:
    """A folder written by ModelParallelStrategy / FSDPStrategy(state_dict_type=sharded):
    torch.distributed.checkpoint shards + ``.metadata`` + Lightning's ``meta.pt``."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def checkpoint_meta(path) -> dict:
    """Everything but weights and optimizer states: the whole file of a single-file checkpoint
    (memory-mapped, not read), ``meta.pt`` of a sharded one. Loaded with weights_only=True."""
    path = os.fspath(path)
    if is_sharded_checkpoint(path):
        return torch.load(os.path.join(path, META_FILE), map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
