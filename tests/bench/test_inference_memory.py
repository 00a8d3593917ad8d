"""``vtc.bench.inference_memory``: peak memory and time of answering, per compressor, side by side."""
from __future__ import annotations

import pytest
import torch

import vtc
from vtc.bench import common as C
from vtc.bench import inference_memory as IM
from vtc.errors import ConfigError

slow = pytest.mark.slow
GRID = 64  # the tiny world's 8x8 patch grid


def test_allocator_peak_counts_what_coexists_above_the_start():
    """The CPU measure against a hand count: 1 MiB freed before 2 MiB is taken peaks at 2 MiB, 1 MiB
    and 2 MiB alive together at 3 MiB; a tensor alive before the call is baseline."""
    mib = 2**20
    before = torch.empty(4 * mib, dtype=torch.uint8)

    def apart():
        a = torch.empty(mib, dtype=torch.uint8)
        del a
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del b

    def together():
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        del a, b

    assert C.allocator_peak_bytes(apart) == 2 * mib
    assert C.allocator_peak_bytes(together) == 3 * mib
    del before


@slow
def test_arms_answer_as_predict_does_and_fewer_tokens_peak_lower(tiny_ckpt):
    res = IM.run(str(tiny_ckpt), ablations=["pool_16"], trained=[("again", str(tiny_ckpt))], batch=4, repeats=1,
                 log=lambda m: None)
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["model", "pool_16", "again"]
    # The same checkpoint as its own arm answers the same: the arms are measured on the same questions.
    assert rows["again"]["answers"] == rows["model"]["answers"]
    assert rows["model"]["visual_tokens"] == GRID and rows["pool_16"]["visual_tokens"] == GRID // 4
    # What vtc.load(...).generate answers with the ablation's compressor (pool, stride 2).
    images, prompts = IM.questions(vtc.load(tiny_ckpt, device="cpu"), 4)
    theirs = vtc.load(tiny_ckpt, device="cpu").generate(images, prompts, compressor={"name": "pool", "stride": 2})
    assert rows["pool_16"]["answers"] == [a.text for a in theirs]
    # A quarter of the visual tokens: a smaller prefill and KV cache, so a lower peak over the same encoder.
    assert 0 < rows["pool_16"]["peak_bytes"] < rows["model"]["peak_bytes"]
    assert rows["model"]["peak_ratio"] == 1 and rows["pool_16"]["peak_ratio"] < 1
    assert all(len(r["ms_all"]) == 1 and r["ms"] > 0 for r in res["rows"])
    md = IM.to_markdown(res)
    assert "| pool_16 | 16 |" in md and "peak (MB)" in md


def test_unknown_ablation_and_bad_trained_flag_are_refused(capsys):
    with pytest.raises(ConfigError, match="ablation.*'pool_3' is not a conf/ablation option"):
        IM.ablation_compressor("pool_3")
    with pytest.raises(SystemExit) as e:
        IM.main(["--ckpt", "last.ckpt", "--trained", "no_label_here"])
    assert e.value.code == 2 and "LABEL=CKPT" in capsys.readouterr().err
