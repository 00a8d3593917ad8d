"""Vision tower: a HF CLIP or SigLIP vision model, run layer by layer.

We run the encoder's layers ourselves instead of calling the HF forward so that
 - only the layers up to the selected feature layer run (LLaVA reads layer -2, so the last
   block of CLIP-L is never needed: 1/24 of the tower saved at no change in output);
 - a vision-site compressor (ToMe) can merge tokens between blocks;
 - compressors that need the CLS token's attention (PruMerge+, VisionZip) can recompute just
   that row from the cached layer input (``query_attention``), never a full attention map.

Hidden-state indexing follows HF: index 0 is the embedding output (after CLIP's pre-layernorm),
index i the output of block i, so ``select_layer=-2`` is the second-to-last block's output.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from vtc.errors import ConfigError
from vtc.model.llm import resolve_attn_implementation


@dataclass
class EncoderInfo:
    """Geometry of a vision tower, known from its config alone (no weights)."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    has_cls: bool
    select_layer: int

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def layer_index(self, layer: int) -> int:
        """Hidden-state index (0 = embeddings, L = last block) of a possibly negative layer."""
        idx = layer if layer >= 0 else self.num_layers + 1 + layer
        if not 0 <= idx <= self.num_layers:
            raise ConfigError(
                "encoder.select_layer",
                f"layer {layer} is outside the encoder's hidden states 0..{self.num_layers} "
                f"(or -1..-{self.num_layers + 1})",
            )
        return idx


@dataclass
class EncoderOutput:
    features: torch.Tensor  # [B, N, C] patch features of the selected layer, CLS dropped
    hidden_states: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> [B, 1+N, C]
    grid: tuple[int, int] | None = None  # patch grid of ``features``; None once tokens merged
    cls: torch.Tensor | None = None  # [B, C] CLS token of the selected layer (CLIP only)


def _family(config) -> str:
    name = type(config).__name__.lower()
    if "siglip" in name:
        return "siglip"
    if "clip" in name:
        return "clip"
    raise ConfigError("encoder", f"unsupported vision config {type(config).__name__}; use CLIP or SigLIP")


