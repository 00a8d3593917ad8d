"""`python -m vtc.cli.flops` on the real LLaVA-1.5-7B config, built on the meta device."""
from vtc.cli.flops import main


def test_llava_7b_table_has_the_papers_ratios(capsys):
    table = main(["encoder=clip_l14_336", "llm=vicuna_7b", "compressors=none,pool,fastv,vcc"])
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    # columns: compressor visual_in equiv vision(2) projector(2) llm(2) total(2) llm_vs_first total_vs_first
    assert rows["none"][1] == "576" and rows["pool"][1] == "144"
    assert abs(float(rows["fastv"][-2]) - 0.57) < 0.01  # FastV K=2 R=50%: ~57% of the LLM FLOPs
    assert float(rows["vcc"][2]) == 103.5  # K=2, S=8: CR = 576 / 103.5 = 5.57 (LLaVolta: 557%)
    assert abs(576 / float(rows["vcc"][2]) - 5.565) < 0.001
