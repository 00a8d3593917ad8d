"""Schedules: stage boundaries, layer scaling and the LLaVolta compression ratio."""
import pytest
from omegaconf import OmegaConf

from vtc.compressors.vcc import VisualContextCompressor
from vtc.config import CONF_DIR
from vtc.errors import ConfigError
from vtc.cost.schedules import llavolta_cr
from vtc.train.curriculum import compression_ratio, parse_stages, stage_at


def load(name):
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "schedule" / f"{name}.yaml"))


def test_llavolta_stages_on_32_layers_are_the_papers():
    stages = parse_stages(load("llavolta")["stages"], num_layers=32)
    assert [s.end for s in stages] == [0.25, 0.5, 0.75, 1.0]
    assert [s.knobs for s in stages] == [{"layer": 2, "stride": 8}, {"layer": 2, "stride": 2},
                                         {"layer": 16, "stride": 2}, None]
    deeper = parse_stages(load("llavolta_deeper")["stages"], num_layers=32)
    assert [s.knobs for s in deeper][:3] == [{"layer": 2, "stride": 8}, {"layer": 16, "stride": 8},
                                             {"layer": 16, "stride": 2}]


def test_layer_indices_scale_to_depth():
    stages = parse_stages(load("llavolta")["stages"], num_layers=4)
    # round(2 * 4 / 32) = 0 (input embeddings), round(16 * 4 / 32) = 2
    assert [s.knobs["layer"] for s in stages[:3]] == [0, 0, 2]
    stages = parse_stages(load("llavolta")["stages"], num_layers=24)
    assert [s.knobs["layer"] for s in stages[:3]] == [2, 2, 12]


def test_stage_at_boundaries():
    stages = parse_stages(load("llavolta")["stages"], num_layers=32)
    total = 100
    assert [stage_at(stages, s, total) for s in (0, 24, 25, 49, 50, 74, 75, 99, 100)] == [0, 0, 1, 1, 2, 2, 3, 3, 3]
    three = parse_stages(load("llavolta_3")["stages"], num_layers=32)
    assert [stage_at(three, s, 90) for s in (29, 30, 59, 60, 89)] == [0, 1, 1, 2, 2]


def test_bad_schedules_name_the_key():
    with pytest.raises(ConfigError, match=r"schedule.stages\[1\].end"):
        parse_stages([{"end": 0.5, "knobs": None}, {"end": 0.4, "knobs": None}], 32)
    with pytest.raises(ConfigError, match="schedule.stages"):
        parse_stages([{"end": 0.5, "knobs": None}], 32)


@pytest.mark.parametrize("K,S", [(2, 8), (2, 2), (16, 2), (16, 8)])
def test_compression_ratio_matches_llavolta_formula(K, S):
    comp = VisualContextCompressor(layer=K, stride=S)
    N, L = 32, 576
    expected = N * L / ((N - K) * L / S + K * L)  # CR = N·L / ((N−K)·L/S + K·L)
    assert compression_ratio(comp, L, N) == pytest.approx(expected)
    assert compression_ratio(comp, L, N) == pytest.approx(llavolta_cr(N, K, S))
    comp.set_enabled(False)
    assert compression_ratio(comp, L, N) == pytest.approx(1.0)


def test_stage_knobs_apply_to_compressor():
    comp = VisualContextCompressor(layer=2, stride=8)
    comp.set_knobs(layer=16, stride=2)
    assert comp.get_knobs() == {"layer": 16, "stride": 2}
    with pytest.raises(ConfigError, match="compressor.ratio"):
        comp.set_knobs(ratio=0.5)
