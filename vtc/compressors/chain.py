"""Composition: at most one compressor per site, applied in the data's order.

A run's visual tokens pass the sites in turn: the pixels before the encoder (``image``:
downsampling), inside the vision encoder (``vision``: ToMe),
between the encoder and the projector (``pre_llm``: pooling, STF, VisionZip, ...) and inside the
LLM before decoder layer K (``llm``: LLaVolta's 1-D pooling, FastV, DART). ``Chain`` is the config
form of several members (``conf/compressor/stf_vcc.yaml``)::

    _target_: vtc.compressors.chain.Chain
    pre_llm: {_target_: vtc.compressors.stf.SpatialTokenFusion, window: 2, hidden: null}
    llm: {_target_: vtc.compressors.vcc.VisualContextCompressor, layer: 2, stride: 2}

``Pipeline`` is the run-time view the model and the accounting read: the configured compressor
(one method or a Chain) plus the member a schedule adds (``schedule.adds``: LLaVolta's in-LLM
pooling over whatever the base leaves), each at its own site. Counting composes: the tokens
leaving the encoder feed the pre-LLM member, whose output is what the in-LLM member pools, so
tokens per layer, FLOPs and equivalent tokens stay exact through the chain.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

from vtc.compressors.base import Compressor
from vtc.errors import ConfigError

SITES = ("image", "vision", "pre_llm", "temporal", "llm")  # the data's order: pixels, per frame, per video, in the LLM


def _site_of(member) -> str:
    return "pre_llm" if member.site not in SITES else member.site


class Chain(Compressor):
    """One compressor per site, as submodules named by their site (state-dict keys
    ``compressor.<site>.*``). Knobs are addressed as ``<site>.<knob>`` or, when only one member
    has it, by the knob's own name."""

    site: ClassVar[str] = "chain"

    def __init__(self, vision: Compressor | None = None, pre_llm: Compressor | None = None,
                 llm: Compressor | None = None, temporal: Compressor | None = None, image: Compressor | None = None):
        super().__init__()
        for site, member in (("image", image), ("vision", vision), ("pre_llm", pre_llm), ("temporal", temporal),
                             ("llm", llm)):
            if member is None:
                continue
            if isinstance(member, Chain):
                raise ConfigError(f"compressor.{site}", "a chain member cannot itself be a chain")
            if _site_of(member) != site:
                raise ConfigError(f"compressor.{site}", f"{type(member).__name__} acts at site "
                                  f"{member.site!r}, not {site!r}; put it under compressor.{_site_of(member)}")
            self.add_module(site, member)
        if not self.members():
            raise ConfigError("compressor", "a Chain needs at least one of image, vision, pre_llm, temporal, llm")

    def members(self) -> dict[str, Compressor]:
        return {s: m for s, m in self.named_children() if s in SITES}

    # What the export, interop and accounting code ask of "the compressor", over the members.
    @property
    def owns_projection(self) -> bool:  # type: ignore[override]
        return any(m.owns_projection for m in self.members().values())

    @property
    def needs_cls(self) -> bool:  # type: ignore[override]
        return any(m.needs_cls for m in self.members().values())

    @property
    def reads_layer_weights(self) -> bool:  # type: ignore[override]
        return any(m.reads_layer_weights for m in self.members().values())

    def output_dim(self, in_dim: int) -> int:
        pre = self.members().get("pre_llm")
        return pre.output_dim(in_dim) if pre is not None else in_dim

    @property
    def knobs(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(f"{s}.{k}" for s, m in self.members().items() for k in m.knobs)

    def get_knobs(self) -> dict:
        return {f"{s}.{k}": v for s, m in self.members().items() for k, v in m.get_knobs().items()}

    def set_knobs(self, **values) -> None:
        for key, value in values.items():
            if key in SITES and isinstance(value, dict):
                self._member(key).set_knobs(**value)
                continue
            site, _, knob = key.rpartition(".")
            if site:
                self._member(site).set_knobs(**{knob: value})
                continue
            owners = [s for s, m in self.members().items() if knob in m.knobs]
            if len(owners) != 1:
                raise ConfigError(f"compressor.{knob}", f"{'no' if not owners else 'more than one'} member of the "
                                  f"chain has this knob; address it as <site>.<knob>, one of {list(self.knobs)}")
            self.members()[owners[0]].set_knobs(**{knob: value})

    def _member(self, site: str) -> Compressor:
        if site not in self.members():
            raise ConfigError(f"compressor.{site}", f"the chain has no {site} member; members: {list(self.members())}")
        return self.members()[site]

    def set_enabled(self, enabled: bool) -> None:
        for m in self.members().values():
            m.set_enabled(enabled)
        self.enabled = enabled

    def check(self, encoder, llm_layers: int) -> None:
        for site, m in self.members().items():
            with rekeyed("compressor", f"compressor.{site}"):
                m.check(encoder, llm_layers)

    def setup(self, encoder, llm_hidden: int) -> None:
        for m in self.members().values():
            m.setup(encoder, llm_hidden)

    def describe(self) -> str:
        return " -> ".join(m.describe() for m in self.members().values())


@contextmanager
def rekeyed(old: str, new: str, context: str = ""):
    """Re-raise a member's ``ConfigError`` under the key the user actually typed (a chain member's
    ``compressor.stride`` is ``compressor.llm.stride``; a schedule's member is ``schedule.adds``),
    with ``context`` appended (e.g. which stage set the value)."""
    try:
        yield
    except ConfigError as e:
        key = new + e.key[len(old):] if e.key == old or e.key.startswith(old + ".") else e.key
        raise ConfigError(key, e.message + context) from None


def flatten_members(compressor: Compressor | None, key: str) -> list[tuple[str, Compressor]]:
    """(config key, member) of a configured compressor: a Chain's members, or the method itself."""
    if compressor is None:
        return []
    if isinstance(compressor, Chain):
        return [(f"{key}.{s}", m) for s, m in compressor.members().items()]
    return [(key, compressor)]


class Pipeline:
    """The compressors of a run by site. ``parts``: (config key, member) pairs; two members at one
    site are refused here, naming both keys."""

    def __init__(self, parts: list[tuple[str, Compressor]]):
        self.keys: dict[str, str] = {}
        self.by_site: dict[str, Compressor] = {}
        for key, member in parts:
            site = _site_of(member)
            if type(member).__name__ == "NoCompression":
                continue  # the identity occupies no site
            if site in self.by_site:
                raise ConfigError(key, f"{type(member).__name__} acts at site {site!r}, where "
                                  f"{self.keys[site]} already has {type(self.by_site[site]).__name__}: one compressor "
                                  f"per site (image, vision, pre_llm, temporal, llm). {_hint(key)}")
            self.keys[site] = key
            self.by_site[site] = member

    @classmethod
    def of(cls, compressor: Compressor | None, added: Compressor | None = None) -> "Pipeline":
        return cls(flatten_members(compressor, "compressor") + flatten_members(added, "schedule.adds"))

    def members(self) -> list[Compressor]:
        return [self.by_site[s] for s in SITES if s in self.by_site]

    def active(self, site: str) -> Compressor | None:
        m = self.by_site.get(site)
        return m if m is not None and m.enabled else None

    # -- composition rules ------------------------------------------------------------------------
    def encoder_info(self, encoder):
        """The geometry the sites after ``image`` see: a downsampled image's smaller patch grid."""
        image = self.active("image")
        return image.shrunk(encoder) if image is not None else encoder

    def check(self, encoder, llm_layers: int) -> None:
        """Each member's own checks (under its config key), then what only a chain can get wrong."""
        for site in SITES:
            if site in self.by_site:
                with rekeyed("compressor", self.keys[site]):
                    self.by_site[site].check(encoder if site == "image" else self.encoder_info(encoder), llm_layers)
        image, vision = self.by_site.get("image"), self.by_site.get("vision")
        if image is not None and vision is not None:
            raise ConfigError(self.keys["vision"], f"{type(vision).__name__} merges tokens on a schedule fixed for the "
                              f"tower's full patch grid, but {type(image).__name__} ({self.keys['image']}) feeds it a "
                              "smaller image; use one of the two, or a pre-LLM / in-LLM method after the downsampling")
        encoder = self.encoder_info(encoder)
        vision, pre = self.by_site.get("vision"), self.by_site.get("pre_llm")
        if vision is not None:
            vision.setup(encoder, 0)  # vision-site methods are parameter-free; ToMe counts from the geometry
        if vision is not None and pre is not None:
            raise ConfigError(self.keys["pre_llm"], f"{type(vision).__name__} ({self.keys['vision']}) merges tokens inside "
                              "the encoder and leaves no patch grid, which pre-LLM compressors read; pair it with an "
                              "in-LLM compressor (e.g. schedule=llavolta) or use one of the two alone")
        temporal = self.by_site.get("temporal")
        if temporal is not None and pre is not None and pre.variable_tokens:
            raise ConfigError(self.keys["temporal"], f"{type(temporal).__name__} averages frames token by token, but "
                              f"{type(pre).__name__} ({self.keys['pre_llm']}) keeps a different number of tokens in each "
                              "frame; pair it with a fixed-count method (pool, stf, visionzip, ...)")
        llm = self.by_site.get("llm")
        if llm is not None and getattr(llm, "stride", None) and getattr(llm, "layer", None) is not None:
            left = self.tokens_in_llm(encoder.num_patches)
            if llm.stride > left:
                raise ConfigError(f"{self.keys['llm']}.stride", f"{llm.stride} is larger than the {left} visual tokens "
                                  "the compressors before the LLM leave; nothing would be left")

    # -- counting ---------------------------------------------------------------------------------
    def tokens_in_llm(self, n: int) -> int:
        """Visual tokens entering the LLM for ``n`` patch tokens (nominal for data-dependent counts)."""
        for site in ("image", "vision", "pre_llm"):
            m = self.active(site)
            if m is not None:
                n = m.tokens_out(n)
        return n

    def tokens_per_layer(self, n_in_llm: int, num_layers: int) -> list[int]:
        m = self.active("llm")
        return m.tokens_per_layer(n_in_llm, num_layers) if m is not None else [n_in_llm] * num_layers

    def own_flops(self, n: int) -> float:
        """Forward FLOPs the members add per image beyond encoder, projector and LLM (an in-LLM
        member's scoring included, for the visual tokens entering the LLM)."""
        total, cur = 0.0, n
        for site in ("image", "vision", "pre_llm"):
            m = self.active(site)
            if m is not None:
                total += m.own_flops(cur)
                cur = m.tokens_out(cur)
        llm = self.active("llm")
        return total + (llm.own_flops(cur) if llm is not None else 0.0)

    def encoder_tokens(self, n: int):
        """Per run encoder block, (attention, MLP) tokens when a member shrinks the tower's input
        (downsampling) or merges inside it (ToMe); None: the full tower."""
        for site in ("image", "vision"):
            m = self.active(site)
            if m is not None:
                return m.encoder_tokens(n)
        return None

    @property
    def owns_projection(self) -> bool:
        return any(m.owns_projection for m in self.members())

    @property
    def needs_cls(self) -> bool:
        return any(m.needs_cls for m in self.members())

    def extra_layers(self) -> tuple[int, ...]:
        m = self.active("pre_llm")
        return tuple(getattr(m, "extra_layers", ())) if m is not None else ()

    def training_variants(self) -> list[tuple[Compressor, dict]]:
        """(member, knobs) per training forward of a member that trains several settings (M3)."""
        for m in self.members():
            if m.enabled and m.training_variants():
                return [(m, v) for v in m.training_variants()]
        return []

    def describe(self) -> str:
        active = [m.describe() for m in self.members() if m.enabled]
        return " -> ".join(active) if active else "uncompressed"


def _hint(key: str) -> str:
    if key.startswith("schedule.adds"):
        return ("The schedule adds its own in-LLM compressor over whatever the configured one leaves: use a vision or "
                "pre-LLM compressor with it (compressor=none is LLaVolta exactly), or a schedule that drives the "
                "configured compressor's own knobs (schedule=coarse_to_fine)")
    return "Put the methods at different sites (conf/compressor/stf_vcc.yaml is an example chain)"
