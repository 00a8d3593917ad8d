"""Scale-out proofs on CPU: FSDP2 and DDP on 2 gloo processes (torchrun) train the tiny LMM to the
same losses as one process over the same global batches, save, and resume to the same losses;
a sharded checkpoint consolidates to the single-process layout; the LLaVA-1.5-7B FSDP2 plan's
parameters per rank for 8 ranks, checked against fully_shard itself on a fake process group.

The training runs are tests/dist_train.py (the real conf/trainer/{cpu,ddp,fsdp2}.yaml, moved to
CPU / 32-bit). Tolerance on losses: LOSS_TOL absolute; measured differences are ~3e-7 (reduction
order in the gradient all-reduce / reduce-scatter), printed with -s.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vtc.distributed.checkpoints import is_sharded_checkpoint
from vtc.distributed.fsdp2 import per_rank_table

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "dist_train.py"
STEPS, STOP = 6, 3  # 6 steps planned; the first runs stop (and checkpoint) after 3, at an epoch end
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4  # after 6 AdamW steps (lr 3e-3); measured ~4e-6


def torchrun(*args: str, timeout: int = 240) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--steps", str(STEPS), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def losses(*dirs: Path) -> dict[int, float]:
    out = {}
    for d in dirs:
        out.update({int(k): v for k, v in json.loads((d / "losses.json").read_text()).items()})
    return out


def compare(name: str, got: dict[int, float], ref: dict[int, float]) -> float:
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1)), (got, ref)
    diff = max(abs(got[k] - ref[k]) for k in ref)
    print(f"\n{name}: step losses {[round(got[k], 6) for k in sorted(got)]}, single process "
          f"{[round(ref[k], 6) for k in sorted(ref)]}, max |diff| {diff:.2e} (tolerance {LOSS_TOL:g})")
    assert diff < LOSS_TOL
    return diff


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process, the same global batches, 6 steps straight (in this process: no launch cost)."""
    from tests import dist_train

    out = tmp_path_factory.mktemp("ref")
    dist_train.main(["--trainer", "cpu", "--out", str(out), "--steps", str(STEPS)])
    return out


