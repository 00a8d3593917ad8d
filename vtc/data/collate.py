"""Decoded samples -> one batch of the :mod:`vtc.data.batch` contract.

Separate from :mod:`vtc.data.batch` because it needs torch while the contract's constants do not
(the torch-free templates and tokenizer import those, e.g. for ``vtc synthetic``); separate from
the datamodule because evaluation (:mod:`vtc.eval.bench`) and the loader benchmark collate
samples of their own without wanting lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from vtc.data.batch import IGNORE_INDEX, ITEM_IMAGE


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return out, mask


def sample_items(sample: dict) -> list[tuple[int, torch.Tensor]]:
    """A decoded sample's visual items as (kind, frames [t, 3, H, W]): its ``visual`` list, or the
    one image of ``pixel_values`` ([3, H, W] or None) of a sample built the single-image way."""
    if sample.get("visual") is not None:
        return [(int(kind), frames) for kind, frames in sample["visual"]]
    pv = sample.get("pixel_values")
    return [] if pv is None else [(ITEM_IMAGE, pv.unsqueeze(0))]


def visual_items(batch: dict) -> torch.Tensor:
    """The batch's ``visual_items`` [M, 4] (sample, first frame row, frames, kind); from
    ``image_index`` [B] for a batch built by hand with at most one image per sample."""
    if batch.get("visual_items") is not None:
        return batch["visual_items"]
    return items_from_image_index(batch["image_index"])


def items_from_image_index(image_index: torch.Tensor) -> torch.Tensor:
    """``image_index`` [B] (row of pixel_values or -1) as ``visual_items``: one one-frame image
    item per sample that has a row."""
    samples = (image_index >= 0).nonzero().squeeze(1)
    rows = image_index[samples]
    ones = torch.ones_like(rows)
    return torch.stack([samples, rows, ones, ones * ITEM_IMAGE], dim=1).long()


def frames_per_sample(items: torch.Tensor, batch_size: int) -> torch.Tensor:
    """[B] images and video frames of each sample (what the vision tower runs on)."""
    out = torch.zeros(batch_size, dtype=torch.long, device=items.device)
    return out.index_add_(0, items[:, 0], items[:, 2])


def collate(samples: Sequence[dict], pad_id: int, image_size: int | Sequence[int] | None = None,
            generation: bool = False) -> dict:
    """Decoded samples -> one batch of the :mod:`vtc.data.batch` contract.

    A sample is a dict with ``id``, ``input_ids``, ``labels`` (lists or 1-D tensors), its visual
    items (``visual``: a list of (kind, frames [t, 3, H, W]) in placeholder order; or
    ``pixel_values``: one image [3, H, W] or ``None``) and, for ``generation=True``,
    ``gen_input_ids``, ``answer`` and optionally ``question_type``. Everything is right-padded
    (``pad_id`` / ``IGNORE_INDEX`` / 0 in the masks). ``image_size`` (int or ``(H, W)``) only
    shapes ``pixel_values`` when no sample has an image; without it that case gives
    ``[0, 3, 0, 0]``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    input_ids, attention_mask = _pad([list(map(int, s["input_ids"])) for s in samples], pad_id)
    labels, _ = _pad([list(map(int, s["labels"])) for s in samples], IGNORE_INDEX)
    if labels.shape != input_ids.shape or any(len(s["labels"]) != len(s["input_ids"]) for s in samples):
        raise ValueError("every sample needs as many labels as input_ids")
    frames, items = [], []
    for i, s in enumerate(samples):
        for kind, f in sample_items(s):
            rows = sum(len(x) for x in frames)
            items.append((i, rows, len(f), kind))
            frames.append(f)
    if frames:
        pixel_values = torch.cat(frames).to(torch.float32)
    else:
        if image_size is None:
            h = w = 0
        elif isinstance(image_size, int):
            h = w = image_size
        else:
            h, w = image_size
        pixel_values = torch.zeros((0, 3, h, w), dtype=torch.float32)
    item_table = torch.tensor(items, dtype=torch.long).reshape(-1, 4)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "visual_items": item_table,
        "ids": [str(s["id"]) for s in samples],
    }
    if generation:
        batch["gen_input_ids"], batch["gen_attention_mask"] = _pad(
            [list(map(int, s["gen_input_ids"])) for s in samples], pad_id
        )
        batch["answers"] = [str(s["answer"]) for s in samples]
        batch["question_types"] = [str(s.get("question_type") or "") for s in samples]
    return batch
