"""The compressor's own cost in the compressor-zoo benchmark (:mod:`vtc.bench.compressors`):
for each compressor a function that runs just its work, on inputs captured from a real forward,
and returns the seconds it took.

How it is isolated depends on where the compressor acts (``comp.site``):

* pre-LLM: ``compressor(features, enc)`` on the step's encoder output, plus its backward when the
  output carries gradients; the MLP that replaces the projector (STF, STF+MBTF) is timed alone and
  subtracted, since ``none`` runs a projector too. M3: summed over every trained scale.
* in-LLM: ``compress(state, at)`` on the state captured at layer K, forward + backward.
* vision (ToMe): the frozen encoder forward with merging minus without; the time inside
  ``bipartite_merge`` is recorded too.
* image (downsampling): the resize of the batch's images.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

import vtc.compressors.tome as tome_mod
from vtc.bench import common as C


@contextmanager
def capture_llm_state(comp):
    """Record the (state, layer context) an in-LLM compressor is handed."""
    seen = []
    orig = comp.compress

    def wrapped(state, at):
        seen.append((state, at))
        return orig(state, at)

    comp.compress = wrapped
    try:
        yield seen
    finally:
        del comp.compress


_COTANGENTS: dict = {}


def cotangent(o: torch.Tensor) -> torch.Tensor:
    """A fixed random gradient for an output of this shape (made once, outside the timed calls)."""
    key = (tuple(o.shape), o.dtype)
    if key not in _COTANGENTS:
        _COTANGENTS[key] = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(0))
    return _COTANGENTS[key]


def _backward_if_grad(out):
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    outs = [o for o in outs if o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [cotangent(o) for o in outs])


def own_cost_fn(model, batch):
    """(fn, description, extra) where fn() runs and returns the seconds of the compressor's own work."""
    comp = model.compressor
    pixels = batch["pixel_values"]
    if comp.site == "pre_llm":
        if type(comp).__name__ == "NoCompression":
            return (lambda: 0.0), "identity (no work)", {}
        extra = tuple(getattr(comp, "extra_layers", ()))
        with torch.no_grad():
            enc = model.encoder(pixels, keep_states=extra)
        enc.encoder = model.encoder
        feats = enc.features
        if comp.after_projector:  # M3, DivPrune: the method reads the projected tokens (projector not timed)
            with torch.no_grad():
                feats = model.projector(feats)
        variants = comp.training_variants() or [None]

        # the MLP that replaces the projector (STF): timed alone, subtracted
        proj_mlp = getattr(comp, "mlp", None) if comp.owns_projection else None
        captured = {}
        if proj_mlp is not None:
            h = proj_mlp.register_forward_hook(lambda m, a, o: captured.setdefault("z", a[0].detach()))
            with torch.no_grad():
                comp(feats, enc)
            h.remove()

        def call():
            saved = comp.get_knobs()
            total = 0.0
            try:
                for knobs in variants:
                    if knobs:
                        comp.set_knobs(**knobs)
                    total += C.timed(lambda: _backward_if_grad(comp(feats, enc)))
            finally:
                comp.set_knobs(**saved)
            if proj_mlp is not None:
                z = captured["z"].clone().requires_grad_(hasattr(comp, "fusion"))  # MBTF: grads flow into the fusion MLP
                total -= C.timed(lambda: _backward_if_grad(proj_mlp(z)))
            return total

        desc = "compressor(features, enc) fwd" + (" + bwd" if any(p.requires_grad for p in comp.parameters()) else "")
        if proj_mlp is not None:
            desc += " − its projector MLP (fwd+bwd)"
        if len(variants) > 1:
            desc += f", summed over the {len(variants)} trained scales"
        return call, desc, {}

    if comp.site == "llm":
        with capture_llm_state(comp) as seen, torch.no_grad():
            model._forward_once(batch)
        state, at = seen[0]

        def call():
            st = state.with_hidden(state.hidden.detach().clone().requires_grad_(True))

            def fwd_bwd():
                out = comp.compress(st, at)
                torch.autograd.backward(out.hidden, cotangent(out.hidden))

            return C.timed(fwd_bwd)

        return call, f"compress(state, K={at.index}) fwd + bwd", {}

    if comp.site == "vision":
        merge_time = [0.0]
        orig = tome_mod.bipartite_merge

        def timed_merge(*a, **k):
            t = time.perf_counter()
            out = orig(*a, **k)
            merge_time[0] += time.perf_counter() - t
            return out

        def call():
            with torch.no_grad():
                t_without = C.timed(lambda: model.encoder(pixels))
                merge_time[0] = 0.0
                tome_mod.bipartite_merge = timed_merge
                try:
                    t_with = C.timed(lambda: model.encoder(pixels, vision_compressor=comp))
                finally:
                    tome_mod.bipartite_merge = orig
            call.merge_times.append(merge_time[0])
            return t_with - t_without

        call.merge_times = []
        return call, "encoder fwd with merging − without (frozen, no grad)", {"merge_times": call.merge_times}
    if comp.site == "image":  # downsampling: the resize alone (the smaller tower is the saving, not a cost)
        patch = model.encoder.info.patch_size
        return (lambda: C.timed(lambda: comp(pixels, patch))), "resize of the batch's images", {}
    raise ValueError(f"unknown site {comp.site!r}")

