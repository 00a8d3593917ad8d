"""Splice visual tokens into the text embeddings at each sample's ``<image>`` placeholder.

Every sample has its own span: sample b's placeholder at text index p_b is replaced by its V_b
visual tokens, text after it shifts right by V_b - 1, and the result is right-padded. Samples
without an image pass through unchanged. Position ids are 0..len-1 of the spliced sequence (the
LLaVA convention); visual tokens never carry a loss.
"""
from __future__ import annotations

import torch

from vtc.data.batch import IGNORE_INDEX
from vtc.model.sequence import SeqState, pad_stack


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """``targets[:, i] = labels[:, i + 1]``: what position i predicts; the last predicts nothing."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def query_positions(targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Index of the last instruction token: the position that predicts the first answer token,
    or the last real token when nothing is predicted (generation prompts)."""
    has = targets != IGNORE_INDEX
    first = torch.where(has.any(1), has.float().argmax(1), lengths - 1)
    return first.long()


def splice(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    image_index: torch.Tensor,
    visual: torch.Tensor,
    image_token_id: int,
) -> SeqState:
    """Build the LLM input sequence.

    text_embeds [B, T, d] (the placeholder's own embedding is discarded), input_ids/attention_mask/
    labels [B, T], image_index [B] (row of ``visual`` or -1), visual [N, V, d].
    """
    B = input_ids.shape[0]
    hs, masks, vis, labs = [], [], [], []
    for b in range(B):
        n = int(attention_mask[b].sum())
        ids = input_ids[b, :n]
        emb = text_embeds[b, :n]
        lab = labels[b, :n] if labels is not None else None
        slots = (ids == image_token_id).nonzero().squeeze(1)
        img = int(image_index[b])
        if img < 0:
            if len(slots):
                raise ValueError(f"sample {b} has an <image> placeholder but no image")
            hs.append(emb)
            vis.append(torch.zeros(n, dtype=torch.bool, device=ids.device))
            labs.append(lab)
        else:
            if len(slots) != 1:
                raise ValueError(f"sample {b} has an image and {len(slots)} <image> placeholders; expected 1")
            p = int(slots[0])
            v = visual[img].to(emb.dtype)
            hs.append(torch.cat([emb[:p], v, emb[p + 1 :]]))
            flags = torch.zeros(n - 1 + len(v), dtype=torch.bool, device=ids.device)
            flags[p : p + len(v)] = True
            vis.append(flags)
            if lab is not None:
                fill = torch.full((len(v),), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)
                labs.append(torch.cat([lab[:p], fill, lab[p + 1 :]]))
        masks.append(torch.ones(len(hs[-1]), dtype=torch.long, device=ids.device))
    mask = pad_stack(masks, 0)
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand(B, T) * mask
    targets = shift_targets(pad_stack(labs, IGNORE_INDEX)) if labels is not None else None
    lengths = mask.sum(1)
    q = query_positions(targets, lengths) if targets is not None else lengths - 1
    return SeqState(
        hidden=pad_stack(hs, 0.0),
        attention_mask=mask,
        position_ids=positions.contiguous(),
        visual_mask=pad_stack(vis, False),
        targets=targets,
        query_index=q,
    )
