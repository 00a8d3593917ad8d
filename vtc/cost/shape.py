"""The shapes that decide a LLaVA-style model's FLOPs: :class:`ModelShape`, read from HF configs,
and the LLaVA-1.5-7B preset :data:`LLAVA_15_7B`.

What :func:`vtc.cost.flops.forward_flops` takes as its model. No weights, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from vtc.cost.macs import llm_layer_macs

__all__ = ["ModelShape", "LLAVA_15_7B"]


def _as_obj(cfg: Any) -> Any:
    """Accept HF config objects, plain dicts and OmegaConf DictConfigs alike."""
    if isinstance(cfg, Mapping):
        return SimpleNamespace(**{str(k): v for k, v in cfg.items()})
    return cfg


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        v = getattr(cfg, name, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class ModelShape:
    """The shapes that decide a LLaVA-style model's FLOPs.

    Vision tower: ``vision_layers`` encoder layers of width ``vision_d``, MLP ``vision_m``, on
    ``vision_tokens`` tokens per image *including* ``vision_prefix`` prefix tokens (CLS), which
    are dropped before the projector (LLaVA: 577 = 576 patches + CLS, 576 reach the projector).
    ``vision_layers`` counts the layers that are *run*: LLaVA's released code and HF's
    ``LlavaForConditionalGeneration`` run all 24 CLIP layers and read layer −2's output; an
    encoder truncated after the feature layer runs 23 (``dataclasses.replace(s,
    vision_layers=23)``). ``vision_layers=0`` leaves the tower out (cached features).

    LLM: ``llm_layers`` decoder layers, hidden ``llm_d``, FFN ``llm_m``, ``llm_heads`` query
    heads, ``llm_kv_heads`` k/v heads, ``vocab``; ``include_lm_head`` adds the LM head.
    """

    vision_layers: int
    vision_d: int
    vision_m: int
    vision_tokens: int
    projector_dims: tuple[int, ...]
    llm_layers: int
    llm_d: int
    llm_m: int
    llm_heads: int
    llm_kv_heads: int
    vocab: int
    vision_prefix: int = 1
    llm_head_dim: int | None = None
    llm_ffn: str = "swiglu"
    include_lm_head: bool = True
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "projector_dims", tuple(int(x) for x in self.projector_dims))
        if len(self.projector_dims) < 2:
            raise ValueError(f"projector_dims needs >= 2 widths, got {self.projector_dims}")
        if self.vision_prefix > self.vision_tokens:
            raise ValueError("vision_prefix cannot exceed vision_tokens")
        # validates heads/kv heads/head_dim once, up front
        llm_layer_macs(1, self.llm_d, self.llm_m, self.llm_kv_heads, self.llm_heads,
                       self.llm_ffn, head_dim=self.llm_head_dim)

    @property
    def vision_patches(self) -> int:
        """Tokens per image that leave the encoder for the projector (prefix/CLS dropped)."""
        return self.vision_tokens - self.vision_prefix

    @classmethod
    def from_hf_configs(
        cls,
        vision_config: Any,
        text_config: Any,
        projector_dims: Sequence[int] | None = None,
        *,
        include_lm_head: bool = True,
        name: str = "",
    ) -> ModelShape:
        """Build from HF configs (objects, dicts or DictConfigs).

        Vision: ``CLIPVisionConfig`` or ``SiglipVisionConfig`` (a composite ``CLIPConfig``/
        ``SiglipConfig`` is unwrapped through ``.vision_config``). Tokens per image =
        ``(image_size // patch_size)²`` plus one CLS for CLIP (``model_type`` containing
        ``clip``); SigLIP has no CLS (its attention-pooling head is not used by LLaVA-style
        models and is not counted).

        Text: ``LlamaConfig``/``Qwen2Config``/``MistralConfig``-like: ``num_hidden_layers``,
        ``hidden_size``, ``intermediate_size``, ``num_attention_heads``,
        ``num_key_value_heads`` (default = heads), ``head_dim`` (default d/heads),
        ``vocab_size``. These families all use a gated (SwiGLU) MLP.

        ``projector_dims`` default: LLaVA-1.5's mlp2x_gelu, ``[vision_d, llm_d, llm_d]``.
        """
        v = _as_obj(vision_config)
        if _get(v, "vision_config") is not None:
            v = _as_obj(v.vision_config)
        t = _as_obj(text_config)
        if _get(t, "text_config") is not None:
            t = _as_obj(t.text_config)

        image_size = _get(v, "image_size")
        patch_size = _get(v, "patch_size")
        if image_size is None or patch_size is None:
            raise ValueError("vision config needs image_size and patch_size")
        side = int(image_size) // int(patch_size)
        model_type = str(_get(v, "model_type", default="")).lower()
        prefix = 1 if "clip" in model_type else 0
        vd = int(_get(v, "hidden_size"))
        td = int(_get(t, "hidden_size"))
        heads = int(_get(t, "num_attention_heads"))
        kv_heads = int(_get(t, "num_key_value_heads", default=heads))
        head_dim = _get(t, "head_dim")
        if head_dim is not None and int(head_dim) * heads == td:
            head_dim = None  # the default, keep the shape canonical
        return cls(
            vision_layers=int(_get(v, "num_hidden_layers")),
            vision_d=vd,
            vision_m=int(_get(v, "intermediate_size")),
            vision_tokens=side * side + prefix,
            vision_prefix=prefix,
            projector_dims=tuple(projector_dims) if projector_dims is not None else (vd, td, td),
            llm_layers=int(_get(t, "num_hidden_layers")),
            llm_d=td,
            llm_m=int(_get(t, "intermediate_size")),
            llm_heads=heads,
            llm_kv_heads=kv_heads,
            llm_head_dim=None if head_dim is None else int(head_dim),
            vocab=int(_get(t, "vocab_size")),
            include_lm_head=include_lm_head,
            name=name,
        )


LLAVA_15_7B = ModelShape(
    # CLIP ViT-L/14-336: 24 layers, d 1024, MLP 4096, (336/14)² = 576 patches + CLS.
    vision_layers=24,
    vision_d=1024,
    vision_m=4096,
    vision_tokens=577,
    vision_prefix=1,
    # mlp2x_gelu
    projector_dims=(1024, 4096, 4096),
    # Vicuna-7B v1.5 (LLaMA-2-7B): 32 layers, d 4096, FFN 11008, 32 heads (MHA), vocab 32000.
    llm_layers=32,
    llm_d=4096,
    llm_m=11008,
    llm_heads=32,
    llm_kv_heads=32,
    vocab=32000,
    name="llava-1.5-7b",
)
"""LLaVA-1.5-7B: CLIP-L/14-336 + mlp2x_gelu + Vicuna-7B."""
