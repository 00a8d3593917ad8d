"""Splice visual tokens into the text embeddings at each sample's ``<image>`` placeholder.

Padding: the input may be right-padded (our collate), left-padded (HF processors, batched
generation) or padded on both sides: each row's real tokens are wherever its attention mask is
nonzero, and they must form one contiguous run (a mask with holes raises ``ValueError``). Only
that run is read, so the padding layout never changes the result; the output is always
right-padded, whatever the input's layout.

Every visual item has its own span: a sample's k-th placeholder (text index p, counted from its
first real token) is replaced by the tokens of its k-th item (V tokens; a video's frames in time
order, nothing between them), text after it shifts right by V - 1, and the result is
right-padded. Samples without an item pass through unchanged. Position ids are
0..len-1 of the spliced sequence (the LLaVA convention); visual tokens never carry a loss.
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


def real_spans(attention_mask: torch.Tensor) -> tuple[list[int], list[int]]:
    """(start, length) of each row's real tokens: the one contiguous run where the mask is nonzero.

    Raises ``ValueError`` for a row whose nonzero entries are not contiguous (a hole in the mask).
    Batched, with one transfer to the host for the whole batch.
    """
    real = attention_mask != 0
    T = real.shape[1]
    idx = torch.arange(T, device=real.device)
    n = real.sum(1)
    first = torch.where(real, idx, T).amin(1) if T else n
    last = torch.where(real, idx, -1).amax(1) if T else n - 1
    first = torch.where(n > 0, first, 0)
    holes = (n > 0) & (last - first + 1 != n)
    starts, lengths, bad = torch.stack([first, n, holes.long()]).tolist()
    if any(bad):
        rows = [b for b, x in enumerate(bad) if x]
        raise ValueError(
            f"attention_mask rows {rows} are not one contiguous run of real tokens (holes in the mask); "
            "splice accepts left, right or two-sided padding only"
        )
    return starts, lengths


def splice(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    item_samples: list[int],
    item_tokens: list[torch.Tensor],
    image_token_id: int,
) -> SeqState:
    """Build the LLM input sequence.

    text_embeds [B, T, d] (the placeholders' own embeddings are discarded), input_ids/
    attention_mask/labels [B, T]; per visual item in batch order, its sample (``item_samples``)
    and its tokens [L_m, d] (``item_tokens``: a video's frames already concatenated in time
    order). A sample's k-th placeholder takes its k-th item. Any padding layout with one
    contiguous run of real tokens per row (see the module docstring).
    """
    B = input_ids.shape[0]
    starts, lengths = real_spans(attention_mask)
    per_sample: list[list[torch.Tensor]] = [[] for _ in range(B)]
    for b, tokens in zip(item_samples, item_tokens):
        per_sample[b].append(tokens)
    hs, masks, vis, labs = [], [], [], []
    for b in range(B):
        s, n = starts[b], lengths[b]
        ids = input_ids[b, s : s + n]
        emb = text_embeds[b, s : s + n]
        lab = labels[b, s : s + n] if labels is not None else None
        slots = (ids == image_token_id).nonzero().squeeze(1).tolist()
        items = per_sample[b]
        if len(slots) != len(items):
            what = "no image" if not items else f"{len(items)} visual item(s)"
            raise ValueError(f"sample {b} has {len(slots)} <image> placeholders and {what}; "
                             "expected one per visual item")
        pieces, flags, lab_pieces, prev = [], [], [], 0
        for p, v in zip(slots, items):
            v = v.to(emb.dtype)
            pieces += [emb[prev:p], v]
            flags += [torch.zeros(p - prev, dtype=torch.bool, device=ids.device),
                      torch.ones(len(v), dtype=torch.bool, device=ids.device)]
            if lab is not None:
                lab_pieces += [lab[prev:p], torch.full((len(v),), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)]
            prev = p + 1
        pieces.append(emb[prev:])
        flags.append(torch.zeros(n - prev, dtype=torch.bool, device=ids.device))
        hs.append(torch.cat(pieces) if items else emb)
        vis.append(torch.cat(flags))
        if lab is not None:
            lab_pieces.append(lab[prev:])
            labs.append(torch.cat(lab_pieces) if items else lab)
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
