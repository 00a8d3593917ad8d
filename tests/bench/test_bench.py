"""The benchmarks' core functions at tiny sizes, one repeat: structure and analytic numbers only
(timings are machine noise here and are never asserted)."""
from __future__ import annotations

import json
import math

import pytest

from vtc.bench import common as C
from vtc.config import CONF_DIR


@pytest.fixture(scope="module")
def zoo():
    from vtc.bench import compressors

    return compressors.run(C.QUICK, repeats=1, warmup=1, profile_hf=False, log=lambda m: None)


@pytest.fixture(scope="module")
def curriculum():
    from vtc.bench import curriculum

    return curriculum.run(curriculum.QUICK, steps=4, repeats=1, block=2, log=lambda m: None)


def test_zoo_has_a_row_per_compressor_config(zoo):
    # every image method (chains and the video-only temporal pooling are measured elsewhere)
    files = sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml")
                   if "Chain" not in p.read_text() and "TemporalPool" not in p.read_text())
    methods = [r["method"] for r in zoo["rows"]]
    assert sorted(m for m in methods if m != "hf_llava") == files
    assert methods.count("hf_llava") == 1


def test_zoo_flops_ratios(zoo):
    by = {r["method"]: r for r in zoo["rows"]}
    assert by["none"]["flops_ratio"] == 1.0  # exactly: the same number divided by itself
    assert by["pool"]["flops_ratio"] > 1
    assert by["pool"]["visual_in"] == C.QUICK.num_patches // 4
    # m3 trains every scale: one forward per scale, so it costs more than none
    assert by["m3"]["forwards"] == 4 and by["m3"]["flops_ratio"] < 1
    # in-LLM methods: same tokens in, fewer tokens per layer after K
    for m in ("vcc", "fastv", "dart"):
        assert by[m]["visual_in"] == C.QUICK.num_patches and by[m]["equiv_tokens"] < C.QUICK.num_patches
        assert by[m]["flops_ratio"] > 1
    for r in zoo["rows"]:
        for k in ("step_ms", "speedup", "peak_mib"):
            assert math.isfinite(r[k])


