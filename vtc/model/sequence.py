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
        fields = {}
        for name in ("hidden", "position_ids", "visual_mask", "targets"):
            t = getattr(self, name)
            if t is None:
                fields[name] = None
                continue
            pad = IGNORE_INDEX if name == "targets" else 0
            fields[name] = pad_stack([t[b][keep[b]] for b in range(t.shape[0])], pad)
        mask = pad_stack([torch.ones(int(k.sum()), dtype=torch.long, device=keep.device) for k in keep], 0)
        return SeqState(
            hidden=fields["hidden"],
            attention_mask=mask,
            position_ids=fields["position_ids"],
            visual_mask=fields["visual_mask"].bool(),
            targets=fields["targets"],
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
                raise RuntimeError("replace_visual needs one contiguous visual span per sample")
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