def test_fsdp2_two_processes_match_one_and_resume_from_a_sharded_checkpoint(reference, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    torchrun("--trainer", "fsdp2", "--out", str(a), "--stop-at", str(STOP))
    ckpt = a / "ckpt" / "last.ckpt"
    assert is_sharded_checkpoint(ckpt), "fsdp2 must write a sharded folder"
    assert len(list(ckpt.glob("*.distcp"))) == 2 and (ckpt / "meta.pt").is_file()
    # Fresh processes, a fresh model: everything comes back from the shards.
    torchrun("--trainer", "fsdp2", "--out", str(b), "--resume", str(ckpt))
    compare("fsdp2 (2 gloo processes, resumed at step 3)", losses(a, b), losses(reference))

    # What each rank held is what vtc.distributed.fsdp2's arithmetic says.
    from tests.tiny import tiny_lmm

    table = {r.name: r.held for r in per_rank_table(tiny_lmm(seed=0), 2)}
    for rank in (0, 1):
        held = json.loads((a / f"shards_rank{rank}.json").read_text())
        assert held == {name: h[rank] for name, h in table.items()}

    # Consolidated: the single-process checkpoint's layout and (nearly) its values.
    from vtc.distributed.consolidate import consolidate

    out = tmp_path / "consolidated.ckpt"
    consolidate(str(b / "ckpt" / "last.ckpt"), str(out))
    got = torch.load(out, map_location="cpu", weights_only=True)
    ref = torch.load(reference / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert sorted(got) == sorted(ref)
    assert "vtc" in got and got["global_step"] == ref["global_step"] == STEPS
    assert {k: v.shape for k, v in got["state_dict"].items()} == {k: v.shape for k, v in ref["state_dict"].items()}
    wdiff = max((got["state_dict"][k] - ref["state_dict"][k]).abs().max().item() for k in ref["state_dict"])
    g_opt, r_opt = got["optimizer_states"][0], ref["optimizer_states"][0]
    assert g_opt["param_groups"] == r_opt["param_groups"]
    assert {i: sorted(s) for i, s in g_opt["state"].items()} == {i: sorted(s) for i, s in r_opt["state"].items()}
    odiff = max((g_opt["state"][i][k].float() - r_opt["state"][i][k].float()).abs().max().item()
                for i in r_opt["state"] for k in r_opt["state"][i])
    print(f"consolidated vs single process after {STEPS} steps: max |weight diff| {wdiff:.1e}, "
          f"max |Adam state diff| {odiff:.1e}")
    assert wdiff < WEIGHT_TOL and odiff < WEIGHT_TOL

    # eval.py's loader accepts it and every weight lands in a fresh module.
    from vtc.assembly.checkpoint import load_checkpoint
    from vtc.train.module import LMMModule

    ckpt_dict = load_checkpoint(str(out))
    missing, unexpected = LMMModule(tiny_lmm(seed=1)).load_state_dict(ckpt_dict["state_dict"], strict=False)
    assert not missing and not unexpected


def test_ddp_two_processes_match_one_and_resume(reference, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    # Stop at step 3, then (same processes) a fresh model, optimizer and Trainer resume from last.ckpt.
    torchrun("--trainer", "ddp", "--out", str(a), "--stop-at", str(STOP), "--then-resume", str(b))
    assert (a / "ckpt" / "last.ckpt").is_file()
    compare("ddp (2 gloo processes, resumed at step 3)", losses(a, b), losses(reference))


LLAVA_7B = ["encoder=clip_l14_336", "llm=vicuna_7b", "projector=mlp2x_gelu"]


def test_llava_7b_fsdp2_parameters_per_rank_on_8_ranks():
    """CLIP-L/14-336 + Vicuna-7B + mlp2x_gelu on the meta device: the plan's units sharded over 8
    ranks (per parameter, dim 0, torch.chunk; see vtc.distributed.fsdp2). The table in
    experiments/launch/README.md is this output."""
    from vtc.assembly.build import meta_lmm
    from vtc.distributed.fsdp2 import format_rank_table, mixed_requires_grad_units

    lmm = meta_lmm(LLAVA_7B)
    total = sum(p.numel() for p in lmm.parameters())
    assert total == 7_062_902_784  # CLIP vision 303.5M + Vicuna-7B 6.738B + projector 21.0M
    rows = per_rank_table(lmm, 8)
    held = [sum(r.held[k] for r in rows) for k in range(8)]
    padded = [sum(r.padded[k] for r in rows) for k in range(8)]
    assert sum(held) == total
    assert len(set(padded)) == 1 and all(h <= p for h, p in zip(held, padded))
    assert held[0] == padded[0] == 882_863_744  # rank 0 always holds full chunks
    assert mixed_requires_grad_units(lmm) == []
    table = format_rank_table(rows, 8)
    print("\n" + table)
    readme = (ROOT / "experiments" / "launch" / "README.md").read_text()
    assert table in readme, "experiments/launch/README.md: regenerate the table with python -m vtc.cli.parallel"

    # The arithmetic against fully_shard itself, on a fake process group (no processes), ranks 0 and 7.
    try:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:  # pragma: no cover - torch without its testing helpers
        pytest.skip("torch's fake process group is not available")
    from vtc.distributed.fsdp2 import apply_fsdp2, fsdp2_units, unit_params

    for rank in (0, 7):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
        try:
            model = meta_lmm(LLAVA_7B)
            apply_fsdp2(model, init_device_mesh("cpu", (8,)))
            real = {n: sum(p.to_local().numel() for _, p in ps) for n, ps in unit_params(model)}
            assert real == {r.name: r.held[rank] for r in rows}
            alloc = {}
            for name, mod in fsdp2_units(model):
                group = mod._get_fsdp_state()._fsdp_param_group
                alloc[name] = sum(fp.padded_sharded_param_size.numel() for fp in group.fsdp_params) if group else 0
            assert alloc == {r.name: r.padded[rank] for r in rows}
        finally:
            dist.destroy_process_group()
