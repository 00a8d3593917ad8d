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

from vtc.data.batch import IGNORE_INDEX


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return out, mask


def collate(samples: Sequence[dict], pad_id: int, image_size: int | Sequence[int] | None = None,
            generation: bool = False) -> dict:
    """Decoded samples -> one batch of the :mod:`vtc.data.batch` contract.

    A sample is a dict with ``id``, ``input_ids``, ``labels`` (lists or 1-D tensors),
    ``pixel_values`` (``[3, H, W]`` tensor or ``None``) and, for ``generation=True``,
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
    images, image_index = [], torch.full((len(samples),), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        if s.get("pixel_values") is not None:
            image_index[i] = len(images)
            images.append(s["pixel_values"])
    if images:
        pixel_values = torch.stack(images).to(torch.float32)
    else:
        if image_size is None:
            h = w = 0
        elif isinstance(image_size, int):
            h = w = image_size
        else:
            h, w = image_size
        pixel_values = torch.zeros((0, 3, h, w), dtype=torch.float32)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_index": image_index,
        "ids": [str(s["id"]) for s in samples],
    }
    if generation:
        batch["gen_input_ids"], batch["gen_attention_mask"] = _pad(
            [list(map(int, s["gen_input_ids"])) for s in samples], pad_id
        )
        batch["answers"] = [str(s["answer"]) for s in samples]
        batch["question_types"] = [str(s.get("question_type") or "") for s in samples]
    return batch
