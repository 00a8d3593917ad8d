"""The converter killed by SIGKILL (mid-shard, and from outside with its worker pool) resumes to
the same bytes as an uninterrupted run; its throughput benchmark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from tests.data.test_convert import _conv, _files, _shard_urls
from vtc.data import convert as C
from vtc.data import convert_bench


def _big_dataset(root: Path, n: int) -> Path:
    img = root / "img"
    img.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(img / f"{k}.png")
    recs = [{"id": f"s{i}", "image": f"{i % 4}.png", "conversations": _conv("<image>\nq")}
            if i % 7 else {"id": f"s{i}", "image": "missing.png", "conversations": _conv("q")}
            for i in range(n)]
    (root / "big.json").write_text(json.dumps(recs))
    return root / "big.json"


def _cli(json_path, images, out, *extra):
    return [sys.executable, "-m", "vtc.data.convert", "--json", str(json_path), "--images",
            str(images), "--out", str(out), "--shard-size", "5", "--prefix", "big", "--quiet",
            *extra]


_KILL_MID_SHARD = """
import os, signal, sys
import vtc.data.convert as c
import vtc.data.convert_shards as s
real, calls = s.write_tar, [0]
def write_tar(path, members):
    calls[0] += 1
    if calls[0] == 4:  # the 4th shard: write half of it, then die like a SIGKILL would
        with open(path, "wb") as f:
            f.write(b"x" * 700)
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, members)
s.write_tar = write_tar
sys.exit(c.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    json_path = _big_dataset(root, 400)
    ref = root / "ref"
    index = C.convert(json_path, root / "img", ref, shard_size=5, prefix="big", progress=False,
                      summary=False)
    assert index["total"] == 400 - len(range(0, 400, 7))
    return {"root": root, "json": json_path, "images": root / "img", "ref": ref, "index": index}


def test_resume_after_sigkill_mid_shard(big, tmp_path):
    out = tmp_path / "out"
    args = _cli(big["json"], big["images"], out)[3:]
    proc = subprocess.run([sys.executable, "-c", _KILL_MID_SHARD, *args], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in out.iterdir())
    assert names == ["big-000000.tar", "big-000000.tar.done.json", "big-000001.tar",
                     "big-000001.tar.done.json", "big-000002.tar", "big-000002.tar.done.json",
                     "big-000003.tar.tmp"]  # no partial shard under a final name, no index
    subprocess.run(_cli(big["json"], big["images"], out), check=True, capture_output=True)
    assert _files(out) == _files(big["ref"])


def test_resume_after_external_sigkill_with_workers(big, tmp_path):
    out = tmp_path / "out"
    ref = _files(big["ref"])
    proc = subprocess.Popen(_cli(big["json"], big["images"], out, "--workers", "2"),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("*.done.json"))) >= 3:
                break
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its pool workers, as a scheduler would
        proc.wait()
    if (out / "index.json").exists():
        pytest.skip("the conversion finished before it could be killed")
    # every file under a final shard name is a complete shard, byte-identical to the reference
    finals = [p for p in out.glob("big-*.tar")]
    assert finals and len(finals) < len(big["index"]["shards"])
    for p in finals:
        assert p.read_bytes() == ref[p.name], p.name
    subprocess.run(_cli(big["json"], big["images"], out, "--workers", "2"), check=True,
                   capture_output=True)
    assert _files(out) == ref
    keys = [s["__key__"] for s in wds.WebDataset(_shard_urls(out, big["index"]),
                                                 shardshuffle=False)]
    assert len(keys) == len(set(keys)) == big["index"]["total"]


def test_benchmark_convert_reports_throughput(tmp_path):
    rate = convert_bench.benchmark_convert(8, 1, image_size=(64, 48), tmp_dir=str(tmp_path))
    assert rate > 0
    assert list(tmp_path.iterdir()) == []  # cleans up after itself
