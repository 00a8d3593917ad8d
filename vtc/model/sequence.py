"""The token sequence that flows through the LLM, with everything compressors must carry along.

Compressors inside the LLM drop or merge visual tokens between decoder layers. Peers do this for
batch size 1; here every per-token field (hidden states, padding mask, position ids, which tokens
are visual, training targets) travels together in one ``SeqState`` and is re-packed per sample,
so samples with different image spans and padding stay independent of each other.

Targets are stored already shifted (``targets[:, i]`` is the token that position ``i`` must
predict), so dropping tokens never misaligns the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch.nn.utils.rnn import pad_sequence

from vtc.data.batch import IGNORE_INDEX


def pad_stack(seqs: list[torch.Tensor], value) -> torch.Tensor:
    """Right-pad a list of [T_i, ...] tensors to [B, max T_i, ...]."""
    return pad_sequence(seqs, batch_first=True, padding_value=value)


@dataclass
class SeqState:
    hidden: torch.Tensor  # [B, T, d]
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    position_ids: torch.Tensor  # [B, T] long
    visual_mask: torch.Tensor  # [B, T] bool
    targets: torch.Tensor | None  # [B, T] long, shifted; IGNORE_INDEX where no loss
    query_index: torch.Tensor  # [B] index of the last instruction token (FastV's query)

    @property
    def lengths(self) -> torch.Tensor:
        return self.attention_mask.sum(1)

    def visual_counts(self) -> torch.Tensor:
        return (self.visual_mask & self.attention_mask.bool()).sum(1)

    def select(self, keep: torch.Tensor) -> "SeqState":
        """Keep the tokens where ``keep`` [B, T] is True (order preserved), re-pad on the right."""
        keep = keep & self.attention_mask.bool()
        if not bool(keep.gather(1, self.query_index[:, None]).all()):
            raise RuntimeError("a compressor dropped the query token; text tokens must be kept")
        new_index = keep.long().cumsum(1) - 1
        # One batched gather instead of B boolean-mask indexings per field (those were a third of
        # DART's compressor time, forward and backward): a stable sort puts each row's kept
        # positions first, in order; the first max-count columns are the new, right-padded layout.
        counts = keep.sum(1)
        width = int(counts.max()) if keep.shape[0] else 0
        idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]

        def take(t: torch.Tensor | None, pad):
            if t is None:
                return None
            if t.dim() == 3:
                out = t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
                return out.masked_fill(~valid[..., None], pad)
            return t.gather(1, idx).masked_fill(~valid, pad)

        return SeqState(
            hidden=take(self.hidden, 0.0),
            attention_mask=valid.long(),
            position_ids=take(self.position_ids, 0),
            visual_mask=take(self.visual_mask, False),
            targets=take(self.targets, IGNORE_INDEX),
            query_index=new_index.gather(1, self.query_index[:, None]).squeeze(1),
        )

    def replace_visual(self, visual: list[torch.Tensor], positions: list[torch.Tensor]) -> "SeqState":
        """Swap each sample's (contiguous) visual span for ``visual[b]`` [V_b, d] at ``positions[b]``.

        Text tokens, their positions and targets are untouched; new visual tokens get no target.
        A sample without visual tokens must receive an empty tensor.
        """
        hs, ps, vs, ts, masks, qs = [], [], [], [], [], []
        for b in range(self.hidden.shape[0]):
            n = int(self.lengths[b])
            vis = self.visual_mask[b, :n]
            idx = vis.nonzero().squeeze(1)
            start, stop = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (n, n)
            if len(idx) and stop - start != len(idx):
                raise RuntimeError(
                    f"sample {b} has several visual spans (images with text between them); an in-LLM compressor "
                    "(vcc, fastv, dart) compresses one span per sample: one image, one video, or items written "
                    "side by side. Use a pre-LLM compressor (pool, stf, ...) for such samples")
            v = visual[b].to(self.hidden.dtype)
            hs.append(torch.cat([self.hidden[b, :start], v, self.hidden[b, stop:n]]))
            ps.append(torch.cat([self.position_ids[b, :start], positions[b].to(self.position_ids), self.position_ids[b, stop:n]]))
            vs.append(torch.cat([vis[:start], torch.ones(len(v), dtype=torch.bool, device=vis.device), vis[stop:]]))
            if self.targets is not None:
                t = self.targets[b]
                fill = torch.full((len(v),), IGNORE_INDEX, dtype=t.dtype, device=t.device)
                ts.append(torch.cat([t[:start], fill, t[stop:n]]))
            masks.append(torch.ones(len(hs[-1]), dtype=torch.long, device=self.hidden.device))
            q = int(self.query_index[b])
            qs.append(q if q < start else q - (stop - start) + len(v))
        return SeqState(
            hidden=pad_stack(hs, 0.0),
            attention_mask=pad_stack(masks, 0),
            position_ids=pad_stack(ps, 0),
            visual_mask=pad_stack(vs, False),
            targets=pad_stack(ts, IGNORE_INDEX) if self.targets is not None else None,
            query_index=torch.tensor(qs, device=self.hidden.device),
        )

    def with_hidden(self, hidden: torch.Tensor) -> "SeqState":
        return replace(self, hidden=hidden)


@dataclass
class LayerContext:
    """What an in-LLM compressor acting before decoder layer ``index`` may read.

    ``previous_input`` is the state decoder layer ``index - 1`` consumed (its hidden states are that
    layer's input; tokens, mask and positions are those it attended over): FastV's attention map and
    DART's pivot keys are layer K-1's, recomputed from it. Both are None before layer 0.
    ``final_norm`` is the decoder's last norm (DART normalises its similarity features with it).
    """

    index: int
    layer: "torch.nn.Module"
    previous_layer: "torch.nn.Module | None" = None
    previous_input: SeqState | None = None
    final_norm: "torch.nn.Module | None" = None
