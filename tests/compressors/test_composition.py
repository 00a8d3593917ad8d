"""Every compressor composes with every schedule, or the config check refuses the pair.

The matrix is read from conf/compressor/*.yaml x conf/schedule/*.yaml (a new file is covered
automatically) x the attention kernels this machine has (eager only for the methods that touch the
attention itself: `EAGER_TOO`). Each cell composes the real train config;
``check_config`` either refuses it with a ConfigError naming a key, or the cell trains a tiny model
of the same geometry (112 px / 14 px patches = 64 tokens, 4 LLM layers) through the real
``CompressionCurriculum`` with every stage switch happening, and the visual tokens each LLM layer
saw are checked against the schedule, computed independently here. No cell may fail any other way.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vtc.assembly.checks import check_config
from vtc.assembly.compressors import build_compressors
from vtc.config import CONF_DIR, compose_conf
from vtc.errors import ConfigError
from vtc.lmm import LMM
from tests.tiny import IMG, tiny_encoder, tiny_llm, toy_batch, toy_video_batch

COMPRESSORS = sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml"))
SCHEDULES = sorted(p.stem for p in (CONF_DIR / "schedule").glob("*.yaml"))
GRID, PATCHES, DEPTH = 8, 64, 4


def kernels() -> list[str]:
    from transformers.utils import is_flash_attn_2_available

    out = ["sdpa", "eager"]
    if torch.cuda.is_available() and is_flash_attn_2_available():
        out.append("flash_attention_2")
    return out


def compose(*overrides: str):
    return compose_conf("train", list(overrides))


class Recorder:
    def __init__(self):
        self.metrics: list[tuple[int, dict]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))


def build(cfg, kernel: str) -> LMM:
    """The cell's model: the composed compressors on a small-width model of the config's geometry."""
    torch.manual_seed(0)
    enc = tiny_encoder(image_size=112, patch=14, width=32, layers=cfg.encoder.config.num_hidden_layers,
                       select_layer=cfg.encoder.select_layer)
    llm = tiny_llm(layers=cfg.llm.config.num_hidden_layers)
    enc.model.config._attn_implementation = kernel
    llm.model.config._attn_implementation = kernel
    compressor, added = build_compressors(cfg)
    return LMM(enc, llm, compressor, "mlp2x_gelu", image_token_id=IMG, pad_token_id=0, eos_token_id=2,
               stage_compressor=added)


def expected_layers(stage_knobs: dict | None, visual_in: int, n_layers: int) -> list[int] | None:
    """LLaVolta's pooling added by a schedule, recomputed: K = round(K32 * N / 32), tokens n // S
    from layer K on; an off stage leaves the count alone."""
    if stage_knobs is None:
        return [visual_in] * n_layers
    k = min(int(round(stage_knobs["layer"] * n_layers / 32)), n_layers - 1)
    return [visual_in] * k + [visual_in // stage_knobs["stride"]] * (n_layers - k)


# The eager kernel only where the method touches the attention itself (ToMe's size bias, VoCo's
# mask) and for the baseline: every other method recomputes its scores outside the kernel, so its
# cells would repeat the sdpa ones (and the matrix is most of `make test`'s time).
EAGER_TOO = {"none", "tome", "voco"}
CELLS = [(c, k) for c in COMPRESSORS for k in kernels() if k != "eager" or c in EAGER_TOO]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("compressor,kernel", CELLS)
def test_matrix_cell_trains_or_is_refused(compressor, schedule, kernel):
    from vtc.train.curriculum import CompressionCurriculum

    cfg = compose(f"compressor={compressor}", f"schedule={schedule}", f"encoder.attn_implementation={kernel}",
                  f"llm.attn_implementation={kernel}")
    try:
        check_config(cfg)
    except ConfigError as e:
        assert e.key.split(".")[0].split("[")[0] in ("compressor", "schedule", "encoder", "llm", "trainer"), e
        assert len(e.message) > 30, e
        return
    model = build(cfg, kernel).train()
    sched = cfg.schedule
    cb = CompressionCurriculum(sched.stages, sched.reference_layers, tuple(sched.scale_keys), sched.name)
    module = SimpleNamespace(model=model)
    cb.setup(None, module, "fit")
    stages = list(sched.stages) or [None]
    total = len(stages)  # one step per stage: every switch happens, and the matrix stays fast
    rec = Recorder()
    trainer = SimpleNamespace(global_step=0, max_steps=total, loggers=[rec])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    # a temporal member pools a video's frames: give it one (it leaves images alone)
    batch = toy_video_batch(image_size=112) if "temporal" in model.pipeline.by_site else toy_batch(image_size=112)
    seen_by_stage = {}
    for step in range(total):
        trainer.global_step = step
        cb.on_train_batch_start(trainer, module, batch, step)
        out = model(batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        idx = max(cb.current, 0)
        seen_by_stage[idx] = (out.visual_in.clone(), out.seen.clone())
    if not sched.stages:
        return
    assert sorted(seen_by_stage) == list(range(len(stages))), "every stage ran"
    assert [m["curriculum/stage"] for _, m in rec.metrics] == [float(i) for i in range(len(stages))]
    if sched.get("adds"):  # LLaVolta's pooling added over whatever the configured compressor leaves
        for i, st in enumerate(stages):
            visual_in, seen = seen_by_stage[i]
            for b in range(visual_in.shape[0]):
                n = int(visual_in[b])
                if n == 0:
                    continue
                assert seen[:, b].tolist() == expected_layers(st["knobs"], n, DEPTH), (i, b)
            logged = rec.metrics[i][1]
            per_layer = [logged[f"curriculum/layer_{j}_tokens"] for j in range(DEPTH)]
            nominal = int(logged["curriculum/visual_tokens_in"])
            assert per_layer == expected_layers(st["knobs"], nominal, DEPTH)
        assert cb.knobs[-1] is None and not model.stage_compressor.enabled  # ends as the configured model alone
    else:  # a keep: ramp of the configured compressor's own knob, heavy to light to as configured
        last = [int(seen_by_stage[i][1][-1, 0]) for i in range(len(stages))]
        assert last[0] < last[-1] and last == sorted(last), last
        assert model.compressor.get_knobs() == dict(cb.knobs[-1])


def test_the_design_cards_command_composes():
    """compressor=stf schedule=llavolta: STF's 16 of 64 tokens, LLaVolta's pooling on top; the last
    stage is plain STF, and the deployed model (eval) carries no schedule member."""
    cfg = compose("compressor=stf", "schedule=llavolta")
    check_config(cfg)
    compressor, added = build_compressors(cfg)
    assert type(compressor).__name__ == "SpatialTokenFusion" and type(added).__name__ == "VisualContextCompressor"
    assert build_compressors(cfg, training=False)[1] is None
    from vtc.compressors.schedule import compression_ratio, resolve_stages, schedule_stages, tokens_entering
    from vtc.compressors.chain import Pipeline

    model = build(cfg, "sdpa")
    pipe, added = model.pipeline, model.stage_compressor
    stages = schedule_stages(cfg.schedule, DEPTH)
    knobs = resolve_stages(stages, added, tokens_entering(pipe, added, PATCHES), model.encoder.info)
    assert knobs == [{"layer": 0, "stride": 8}, {"layer": 0, "stride": 2}, {"layer": 2, "stride": 2}, None]
    from vtc.compressors.schedule import apply_stage

    crs = []
    for k in knobs:
        apply_stage(added, k)
        crs.append(compression_ratio(pipe, PATCHES, DEPTH))
    # CR against 64 patches over 4 layers: 4*64 / sum(tokens per layer), tokens 16 -> 16//S from K on.
    assert crs == pytest.approx([4 * 64 / (4 * 2), 4 * 64 / (4 * 8), 4 * 64 / (2 * 16 + 2 * 8), 4 * 64 / (4 * 16)])
    assert Pipeline.of(compressor).tokens_in_llm(PATCHES) == 16


def test_chain_config_counts_and_keys():
    cfg = compose("compressor=stf_vcc")
    check_config(cfg)
    model = build(cfg, "sdpa")
    # STF 64 -> 16, then vcc stride 2 before layer round(2*4/32)=0... the chain's own layer is not scaled.
    assert model.pipeline.tokens_in_llm(PATCHES) == 16
    assert model.pipeline.tokens_per_layer(16, DEPTH) == [16, 16, 8, 8]
    out = model(toy_batch(image_size=112))
    assert out.seen[:, 0].tolist() == [16, 16, 8, 8] and out.seen[:, 2].tolist() == [0, 0, 0, 0]
    assert all(k.startswith("compressor.pre_llm.mlp.") for k in model.state_dict() if k.startswith("compressor."))
    with pytest.raises(ConfigError) as e:
        check_config(compose("compressor=stf_vcc", "compressor.llm.stride=0"))
    assert e.value.key == "compressor.llm.stride"
    with pytest.raises(ConfigError) as e:
        check_config(compose("compressor=stf_vcc", "compressor.llm.stride=17"))
    assert e.value.key == "compressor.llm.stride" and "16 visual tokens" in e.value.message
    model.compressor.set_knobs(stride=4)  # a knob only one member has
    assert model.compressor.get_knobs()["llm.stride"] == 4
    model.compressor.set_knobs(**{"llm.layer": 3})
    assert model.pipeline.tokens_per_layer(16, DEPTH) == [16, 16, 16, 4]


@pytest.mark.parametrize("overrides,key,words", [
    (["compressor=vcc", "schedule=llavolta"], "schedule.adds", "one compressor per site"),
    (["compressor=fastv", "schedule=two_stage"], "schedule.adds", "compressor=none is LLaVolta exactly"),
    (["compressor=stf", "schedule=coarse_to_fine"], "schedule.stages[0].keep", "schedule=llavolta"),
    (["compressor=fastv", "trainer=fsdp"], "compressor", "trainer=fsdp2"),
    (["compressor=visionzip", "trainer=fsdp"], "compressor", "trainer=fsdp2"),
    (["llm.attn_implementation=flash_attention_2"], "llm.attn_implementation", "CUDA"),
    (["compressor=tome", "trainer=gpu", "encoder.attn_implementation=flash_attention_2"], "compressor.prop_attn",
     "prop_attn=false"),
    (["compressor=voco", "trainer=gpu", "llm.attn_implementation=flash_attention_2"], "llm.attn_implementation",
     "sdpa"),
    (["compressor=pool", "schedule=llavolta", "schedule.stages.0.knobs.layer=40"], "schedule.stages[0].knobs.layer",
     "32-layer"),
    (["schedule=llavolta", "schedule.stages.3.knobs={layer: 2, stride: 2}"], "schedule.stages[3].knobs", "off"),
    (["compressor=pool", "schedule=llavolta", "schedule.stages.0.knobs.stride=128"], "schedule.stages[0]",
     "stride"),
])
def test_refusals_name_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as e:
        check_config(compose(*overrides))
    assert e.value.key.startswith(key), e.value
    assert words in str(e.value), e.value


def with_adds(cfg, adds: dict):
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.schedule.adds = adds
    return cfg


def test_a_schedule_may_only_add_a_parameter_free_member():
    stf = {"_target_": "vtc.compressors.stf.SpatialTokenFusion"}
    chain = {"_target_": "vtc.compressors.chain.Chain", "pre_llm": stf,
             "llm": {"_target_": "vtc.compressors.fastv.FastV"}}
    with pytest.raises(ConfigError) as e:  # two pre-LLM members: the added chain's STF and the configured pool
        check_config(with_adds(compose("compressor=pool", "schedule=two_stage"), chain))
    assert e.value.key == "schedule.adds.pre_llm"
    with pytest.raises(ConfigError) as e:
        check_config(with_adds(compose("compressor=vcc", "schedule=two_stage"), stf))
    assert e.value.key == "schedule.adds" and "parameter-free" in e.value.message


def test_keep_stages_map_to_each_methods_knob():
    """coarse_to_fine on the methods with a token-count knob: the share of the configured budget."""
    from vtc.compressors.schedule import resolve_stages, schedule_stages, tokens_entering

    expected = {"pool": [{"stride": 4}, {"stride": 2}, {"stride": 2}],  # 16 configured: 4, 8 -> nearest 4|16
                "fastv": [{"ratio": 1 - 8 / 64}, {"ratio": 1 - 16 / 64}, {"ratio": 0.5}],
                "vcc": [{"stride": 32}, {"stride": 16}, {"stride": 8}]}
    for name, want in expected.items():
        cfg = compose(f"compressor={name}", "schedule=coarse_to_fine")
        check_config(cfg)
        model = build(cfg, "sdpa")
        target = model.schedule_target
        stages = schedule_stages(cfg.schedule, DEPTH)
        got = resolve_stages(stages, target, tokens_entering(model.pipeline, target, PATCHES), model.encoder.info)
        for g, w in zip(got, want):
            for k, v in w.items():
                assert g[k] == pytest.approx(v), (name, got)


def test_m3_step_counts_every_scale_it_trains():
    """M3 trains all its scales in one step: the step's FLOPs are the sum over its passes."""
    from vtc.cost.accounting import batch_flops, model_shape

    cfg = compose("compressor=m3")
    model = build(cfg, "sdpa").train()
    out = model(toy_batch(image_size=112))
    passes = out.all_passes()
    assert [int(p.visual_in[0]) for p in passes] == [64, 16, 4, 1]
    shape = model_shape(model)
    one = [batch_flops(shape, p.lengths, p.visual_in, p.seen, p.targets_per_sample, trainable=("projector", "llm"))
           for p in passes]
    assert len(set(one)) == 4 and all(math.isfinite(f) for f in one)
    total = sum(one)
    assert total > 1.3 * one[0]  # the old count (first scale only) was one[0]
