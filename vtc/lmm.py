"""The LLaVA-style model: encoder -> compressor -> projector -> LLM, with explicit splicing.

``forward`` is the training / teacher-forced path (loss only on answer tokens, logits only where
there is a target, so visual tokens never go through the LM head). ``generate`` is greedy
decoding with a KV cache; an in-LLM compressor compresses the prompt once and every decode step
attends to the compressed cache, as at deployment.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vtc.compressors.base import Compressor, NoCompression
from vtc.compressors.chain import Pipeline
from vtc.cost.accounting import linear_chain_dims
from vtc.data.batch import IGNORE_INDEX, ITEM_VIDEO
from vtc.data.collate import frames_per_sample, items_from_image_index, visual_items
from vtc.errors import ConfigError
from vtc.model.encoder import VisionEncoder
from vtc.model.llm import LanguageModel
from vtc.model.projector import build_projector
from vtc.model.sequence import SeqState
from vtc.model.splice import splice


@dataclass
class LMMOutput:
    loss: torch.Tensor
    num_targets: int
    visual_in: torch.Tensor  # [B] visual tokens entering the LLM per sample
    seen: torch.Tensor  # [num_layers, B] visual tokens each layer saw per sample
    lengths: torch.Tensor | None = None  # [B] LLM input length per sample
    targets_per_sample: torch.Tensor | None = None  # [B] positions with a loss
    #: every forward the step ran (M3 trains all its scales: one pass each); None = this one alone.
    #: FLOPs are summed over them, so a multi-pass step is counted in full.
    passes: list["LMMOutput"] | None = None
    frames: torch.Tensor | None = None  # [B] images + video frames each sample encoded

    def all_passes(self) -> list["LMMOutput"]:
        return self.passes or [self]


class LMM(nn.Module):
    def __init__(
        self,
        encoder: VisionEncoder,
        llm: LanguageModel,
        compressor: Compressor | None = None,
        projector: str = "mlp2x_gelu",
        image_token_id: int = -1,
        pad_token_id: int = 0,
        eos_token_id: int | None = None,
        stage_compressor: Compressor | None = None,
        frame_embeddings: int = 0,
    ):
        """``compressor``: the configured method (or a ``Chain`` of one per site), the deployed
        model's. ``stage_compressor``: a parameter-free member a training schedule adds at a free
        site (LLaVolta's in-LLM pooling over what the configured one leaves); switched by the
        curriculum, off at the end, and never in the state dict. ``frame_embeddings``: > 0 adds a
        learned embedding of its time index to every token of a video's frame t (t < the number
        given), as Video-LLaMA's frame position embedding does; 0 (LLaVA, Video-LLaVA): nothing
        marks the frames but their order."""
        super().__init__()
        self.encoder = encoder
        self.llm = llm
        self.compressor = compressor if compressor is not None else NoCompression()
        self.stage_compressor = stage_compressor
        pipeline = self.pipeline  # refuses two members at one site
        pipeline.check(encoder.info, llm.num_layers)
        for site, member in pipeline.by_site.items():  # after a downsampling, the smaller patch grid
            member.setup(encoder.info if site == "image" else pipeline.encoder_info(encoder.info), llm.hidden_size)
        if stage_compressor is not None and (list(stage_compressor.parameters()) or list(stage_compressor.buffers())):
            raise ValueError(f"schedule.adds: {type(stage_compressor).__name__} has parameters; a schedule may only "
                             "add a parameter-free compressor (it is absent from the deployed model)")
        pre = pipeline.by_site.get("pre_llm")
        if pipeline.owns_projection:
            self.projector = nn.Identity()
        else:
            before = pre is not None and not pre.after_projector
            in_dim = pre.output_dim(encoder.info.hidden_size) if before else encoder.info.hidden_size
            self.projector = build_projector(projector, in_dim, llm.hidden_size)
            if pre is not None and pre.after_projector:
                pre.projector_dims = linear_chain_dims(self.projector)
        self.projector_kind = projector
        # Trained with the projector (``part_modules``): it maps frame features into the LLM, with their time.
        self.frame_embedding = None
        if frame_embeddings:
            self.add_frame_embedding_table(int(frame_embeddings))
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id

    @property
    def pipeline(self) -> Pipeline:
        """The run's compressors by site (vision, pre_llm, temporal, llm), the schedule's member included."""
        return Pipeline.of(self.compressor, self.stage_compressor)

    @property
    def schedule_target(self) -> Compressor:
        """What a schedule's stages switch: the member it added, else the configured compressor."""
        return self.stage_compressor if self.stage_compressor is not None else self.compressor

    # -- parts -----------------------------------------------------------------------------------
    def part_modules(self, part: str) -> list[nn.Module]:
        """The modules of a ``train_parts`` part (encoder, compressor, projector, llm): the
        projector's include the frame embedding."""
        if part == "projector" and self.frame_embedding is not None:
            return [self.projector, self.frame_embedding]
        return [getattr(self, part)]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """[N, 3, H, W] -> [N, V, d_llm] visual tokens, compressed before the LLM if the site says.

        A compressor whose token count differs per image (PruMerge+) returns a list of [V_i, C];
        each element is projected (the projector is per token: one call on the concatenation,
        split back) and the list of [V_i, d_llm] goes to the splice, which reads ``visual[i]``."""
        pipeline = self.pipeline
        vision_comp, pre, image = pipeline.active("vision"), pipeline.active("pre_llm"), pipeline.active("image")
        if image is not None:  # downsampling: the tower sees a smaller image
            pixel_values = image(pixel_values, self.encoder.info.patch_size)
        extra = pipeline.extra_layers()
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(need_grad):
            enc = self.encoder(pixel_values, keep_states=tuple(extra), vision_compressor=vision_comp)
        enc.encoder = self.encoder
        feats = enc.features
        if pre is not None and pre.after_projector:  # M3: pool the projected tokens
            return pre(self.projector(feats.to(self.projector_dtype)), enc)
        if pre is not None:
            feats = pre(feats, enc)
        if isinstance(feats, (list, tuple)):
            flat = self.projector(torch.cat(list(feats)).to(self.projector_dtype))
            return list(flat.split([len(f) for f in feats]))
        return self.projector(feats.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        for p in self.projector.parameters():
            return p.dtype
        return self.llm.model.dtype

    def item_tokens(self, pixel_values: torch.Tensor | None, items: torch.Tensor) -> list[torch.Tensor]:
        """Each visual item's tokens [L_m, d_llm]: its frames encoded (and compressed per frame)
        like images, a video's frames pooled in time by the temporal site's member, then
        concatenated in time order; nothing separates the frames (Video-LLaVA concatenates its 8
        frames' tokens the same way) unless the model has a frame embedding, added to each frame's
        tokens before temporal pooling (a pooled window then carries its frames' mean time)."""
        if pixel_values is None or pixel_values.shape[0] == 0 or len(items) == 0:
            return []
        visual = self.encode_images(pixel_values)
        temporal = self.pipeline.active("temporal")
        out = []
        for first, frames, kind in items[:, 1:4].tolist():
            rows = visual[first:first + frames]
            if self.frame_embedding is not None and kind == ITEM_VIDEO:
                rows = self.add_frame_embedding(rows)
            if temporal is not None and kind == ITEM_VIDEO:
                rows = temporal(rows)  # [T, V, d] -> [T', V, d] (fixed-count pre-LLM methods only)
            out.append(torch.cat(list(rows)) if isinstance(rows, list) else rows.reshape(-1, rows.shape[-1]))
        return out

    def add_frame_embedding_table(self, n: int) -> None:
        """A new, randomly initialised embedding of ``n`` frame indices (``projector.frame_embeddings``)."""
        self.frame_embedding = nn.Embedding(n, self.llm.hidden_size)
        nn.init.normal_(self.frame_embedding.weight, std=0.02)

    def add_frame_embedding(self, rows):
        """A video's frames [T, V, d] (or T tensors [V_t, d]) plus the embedding of each frame's index."""
        T, n = len(rows), self.frame_embedding.num_embeddings
        if T > n:
            raise ConfigError("projector.frame_embeddings", f"a video of {T} frames, but the model embeds {n} frame "
                              f"indices; sample at most {n} frames (data.generate.frames, benchmark.frames)")
        emb = self.frame_embedding.weight
        if isinstance(rows, torch.Tensor):
            return rows + emb[:T, None].to(rows.dtype)
        return [r + emb[t].to(r.dtype) for t, r in enumerate(rows)]

    def build_sequence(self, input_ids, attention_mask, labels, pixel_values, items) -> SeqState:
        """``items``: the batch's ``visual_items`` [M, 4], or ``image_index`` [B] (at most one
        image per sample; :func:`vtc.data.collate.items_from_image_index`)."""
        if items.dim() == 1:
            items = items_from_image_index(items)
        # The placeholder id may lie outside the LLM's vocabulary (added to a real tokenizer):
        # its embedding is discarded by the splice, so embed the pad id in its place.
        ids = input_ids.masked_fill(input_ids == self.image_token_id, self.pad_token_id)
        embeds = self.llm.embed(ids)
        tokens = self.item_tokens(pixel_values, items)
        return splice(embeds, input_ids, attention_mask, labels, items[:, 0].tolist(), tokens, self.image_token_id)

    # -- training --------------------------------------------------------------------------------
    def forward(self, batch: dict) -> LMMOutput:
        """Teacher-forced loss. A compressor that trains over several settings at once (M3's
        nested scales) lists them in ``training_variants()``; the loss is their mean, and every
        pass is kept in ``passes`` for the cost accounting."""
        variants = self.pipeline.training_variants() if self.training else []
        if not variants:
            return self._forward_once(batch)
        member = variants[0][0]
        saved = member.get_knobs()
        outs = []
        try:
            for _, knobs in variants:
                member.set_knobs(**knobs)
                outs.append(self._forward_once(batch))
        finally:
            member.set_knobs(**saved)
        loss = torch.stack([o.loss for o in outs]).mean()
        first = outs[0]
        return LMMOutput(loss=loss, num_targets=first.num_targets, visual_in=first.visual_in, seen=first.seen,
                         lengths=first.lengths, targets_per_sample=first.targets_per_sample, passes=outs,
                         frames=first.frames)

    def _forward_once(self, batch: dict) -> LMMOutput:
        items = visual_items(batch)
        state = self.build_sequence(
            batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"], items
        )
        visual_in = state.visual_counts()
        lengths = state.lengths
        out, seen, _ = self.llm.run_layers(state, self.pipeline.active("llm"))
        valid = out.targets != IGNORE_INDEX
        logits = self.llm.logits(out.hidden[valid])
        n = int(valid.sum())
        loss = F.cross_entropy(logits.float(), out.targets[valid], reduction="sum") / max(n, 1)
        frames = frames_per_sample(items, len(lengths))
        return LMMOutput(loss=loss, num_targets=n, visual_in=visual_in, seen=torch.stack(seen),
                         lengths=lengths, targets_per_sample=valid.sum(1), frames=frames)

    # -- inference -------------------------------------------------------------------------------
    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy choice; the image placeholder is never a valid output token."""
        if 0 <= self.image_token_id < logits.shape[-1]:
            logits = logits.clone()
            logits[..., self.image_token_id] = float("-inf")
        return logits.argmax(-1)

    @torch.no_grad()
    def generate(
        self,
        gen_input_ids: torch.Tensor,
        gen_attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        items: torch.Tensor,
        max_new_tokens: int = 8,
        eos_token_id: int | None = None,
    ) -> tuple[list[list[int]], torch.Tensor]:
        """Greedy decoding with a KV cache. Returns the new tokens per sample (eos excluded) and
        the [num_layers, B] visual tokens each layer saw during prefill. ``items``: as in
        ``build_sequence``. An in-LLM compressor with ``drop_cache`` (VoCo) has the cache entries no
        later token may attend (its visual tokens) removed after prefill (:func:`drop_masked_keys`)."""
        from transformers import DynamicCache

        eos = self.eos_token_id if eos_token_id is None else eos_token_id
        state = self.build_sequence(gen_input_ids, gen_attention_mask, None, pixel_values, items)
        cache = DynamicCache(config=self.llm.config)
        in_llm = self.pipeline.active("llm")
        out, seen, masks = self.llm.run_layers(state, in_llm, cache=cache)
        if in_llm is not None and getattr(in_llm, "drop_cache", False):  # VoCo: the visual KV is dead now
            masks = drop_masked_keys(cache, masks)
        B = out.hidden.shape[0]
        rows = torch.arange(B, device=out.hidden.device)
        last = out.lengths - 1
        next_pos = out.position_ids[rows, last] + 1
        token = self.next_token(self.llm.logits(out.hidden[rows, last]))
        done = torch.zeros(B, dtype=torch.bool, device=token.device)
        result: list[list[int]] = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            for b in range(B):
                if not done[b] and (eos is None or int(token[b]) != eos):
                    result[b].append(int(token[b]))
            if eos is not None:
                done |= token == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            step_state = SeqState(
                hidden=self.llm.embed(token[:, None]),
                attention_mask=torch.ones(B, 1, dtype=torch.long, device=token.device),
                position_ids=next_pos[:, None],
                visual_mask=torch.zeros(B, 1, dtype=torch.bool, device=token.device),
                targets=None,
                query_index=torch.zeros(B, dtype=torch.long, device=token.device),
            )
            o, _, masks = self.llm.run_layers(step_state, in_llm, cache=cache, past_mask=masks)
            token = self.next_token(self.llm.logits(o.hidden[:, -1]))
            next_pos = next_pos + 1
        return result, torch.stack(seen)


def drop_masked_keys(cache, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Remove from the KV cache every entry its key mask hides from all later tokens, after prefill.

    ``masks`` are ``run_layers``' key masks for decode steps; an in-LLM compressor with an
    attention rule (VoCo) has zeroed the keys no later token may attend (its visual tokens), and
    padding is zero too. Every layer's keys/values [B, H, T, hd] keep the rest, in order, re-padded
    on the right (one batched gather); returns the masks of the kept entries. The kept keys carry
    their RoPE rotation already, and decode positions continue from the prompt's, so the next
    tokens compute what they computed over the masked cache. Done only for one layer segment (the
    compressor acts before layer 0) and a plain ``DynamicCache`` (no sliding windows); otherwise
    the cache stays as it is, masked."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", [])
    if len(masks) != 1 or not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return masks
    keep = masks[0].bool()
    counts = keep.sum(1)
    width = int(counts.max())
    idx = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept columns first
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    for layer in layers:
        if layer.keys is None or layer.keys.shape[-2] != keep.shape[1]:
            raise RuntimeError(f"cache holds {None if layer.keys is None else layer.keys.shape[-2]} entries, "
                               f"its key mask {keep.shape[1]}")
        at = idx[:, None, :, None]
        layer.keys = layer.keys.gather(2, at.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, at.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
    return [valid.to(masks[0].dtype)]
