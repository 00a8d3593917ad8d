"""Stage-wise compression schedules (LLaVolta, arXiv 2406.20092, Sec. 3.3), for any compressor.

A schedule (``conf/schedule/*.yaml``) is a list of stages; stage i covers the training fraction
[end_{i-1}, end_i) and sets the knobs of the schedule's *target*: the member the schedule adds
(``adds:``, e.g. LLaVolta's in-LLM 1-D pooling on top of whatever the configured compressor
leaves), or the configured compressor itself when it adds none. A stage is one of

  ``knobs: {layer: 2, stride: 8}``  those knobs, the others as configured;
  ``knobs: null``                   the target switched off (a schedule's uncompressed stage);
  ``keep: 0.25``                    a quarter of the visual tokens the configured target keeps,
                                    mapped to the target's own knobs (``Compressor.budget_knobs``:
                                    pool stride, FastV/DART ratio, VisionZip counts, ToMe tokens, ...);
  ``knobs: {}``                     the target exactly as configured (the deployed model).

A schedule that adds a member must end with it off, so the model trained last is the configured
compressor alone, the one eval.py rebuilds. Layer indices are written for ``reference_layers``
(32: Vicuna-7B) and scaled to an N-layer LLM as round(K · N / reference_layers) (Python's round:
halves go to the even integer), so a 4-layer LLM maps K=2 -> 0 (the input embeddings), K=16 -> 2.

Everything here is pure and import-light: the config check validates every stage of a schedule
before anything is built, with the same code the training callback applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from vtc.compressors.chain import Pipeline, rekeyed
from vtc.errors import ConfigError


@dataclass
class Stage:
    end: float
    knobs: dict | None  # None: the target switched off
    keep: float | None = None  # a share of the configured target's tokens (resolved to knobs)


def parse_stages(stages, num_layers: int, reference_layers: int = 32, scale_keys=("layer",)) -> list[Stage]:
    out: list[Stage] = []
    prev = 0.0
    for i, st in enumerate(stages):
        key = f"schedule.stages[{i}]"
        end = float(Fraction(str(st["end"])))  # "1/3" is exact; 0.3333 would shift a boundary step
        if not prev < end <= 1.0:
            raise ConfigError(f"{key}.end", f"must increase within (0, 1], got {end} after {prev}")
        unknown = set(st) - {"end", "knobs", "keep"}
        if unknown:
            raise ConfigError(key, f"unknown entries {sorted(unknown)}; a stage has end and one of knobs / keep")
        keep = st.get("keep")
        knobs = st.get("knobs", {} if keep is not None else None)
        if keep is not None:
            if knobs:
                raise ConfigError(key, "give either knobs or keep, not both")
            if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
                raise ConfigError(f"{key}.keep", f"a share of the configured tokens in (0, 1], got {keep!r}")
        if knobs is not None:
            knobs = dict(knobs)
            for k in scale_keys:
                v = knobs.get(k)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < reference_layers:
                    raise ConfigError(f"{key}.knobs.{k}", f"{v!r} is not a layer of the {reference_layers}-layer "
                                      f"reference LLM the schedule is written for (0..{reference_layers - 1})")
                knobs[k] = min(int(round(v * num_layers / reference_layers)), num_layers - 1)
        out.append(Stage(end, knobs, keep))
        prev = end
    if out and out[-1].end != 1.0:
        raise ConfigError("schedule.stages", f"the last stage must end at 1.0, got {out[-1].end}")
    return out


def stage_at(stages: list[Stage], step: int, total: int) -> int:
    for i, st in enumerate(stages):
        if step < st.end * max(total, 1) - 1e-9:
            return i
    return len(stages) - 1


def kept_by(member, n: int) -> int:
    """Visual tokens ``member`` leaves of ``n`` entering it (after layer K for in-LLM methods)."""
    if member.site == "llm":
        return member.kept(n) if member.compressing() else n
    return member.tokens_out(n)


def resolve_stages(stages: list[Stage], target, n_in: int, encoder) -> list[dict | None]:
    """Each stage's concrete knobs for ``target`` (None: off). ``n_in``: the tokens entering the
    target with the configured chain; ``keep`` stages become knobs through ``budget_knobs``."""
    configured = target.get_knobs()
    budget = kept_by(target, n_in)
    out: list[dict | None] = []
    for i, st in enumerate(stages):
        if st.knobs is None:
            out.append(None)
            continue
        knobs = {**configured, **st.knobs}
        if st.keep is not None:
            tokens = max(1, round(budget * st.keep))
            with rekeyed("schedule", f"schedule.stages[{i}].keep", f" (stage {i}: keep {st.keep} of {budget} tokens)"):
                knobs.update(target.budget_knobs(tokens, n_in, encoder))
        out.append(knobs)
    return out


def apply_stage(target, knobs: dict | None) -> None:
    if knobs is None:
        target.set_enabled(False)
    else:
        target.set_enabled(True)
        target.set_knobs(**knobs)


def compression_ratio(pipeline, n_visual: int, num_layers: int) -> float:
    """LLaVolta's CR = N·L / Σ_layers(visual tokens seen) against the uncompressed L patch tokens;
    for their pooling alone this is N·L / ((N−K)·L/S + K·L). Accepts a Pipeline or one compressor."""
    if not isinstance(pipeline, Pipeline):
        pipeline = Pipeline.of(pipeline)
    per_layer = pipeline.tokens_per_layer(pipeline.tokens_in_llm(n_visual), num_layers)
    return num_layers * n_visual / max(sum(per_layer), 1)


def schedule_stages(sched: dict, depth: int) -> list[Stage]:
    return parse_stages(sched.get("stages") or [], depth, sched.get("reference_layers", 32),
                        tuple(sched.get("scale_keys", ("layer",))))


def validate_schedule(sched: dict, pipeline: Pipeline, target, added, encoder, depth: int) -> list[dict | None]:
    """Every stage applied to the chain and checked, the chain restored afterwards; returns the
    resolved stage knobs. ConfigErrors name the stage that set the bad value."""
    stages = schedule_stages(sched, depth)
    if not stages:
        return []
    if added is not None and stages[-1].knobs is not None:
        raise ConfigError(f"schedule.stages[{len(stages) - 1}].knobs", "a schedule that adds a compressor must end "
                          "with it off (knobs: null): the model trained last is the configured compressor alone, "
                          "the one eval.py rebuilds")
    resolved = resolve_stages(stages, target, tokens_entering(pipeline, target, encoder.num_patches), encoder)
    saved = (target.get_knobs(), target.enabled)
    try:
        for i, knobs in enumerate(resolved):
            context = f" (set by schedule.stages[{i}] of schedule={sched.get('name', '?')})"
            with rekeyed("schedule", f"schedule.stages[{i}]", context):
                with rekeyed("compressor", "compressor", context):
                    apply_stage(target, knobs)
                    pipeline.check(encoder, depth)
    finally:
        target.set_knobs(**saved[0])
        target.enabled = saved[1]
    return resolved


def tokens_entering(pipeline: Pipeline, target, n_patches: int) -> int:
    """Tokens entering the schedule's ``target`` from the sites before it, as configured."""
    if target.site == "llm":
        return pipeline.tokens_in_llm(n_patches)
    vision = pipeline.active("vision")
    if target.site == "pre_llm" and vision is not None:
        return vision.tokens_out(n_patches)
    return n_patches