def test_zoo_flops_match_an_independent_count(zoo):
    """pool stride 2: the step's FLOPs recomputed from vtc.cost.flops by hand (same convention)."""
    from vtc.cost.flops import forward_flops, train_step_flops
    from vtc.cost.accounting import model_shape
    from vtc.bench.compressors_build import compressor_for

    s = C.QUICK
    model = C.build_lmm(s, compressor_for("pool", s))
    shape = model_shape(model)
    total = 0.0
    for n_text in C.text_lengths(s):
        text = n_text - 1  # the placeholder is replaced by the visual tokens
        f = forward_flops(shape, text, [s.num_patches // 4] * s.llm_layers, projector_tokens=s.num_patches // 4,
                          lm_head_tokens=s.answer_tokens)
        total += train_step_flops(f, frozen=("vision",))
    by = {r["method"]: r for r in zoo["rows"]}
    assert by["pool"]["flops"] == pytest.approx(total, rel=1e-12)


def test_zoo_hf_llava_computes_the_same_loss_and_verdicts_are_reported(zoo):
    assert zoo["loss_diff_vtc_hf"] < 1e-4
    targets = {v["target"] for v in zoo["verdicts"]}
    assert any("vtc none / HF" in t for t in targets)
    assert all(isinstance(v["passed"], bool) for v in zoo["verdicts"])


def test_zoo_markdown_and_json(zoo, tmp_path):
    from vtc.bench.compressors_report import to_markdown

    md, js = C.write_outputs(tmp_path / "zoo", to_markdown(zoo), zoo)
    text = md.read_text()
    assert "| none |" in text
    assert "PASS" in text or "FAIL" in text
    assert json.loads(js.read_text())["benchmark"] == "compressors"


def test_curriculum_stage_cr_equals_the_llavolta_formula(curriculum):
    from vtc.bench.curriculum import QUICK
    from vtc.cost.schedules import llavolta_cr

    N = QUICK.llm_layers
    rows = curriculum["stages"]
    assert [r["stage"] for r in rows] == [1, 2, 3, 4]
    # llavolta.yaml for N = 8: K = round(2·8/32) = 0, round(16·8/32) = 4
    assert [(r["K"], r["S"]) for r in rows] == [(0, 8), (0, 2), (4, 2), (None, None)]
    for r in rows:
        expected = 1.0 if r["K"] is None else N / ((N - r["K"]) / r["S"] + r["K"])
        assert r["cr_formula"] == pytest.approx(expected)
        assert r["cr_measured"] == pytest.approx(expected)  # from the tokens the step really saw
        if r["K"] is not None:
            assert r["cr_formula"] == pytest.approx(llavolta_cr(N, r["K"], r["S"]))
    assert rows[-1]["flops_ratio"] == pytest.approx(1.0)  # the last stage is uncompressed


def test_curriculum_savings(curriculum):
    F = curriculum["flops_total"]
    assert F["llavolta"] < F["none"]
    assert 0 < curriculum["analytic_saving"] < 1
    assert math.isfinite(curriculum["measured_saving"])
    assert set(curriculum["wall_s"]) == {"llavolta", "none"}


def test_gpu_step_without_cuda_exits_2_with_a_message(monkeypatch, capsys):
    from vtc.bench import gpu_step

    monkeypatch.setattr(gpu_step.torch.cuda, "is_available", lambda: False)
    assert gpu_step.main(["--compressors", "none"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_step_mfu_arithmetic_and_peaks():
    from vtc.bench.gpu_step import UnknownPeak, mfu, peak_bf16_flops

    # 4.945e14 FLOPs in 1.25 s on a 989 TFLOP/s part: 3.956e14 FLOP/s, exactly 40%.
    assert mfu(4.945e14, 1.25, 989e12) == pytest.approx(0.4, rel=1e-12)
    assert mfu(1e12, 0.5, 312e12) == pytest.approx(2e12 / 312e12)
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA H100 PCIe", override=756e12) == 756e12
    for unknown in ("NVIDIA H100 PCIe", "NVIDIA GeForce RTX 4090"):
        with pytest.raises(UnknownPeak, match="--peak"):
            peak_bf16_flops(unknown)
    with pytest.raises(ValueError):
        mfu(1e12, 0.0, 989e12)


def test_compile_bench_sizes_are_make_trains_model():
    from omegaconf import OmegaConf

    from vtc.bench.compile import SIZES

    enc = OmegaConf.load(CONF_DIR / "encoder" / "tiny.yaml")
    llm = OmegaConf.load(CONF_DIR / "llm" / "tiny.yaml").config
    data = OmegaConf.load(CONF_DIR / "data" / "synthetic.yaml")
    assert (SIZES.image_size, SIZES.patch_size) == (enc.image_size, enc.config.patch_size)
    assert (SIZES.vision_width, SIZES.vision_layers, SIZES.vision_mlp) == (
        enc.config.hidden_size, enc.config.num_hidden_layers, enc.config.intermediate_size)
    assert (SIZES.llm_width, SIZES.llm_layers, SIZES.llm_heads, SIZES.llm_ffn) == (
        llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.intermediate_size)
    assert SIZES.batch == data.batch_size


@pytest.mark.slow
def test_compile_bench_quick(tmp_path):
    from vtc.bench import compile as bench

    res = bench.main(["--quick", "--threads", "1", "--out", str(tmp_path / "c")])
    assert res["eager_ms"] > 0 and res["compiled_ms"] > 0 and res["compile_s"] > 0
    assert math.isclose(res["ratio"], res["compiled_ms"] / res["eager_ms"])
    assert len(res["step_ms_all"]["eager"]) == len(res["step_ms_all"]["compiled"]) == 2
    # the same weights and batch: the first step's loss agrees up to rounding
    assert math.isclose(res["first_loss"]["eager"], res["first_loss"]["compiled"], rel_tol=1e-5)
    assert "vs eager" in (tmp_path / "c.md").read_text()
    assert json.loads((tmp_path / "c.json").read_text())["ratio"] == res["ratio"]
