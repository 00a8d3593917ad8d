"""The ``vtc`` command (vtc/cli/__init__.py): subcommand listing, each subcommand's own --help, unknown
subcommands, and ``vtc train`` running exactly what ``python train.py`` runs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vtc import cli

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).with_name("vtc")  # .venv/bin/vtc after `pip install -e .`
VTC = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "vtc"]

# subcommand -> text only that subcommand's own help prints
HELP_MARKERS = {
    "train": ["train is powered by Hydra", "task_name: train"],
    "eval": ["eval is powered by Hydra", "task_name: eval"],
    "flops": ["compressors=A,B"],
    "convert": ["--images"],
    "synthetic": ["--grid"],
    "synthetic-video": ["--frames", "--encoder-frames"],
    "export": ["--format"],
    "predict": ["--max-new-tokens", "--compressor"],
    "consolidate": ["one torch file"],
    "report": ["--experiment"],
    "study": ["Reproducible studies"],
    "parallel": ["--world N"],
    "error-analysis": ["split_dir"],
    "attention-analysis": ["--lift"],
    "bench compressors": ["usage: vtc bench compressors", "--vision-width"],
    "bench curriculum": ["usage: vtc bench curriculum", "--schedule"],
    "bench loader": ["--shuffle-buffer"],
    "bench memory": ["--train-encoder"],
    "bench inference_memory": ["--trained", "--ablation"],
    "bench video": ["usage: vtc bench video", "--skip-loader"],
    "bench compile": ["usage: vtc bench compile", "torch.compile"],
    "bench gpu_step": ["--text-tokens"],
    "bench": ["usage: vtc bench BENCHMARK", "gpu_step"],
}


def vtc(*args: str, cmd: list[str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*(cmd or VTC), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    r = vtc("--help")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ")]
    assert listed == [*cli.SCRIPTS, *cli.MODULES, "bench"]
    for bench in cli.BENCHES:
        assert bench in r.stdout
    # the same from `python -m vtc`, and the table covers every subcommand the markers test
    assert vtc("--help", cmd=[sys.executable, "-m", "vtc"]).stdout == r.stdout
    assert {s.split()[-1] if s.startswith("bench ") else s for s in HELP_MARKERS} - {"bench"} \
        == {*cli.SCRIPTS, *cli.MODULES, *cli.BENCHES}


def test_help_imports_nothing_heavy():
    code = ("import sys, contextlib, io\nfrom vtc import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit): cli.main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'hydra', 'omegaconf', 'lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("sub", list(HELP_MARKERS))
def test_subcommand_help(sub):
    r = vtc(*sub.split(), "--help")
    assert r.returncode == 0, r.stderr
    for marker in HELP_MARKERS[sub]:
        assert marker in r.stdout, (sub, marker, r.stdout[:2000])


@pytest.mark.parametrize("args", [["nope"], ["bench", "nope"], []])
def test_unknown_subcommand_exits_2_with_the_list(args):
    r = vtc(*args)
    assert r.returncode == 2
    listing = cli.BENCHES if args[:1] == ["bench"] else cli.MODULES
    assert all(name in r.stderr for name in listing)
    if args:
        assert repr(args[-1]) in r.stderr


def test_train_refuses_like_train_py(tmp_path):
    """`vtc train` is train.py's Hydra app: the same refusal, the same exit status, nothing built."""
    results = []
    for i, cmd in enumerate([VTC + ["train"], [sys.executable, "train.py"]]):
        data_dir = tmp_path / f"data{i}"
        r = vtc("compressor=pool", "compressor.stride=5", f"paths.data_dir={data_dir}",
                f"paths.log_dir={tmp_path / f'logs{i}'}", f"hydra.run.dir={tmp_path / f'run{i}'}", cmd=cmd)
        assert r.returncode == 2, r.stderr
        assert "compressor.stride: 5 does not divide the 8x8 patch grid" in r.stderr
        assert not data_dir.exists()
        results.append(r.stderr.strip().splitlines()[-2:])
    assert results[0] == results[1]


def test_train_passes_overrides_to_hydra():
    args = ["--cfg", "job", "compressor=pool", "compressor.stride=4"]
    r, ref = vtc("train", *args), vtc(*args, cmd=[sys.executable, "train.py"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref.stdout and "stride: 4" in r.stdout