def load_vision_config(path: str | None = None, config: dict | None = None, kind: str = "clip"):
    """Read a vision config without weights: from ``path/config.json`` or a dict of fields."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    if path is not None:
        if not os.path.isdir(path):
            raise ConfigError("encoder.path", f"directory {path!r} does not exist; point it at a local model folder")
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        raw = raw.get("vision_config", raw)  # a full CLIP/SigLIP checkpoint nests the vision part
        model_type = raw.get("model_type", kind)
        kind = "siglip" if "siglip" in model_type else "clip"
        raw = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
        config = raw
    cls = SiglipVisionConfig if kind == "siglip" else CLIPVisionConfig
    return cls(**(config or {}))


def encoder_info(config, select_layer: int = -2) -> EncoderInfo:
    info = EncoderInfo(
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        has_cls=_family(config) == "clip",
        select_layer=select_layer,
    )
    info.layer_index(select_layer)  # validates
    if config.image_size % config.patch_size:
        raise ConfigError(
            "encoder.image_size",
            f"{config.image_size} is not a multiple of the patch size {config.patch_size}",
        )
    return info


def unshard_for_read(module: nn.Module) -> None:
    """Gather an FSDP2-sharded module's parameters so they can be read outside its forward.

    FSDP2 (trainer=fsdp2, ``fully_shard``) keeps a sharded module's weights as shards between
    forwards; code that reads its submodules directly (the one-row recomputations below, FastV's
    and DART's scores in ``vtc.compressors.fastv``) must gather them first. A no-op for a module
    that is not sharded; the module's next forward reshards them. The project's one copy of this
    policy (compressors import it from here; vtc.model does not import it from vtc.compressors).
    """
    unshard = getattr(module, "unshard", None)
    if callable(unshard):
        unshard()


def reshard_after_read(module: nn.Module) -> None:
    """Give back what ``unshard_for_read`` gathered, for a module whose forward has already run
    this pass (layer K−1, read by FastV / DART after it ran): nothing else would reshard it."""
    reshard = getattr(module, "reshard", None)
    if callable(reshard):
        reshard()


class VisionEncoder(nn.Module):
    def __init__(self, model: nn.Module, select_layer: int = -2):
        super().__init__()
        self.model = model
        self.info = encoder_info(model.config, select_layer)
        self.family = _family(model.config)

    @classmethod
    def build(
        cls,
        kind: str = "clip",
        path: str | None = None,
        config: dict | None = None,
        select_layer: int = -2,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
    ) -> "VisionEncoder":
        """From a local directory (``path``) or a dict of config fields (random init).
        ``attn_implementation=auto``: flash_attention_2 on CUDA with flash-attn installed, else sdpa."""
        from transformers import CLIPVisionModel, SiglipVisionModel


        attn_implementation = resolve_attn_implementation(attn_implementation)

        vcfg = load_vision_config(path, config, kind)
        model_cls = SiglipVisionModel if _family(vcfg) == "siglip" else CLIPVisionModel
        torch_dtype = getattr(torch, dtype) if dtype else None
        if path is not None:
            model = model_cls.from_pretrained(
                path, local_files_only=True, attn_implementation=attn_implementation, dtype=torch_dtype
            )
        else:
            vcfg._attn_implementation = attn_implementation
            model = model_cls(vcfg)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
        return cls(model, select_layer)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings; an image of another size than the tower's (downsampling)
        reads the position embeddings interpolated to its patch grid."""
        other_size = pixel_values.shape[-1] != self.info.image_size or pixel_values.shape[-2] != self.info.image_size
        h = self.model.embeddings(pixel_values.to(self.model.dtype), interpolate_pos_encoding=other_size)
        if self.family == "clip":
            h = self.model.pre_layrnorm(h)
        return h

    def forward(
        self,
        pixel_values: torch.Tensor,
        keep_states: tuple[int, ...] = (),
        vision_compressor: nn.Module | None = None,
    ) -> EncoderOutput:
        """Run up to the selected layer; keep the hidden states at ``keep_states`` indices."""
        info = self.info
        sel = info.layer_index(info.select_layer)
        wanted = {info.layer_index(i) for i in keep_states} | {sel}
        last = max(wanted)
        h = self.embed(pixel_values)
        states: dict[int, torch.Tensor] = {}
        if 0 in wanted:
            states[0] = h
        ctx = vision_compressor.begin(h, self) if vision_compressor is not None else None
        for i, layer in enumerate(self.layers[:last]):
            if vision_compressor is not None:
                h = vision_compressor.layer_forward(i, layer, h, ctx)
            else:
                h = layer(h, None)
            if i + 1 in wanted:
                states[i + 1] = h
        out = states[sel]
        n_prefix = 1 if info.has_cls else 0
        merged = vision_compressor is not None
        grid = (pixel_values.shape[-2] // info.patch_size, pixel_values.shape[-1] // info.patch_size)
        return EncoderOutput(
            features=out[:, n_prefix:],
            hidden_states=states,
            grid=None if merged else grid,
            cls=out[:, 0] if info.has_cls else None,
        )

    def query_attention(self, state_index: int, hidden_in: torch.Tensor, query: int = 0) -> torch.Tensor:
        """Softmax attention of one query token over all tokens inside block ``state_index``.

        ``hidden_in`` is the block's input (hidden state ``state_index - 1``); returns
        [B, heads, N]. Only the one query row is computed, so no N x N map is materialised.
        """
        layer = self.layers[state_index - 1]
        unshard_for_read(layer)
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_in)
        b, n, _ = x.shape
        q = attn.q_proj(x[:, query : query + 1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * attn.scale
        return scores.softmax(-1)

    def block_keys(self, state_index: int, hidden_in: torch.Tensor) -> torch.Tensor:
        """Keys [B, heads, N, head_dim] of block ``state_index`` for similarity-based merging."""
        layer = self.layers[state_index - 1]
        unshard_for_read(layer)
        attn = layer.self_attn
        x = layer.layer_norm1(hidden_in)
        b, n, _ = x.shape
        return attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
