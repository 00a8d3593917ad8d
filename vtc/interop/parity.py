"""Run the same prompt through vtc and transformers' LlavaForConditionalGeneration.

vtc's batches hold one ``<image>`` placeholder per image sample (the splice inserts the V visual
tokens there); a transformers Llava input holds the image token repeated V times (what
``LlavaProcessor`` does). :func:`hf_inputs` turns the first into the second, so that position p
of a vtc spliced sequence is position p of the transformers one; :func:`vtc_logits` gives vtc's
logits at every position of the spliced sequence.
"""
from __future__ import annotations

import torch

from vtc.lmm import LMM
from vtc.model.splice import real_spans


def hf_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_index: torch.Tensor,
              num_image_tokens: int, image_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """vtc batch (any padding ``splice`` accepts) -> (input_ids, attention_mask, pixel rows in
    sample order), right-padded."""
    rows, order = [], []
    starts, lengths = real_spans(attention_mask)
    for b in range(input_ids.shape[0]):
        ids = input_ids[b, starts[b]:starts[b] + lengths[b]]
        img = int(image_index[b])
        if img >= 0:
            p = int((ids == image_token_id).nonzero()[0])
            ids = torch.cat([ids[:p], torch.full((num_image_tokens,), image_token_id, dtype=ids.dtype), ids[p + 1:]])
            order.append(img)
        rows.append(ids)
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad_token_id, dtype=input_ids.dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
        mask[b, :len(r)] = 1
    return out, mask, order


@torch.no_grad()
def vtc_logits(model: LMM, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
               image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, vocab] at every position of the spliced sequence, and the lengths [B]."""
    state = model.build_sequence(input_ids, attention_mask, None, pixel_values, image_index)
    out, _, _ = model.llm.run_layers(state, model.compressor)
    return model.llm.logits(out.hidden), out.lengths


@torch.no_grad()
def max_logit_diff(model: LMM, hf_model, input_ids, attention_mask, pixel_values, image_index,
                   num_image_tokens: int, pad_token_id: int) -> float:
    """Largest |vtc - transformers| logit over every real position (and vtc's vocabulary)."""
    ours, lengths = vtc_logits(model, input_ids, attention_mask, pixel_values, image_index)
    ids, mask, order = hf_inputs(input_ids, attention_mask, image_index, num_image_tokens, model.image_token_id,
                                 pad_token_id)
    pv = pixel_values[order].to(hf_model.dtype) if order else None
    theirs = hf_model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    V = ours.shape[-1]
    worst = 0.0
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        assert n == int(mask[b].sum()), "vtc and transformers sequences differ in length"
        worst = max(worst, float((ours[b, :n].float() - theirs[b, :n, :V].float()).abs().max()))
    return worst
