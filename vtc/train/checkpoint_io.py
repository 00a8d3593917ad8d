"""Checkpoints that are either complete or absent.

Lightning writes a checkpoint straight to its final name; a kill during the write leaves a
truncated file that looks like a checkpoint. Here the bytes go to ``<name>.tmp`` in the same
directory, are flushed to disk, and are renamed into place (atomic on POSIX), so ``last.ckpt`` is
always the previous complete checkpoint or the new complete one. Loading uses
``weights_only=True``: a checkpoint holds tensors and plain data, never code.
"""
from __future__ import annotations

import os

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(os.fspath(path), map_location=map_location or "cpu", weights_only=True)
