"""The compressor contract: every visual-token compression method is one ``Compressor``.

A compressor declares where it acts (``site``):
  - ``"vision"``: inside the vision encoder, between its blocks (ToMe);
  - ``"pre_llm"``: on the encoder's patch features, before the projector (pooling, STF,
    PruMerge+, VisionZip, ...), per image and per video frame;
  - ``"temporal"``: on a video's frames after the projector (temporal pooling);
  - ``"llm"``: inside the LLM, before decoder layer ``layer`` (LLaVolta's pooling, FastV, DART).

It exposes ``knobs``: the attribute names a curriculum may change during a run (a stride, a keep
ratio, a layer index). ``check(encoder, llm)`` rejects a configuration that cannot work before any
model is built; ``setup(encoder, llm)`` creates parameters once the model widths are known, so a
real-size config can be validated without allocating anything.

Counting: ``tokens_out(n)`` is the visual tokens leaving a pre-LLM/vision compressor for ``n``
patch tokens in; ``tokens_per_layer(n, num_layers)`` the visual tokens each LLM layer sees (for
FLOPs and "equivalent tokens"). Methods whose count depends on the data report the count of the
last batch through the LMM's measured ``seen`` statistics instead.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from vtc.errors import ConfigError
from vtc.model.encoder import EncoderInfo


class Compressor(nn.Module):
    site: ClassVar[str] = "pre_llm"
    knobs: ClassVar[tuple[str, ...]] = ()
    #: True when the method produces features already at the LLM width (STF's fusion MLP is the
    #: projector), so no separate projector is built.
    owns_projection: ClassVar[bool] = False
    #: True when the method reads the CLS token (PruMerge+, VisionZip): encoders without one
    #: (SigLIP) must be told at start-up.
    needs_cls: ClassVar[bool] = False
    #: True when the method runs a layer's submodules or reads its weights outside that layer's
    #: own forward (FastV/DART score with a decoder layer's q/k; ToMe, PruMerge+ and VisionZip
    #: recompute encoder attention). FSDP1 keeps such weights as flat shards there: the config
    #: check sends these methods to trainer=fsdp2, which vtc unshards explicitly.
    reads_layer_weights: ClassVar[bool] = False
    #: True when the tokens kept per image depend on the image (PruMerge+): such a method hands a
    #: list of per-image tensors on, which a temporal compressor cannot average frame by frame.
    variable_tokens: ClassVar[bool] = False

    #: False turns the method off without removing it (a curriculum's uncompressed stage).
    #: Methods whose parameters replace the projector (STF) cannot be turned off.
    enabled: bool = True

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        """Raise ``ConfigError`` naming the key when this configuration cannot work."""

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        """Create parameters once the widths are known (parameter-free methods do nothing)."""

    # -- knobs ---------------------------------------------------------------------------------
    def get_knobs(self) -> dict:
        return {k: getattr(self, k) for k in self.knobs}

    def set_enabled(self, enabled: bool) -> None:
        if not enabled and self.owns_projection:
            raise ConfigError("schedule", f"{type(self).__name__} is the projector and cannot be switched off by a stage")
        self.enabled = enabled

    def set_knobs(self, **values) -> None:
        for k, v in values.items():
            if k not in self.knobs:
                raise ConfigError(f"compressor.{k}", f"not a knob of {type(self).__name__}; knobs: {list(self.knobs)}")
            setattr(self, k, v)

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        """Knob values that make the method keep about ``tokens`` of the ``n`` visual tokens entering
        it: how a ``keep:`` stage of a schedule (conf/schedule/coarse_to_fine.yaml) maps onto this
        method's own knobs. Methods without a token-count knob refuse."""
        raise ConfigError("schedule", f"{type(self).__name__} has no knob that sets how many visual tokens it keeps "
                          f"(knobs: {list(self.knobs) or 'none'}); schedule its knobs by name (stages' knobs:) or "
                          "use schedule=llavolta, which adds LLaVolta's in-LLM pooling on top of it")

    def training_variants(self) -> list[dict]:
        """Knob settings to average the training loss over (M3 trains all scales at once).
        Empty: train with the current knobs."""
        return []

    # -- counting ------------------------------------------------------------------------------
    def tokens_out(self, n: int) -> int:
        return n

    def tokens_per_layer(self, n: int, num_layers: int) -> list[int]:
        return [self.tokens_out(n) if self.enabled else n] * num_layers

    def output_dim(self, in_dim: int) -> int:
        return in_dim

    def encoder_tokens(self, n: int) -> list[tuple[int, int]] | None:
        """Per run encoder block, the tokens (prefix included) its attention and its MLP see, for
        methods that shrink the sequence inside the vision tower (ToMe); None: the tower runs
        uncompressed. Feeds the FLOPs accounting (``vtc.cost.flops.forward_flops``)."""
        return None

    def own_flops(self, n: int) -> float:
        """Forward FLOPs the method itself adds per image for ``n`` patch tokens, beyond the
        encoder, projector and LLM (e.g. MBTF's per-token fusion MLP, a score's recomputed
        attention row). For an in-LLM method ``n`` is the visual tokens entering the LLM."""
        return 0.0

    def describe(self) -> str:
        knobs = ", ".join(f"{k}={v}" for k, v in self.get_knobs().items())
        return f"{type(self).__name__}({knobs})"


class PreLLMCompressor(Compressor):
    site: ClassVar[str] = "pre_llm"
    #: hidden-state indices (HF convention, negative allowed) the method needs besides the
    #: selected layer (MBTF's extra blocks).
    extra_layers: ClassVar[tuple[int, ...]] = ()
    #: True when the method acts on the projected tokens (M3's official code pools after the
    #: projector): the LMM projects every patch first, then hands the result to ``forward``; the
    #: projector then runs on all patches, which the method counts in ``own_flops``. Such a method
    #: keeps the width (``output_dim`` is the identity).
    after_projector: bool = False
    #: the projector's linear widths (``vtc.cost.accounting.linear_chain_dims``), set by the LMM for
    #: methods that act after it.
    projector_dims: list[int] | None = None

    def forward(self, features: torch.Tensor, enc) -> torch.Tensor:  # pragma: no cover - abstract
        """features [B, N, C] (CLS dropped), ``enc`` the EncoderOutput (grid, states, cls) plus
        ``enc.encoder`` for recomputing attention rows. Returns [B, N', C']."""
        raise NotImplementedError


class LLMCompressor(Compressor):
    site: ClassVar[str] = "llm"
    knobs: ClassVar[tuple[str, ...]] = ("layer",)

    def __init__(self, layer: int | None = 2):
        super().__init__()
        self.layer = layer
        self.llm_hidden = 0  # set by setup(); scoring FLOPs are counted at this width

    def setup(self, encoder: EncoderInfo, llm_hidden: int) -> None:
        self.llm_hidden = llm_hidden

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        """``layer`` is an LLM layer index, or null (no compression: a schedule's off stage)."""
        if self.layer is None:
            return
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 0 <= self.layer < llm_layers:
            raise ConfigError(
                "compressor.layer",
                f"{self.layer!r} is outside the LLM's layers 0..{llm_layers - 1} (or null: no compression)",
            )

    def compressing(self) -> bool:
        return self.enabled and self.layer is not None

    def applies_at(self, layer_idx: int) -> bool:
        return self.compressing() and layer_idx == self.layer

    def kept(self, n: int) -> int:
        """Visual tokens left after the layer for ``n`` before it."""
        return n

    def tokens_per_layer(self, n: int, num_layers: int) -> list[int]:
        if not self.compressing():
            return [n] * num_layers
        k = min(self.layer, num_layers)
        return [n] * k + [self.kept(n)] * (num_layers - k)

    def compress(self, state, at):  # pragma: no cover - abstract
        """``state`` (a ``SeqState``) entering decoder layer ``at.index``; ``at`` the
        ``vtc.model.sequence.LayerContext`` (that layer, the previous one and its input, the final
        norm). Returns the compressed state."""
        raise NotImplementedError


class StagedPruner(LLMCompressor):
    """An in-LLM method that drops visual tokens before each layer of ``layers`` (increasing):
    PyramidDrop, SparseVLM. Subclasses give ``stage_counts(n)``, the visual tokens left after each
    stage for ``n`` entering the LLM; counting follows from it."""

    def compressing(self) -> bool:
        return self.enabled and bool(self.layers)

    def applies_at(self, layer_idx: int) -> bool:
        return self.compressing() and layer_idx in list(self.layers)

    def stage_counts(self, n: int) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def kept(self, n: int) -> int:
        return self.stage_counts(n)[-1] if self.compressing() else n

    def tokens_per_layer(self, n: int, num_layers: int) -> list[int]:
        out = [n] * num_layers
        if self.compressing():
            for layer, after in zip(self.layers, self.stage_counts(n)):
                out[layer:] = [after] * max(0, num_layers - layer)
        return out


def kept_count(n: int, ratio: float) -> int:
    """Visual tokens kept of ``n`` when a fraction ``ratio`` is dropped: ``n − floor(ratio·n)``.
    (A tiny tolerance keeps float products such as 0.3·10 from flooring one too low.)"""
    return n - min(n, int(math.floor(ratio * n + 1e-9)))


class RatioPruner(LLMCompressor):
    """An in-LLM method that drops a fraction ``ratio`` of the visual tokens before ``layer``."""

    knobs: ClassVar[tuple[str, ...]] = ("layer", "ratio")
    reads_layer_weights: ClassVar[bool] = True  # scores with the decoder layer's q/k projections

    def __init__(self, layer: int | None = 2, ratio: float = 0.5):
        super().__init__(layer)
        self.ratio = ratio

    def check(self, encoder: EncoderInfo, llm_layers: int) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 <= float(self.ratio) < 1.0:
            raise ConfigError(
                "compressor.ratio", f"the fraction of image tokens dropped must be in [0, 1), got {self.ratio!r}"
            )
        super().check(encoder, llm_layers)

    def compressing(self) -> bool:
        return super().compressing() and self.ratio > 0

    def budget_knobs(self, tokens: int, n: int, encoder: EncoderInfo) -> dict:
        """Drop ratio R = 1 − tokens/n (kept = n − ⌊R·n⌋ = tokens)."""
        return {"ratio": 1.0 - min(tokens, n) / n}

    def kept(self, n: int) -> int:
        return kept_count(n, self.ratio)

    def own_flops(self, n: int) -> float:
        """The score's recomputation per image, ``n`` visual tokens at width d: their keys
        (2·n·d², counted at the full width: an upper bound under GQA) and one query row against them
        (2·n·d over all heads); the few text tokens' keys and the query's projection are left out."""
        d = self.llm_hidden
        return 2.0 * n * d * d + 2.0 * n * d if self.compressing() else 0.0


class NoCompression(Compressor):
    """The uncompressed baseline: every patch token reaches the LLM (LLaVA-1.5: 576)."""

    site: ClassVar[str] = "pre_llm"

    def forward(self, features: torch.Tensor, enc=None) -> torch.Tensor:
        return features
