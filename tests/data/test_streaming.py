"""Streaming real data at scale (issues 5 and 9, data side): equal batches on every rank from
uneven shards, modality/length grouping, decode failures skipped and counted by reason with a
stop past a fraction, truncated tars, and shards with planted pickles that are never unpickled.

Shards are written here with plain ``tarfile`` from the session's tiny synthetic set (the one the
e2e tests use: ``<workspace>/data/synthetic-s0-112px-g3-n192``, whose ``tokenizer/`` covers the
texts)."""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from filelock import FileLock

from tests.conftest import ROOT, TINY
from vtc.data import skips, streams

# The synthetic set of tests/conftest.py TINY (vtc.synthetic.prepare.ensure_data makes the same call).
SYNTH = dict(seed=0, n_train=192, n_val=32, n_test=32, image_size=112, grid=3)
UNEVEN = (7, 30, 3, 50, 12)  # 102 samples


@pytest.fixture(scope="session")
def synth(workspace) -> Path:
    from vtc.synthetic.shards import ensure_synthetic

    root = workspace.root / "data" / "synthetic-s{seed}-{image_size}px-g{grid}-n{n_train}".format(**SYNTH)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        ensure_synthetic(root, **SYNTH)
    return root


@pytest.fixture(scope="session")
def source(synth) -> list[tuple[bytes, dict]]:
    """(jpeg bytes, LLaVA record) of every synthetic training sample, in order."""
    with tarfile.open(synth / "train" / "train-00000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({n.split(".")[0] for n in members})
    return [(members[f"{k}.jpg"], json.loads(members[f"{k}.json"])) for k in keys]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A shard with plain ``tarfile``, members in the order given."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, jpg: bytes | None, record: dict | bytes | None) -> list[tuple[str, bytes]]:
    out = [(f"{key}.jpg", jpg)] if jpg is not None else []
    if record is not None:
        out.append((f"{key}.json", record if isinstance(record, bytes) else json.dumps(record).encode()))
    return out


def uneven_shards(folder: Path, source, sizes=UNEVEN, prefix="u") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for s, n in enumerate(sizes):
        members = []
        for i in range(n):
            jpg, rec = source[k]
            k += 1
            members += sample(f"{prefix}{s}_{i:03d}", jpg, rec)
        write_tar(folder / f"{prefix}-{s:03d}.tar", members)
    return str(folder / f"{prefix}-{{000..{len(sizes) - 1:03d}}}.tar")


def datamodule(synth, **kw):
    from vtc.data.datamodule import VTCDataModule

    kw = {"tokenizer_path": str(synth / "tokenizer"), "image_size": 28, "batch_size": 4, "shuffle_buffer": 16,
          "max_length": 256, **kw}
    dm = VTCDataModule(**kw)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- equal batches


@pytest.mark.dist
def test_two_ranks_two_workers_get_equal_batches_from_uneven_shards(synth, source, tmp_path):
    """2 gloo ranks x 2 DataLoader workers, shards of 7/30/3/50/12 samples, two epochs: every rank
    runs exactly len() = 102 // (4 * 2) = 12 batches per epoch in lock-step (no step where one rank
    has a batch and the other has none, which is what kills DDP at an epoch's end); the same seed
    gives the same ids per rank and epoch; ranks, epochs and seeds differ."""
    pattern = uneven_shards(tmp_path / "shards", source)
    out = tmp_path / "ranks.json"
    subprocess.run([sys.executable, "-m", "tests.streaming_ranks", str(out), pattern, str(synth / "tokenizer"),
                    "--world", "2", "--workers", "2", "--batch-size", "4"],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    ids = {f"u{s}_{i:03d}" for s, n in enumerate(UNEVEN) for i in range(n)}
    for r in ranks:
        for run in ("a", "b", "c"):
            for epoch in r[run]:
                assert epoch["len"] == epoch["batches"] == epoch["steps"] == 102 // 8 == 12
                assert epoch["broken_steps"] == 0
                assert all(len(b) == 4 and set(b) <= ids for b in epoch["ids"])
            assert r[run + "_counts"]["skipped"] == 0
        assert [e["ids"] for e in r["a"]] == [e["ids"] for e in r["b"]]  # same seed, same stream
        assert r["a"][0]["ids"] != r["a"][1]["ids"]  # epochs draw anew
        assert r["c"][0]["ids"] != r["a"][0]["ids"]  # another seed, another stream
    for epoch in range(2):
        assert ranks[0]["a"][epoch]["ids"] != ranks[1]["a"][epoch]["ids"]  # ranks do not mirror each other


def test_shards_are_drawn_in_proportion_to_their_samples():
    """Uneven shards: a shard's draw probability is proportional to its sample count (index.json /
    scan), so each sample is equally likely; without counts every shard is equally likely."""
    urls = [f"s{i}" for i in range(len(UNEVEN))]
    stream = iter(streams.ResampledShards(urls, seed=0, weights=UNEVEN))
    drawn = Counter(next(stream)["url"] for _ in range(20000))
    for url, n in zip(urls, UNEVEN):
        assert abs(drawn[url] / 20000 - n / sum(UNEVEN)) < 0.015
    stream = iter(streams.ResampledShards(urls, seed=0))
    drawn = Counter(next(stream)["url"] for _ in range(20000))
    assert all(abs(drawn[u] / 20000 - 0.2) < 0.015 for u in urls)


def test_llava_config_reads_plain_tar_shards_as_stock_webdataset_does(synth, source, tmp_path):
    """Shards written with plain tarfile (no index.json), named with brace notation in
    ``data=llava``: the composed config's datamodule sees the samples stock webdataset sees, its
    epoch is the scanned total // batch, and its validation pass yields each sample once, in order."""
    from hydra import compose, initialize_config_dir

    from vtc.config import CONF_DIR
    from vtc.assembly.build import build_datamodule

    pattern = uneven_shards(tmp_path / "plain", source, sizes=(5, 11, 2))
    stock = [s["__key__"] for s in wds.WebDataset(pattern, shardshuffle=False)]
    assert len(stock) == 18 and all(set(s) >= {"jpg", "json"} for s in wds.WebDataset(pattern, shardshuffle=False))
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=llava", f"data.train_shards='{pattern}'", f"data.val_shards='{pattern}'",
            f"llm.tokenizer_path={synth / 'tokenizer'}", "data.batch_size=4", "data.eval_batch_size=5",
            "data.num_workers=0", "data.shuffle_buffer=8"])
    dm = build_datamodule(cfg)
    dm.setup("fit")
    train = dm.train_dataloader()
    batches = list(train)
    assert len(train) == len(batches) == 18 // 4
    assert {i for b in batches for i in b["ids"]} <= set(stock)
    assert all(b["pixel_values"].shape == (4, 3, 112, 112) for b in batches)
    val = list(dm.val_dataloader())
    assert [i for b in val for i in b["ids"]] == stock and [len(b["ids"]) for b in val] == [5, 5, 5, 3]
    assert dm.skipped == 0


# ----------------------------------------------------------------------------- grouping


def _fake(i: int, image: bool, length: int) -> dict:
    return {"id": f"{'i' if image else 't'}{i}", "input_ids": [0] * length,
            "pixel_values": torch.zeros(1) if image else None}


def test_group_by_modality_length_rule():
    """The exact rule against an independent reference: per modality, consecutive windows of W
    samples (W = group_window rounded up to a multiple of the batch size), each sorted by length
    (ties: arrival order) and cut into batches; the batches of a window come out in a seeded order;
    a finite stream's leftovers are cut the same way, dropping a partial last batch."""
    import random

    rng = random.Random(0)
    stream = [_fake(i, rng.random() < 0.7, rng.randrange(5, 80)) for i in range(203)]
    stage = streams.GroupByModalityLength(batch_size=4, window=10, seed=0)  # window rounds up to 12
    assert stage.window == 12
    got = [[s["id"] for s in b] for b in stage.run(iter(stream))]

    expected = []
    for image in (True, False):
        pool = [(len(s["input_ids"]), k, s["id"]) for k, s in enumerate(stream) if (s["pixel_values"] is not None) == image]
        for w in range(0, len(pool), 12):
            window = sorted(pool[w:w + 12])
            expected += [[x[2] for x in window[b:b + 4]] for b in range(0, len(window), 4) if b + 4 <= len(window)]
    assert sorted(got) == sorted(expected)
    assert all(len(b) == 4 and len({x[0] for x in b}) == 1 for b in got)  # one modality each
    assert got != [b for b in expected]  # the emission order is shuffled, not sorted
    again = [[s["id"] for s in b] for b in streams.GroupByModalityLength(4, 10, seed=0).run(iter(stream))]
    assert again == got
    other = [[s["id"] for s in b] for b in streams.GroupByModalityLength(4, 10, seed=1).run(iter(stream))]
    assert sorted(other) == sorted(got) and other != got


def test_group_by_modality_length_in_the_datamodule(synth, source, tmp_path):
    """Mixed image and text-only samples of 1-6 rounds: grouped batches are single-modality, the
    epoch length is unchanged, and padding falls well below the ungrouped loader's."""
    members = []
    for i, (jpg, rec) in enumerate(source[:96]):
        plain = [{**t, "value": t["value"].replace("<image>\n", "")} for t in rec["conversations"]]
        conv = rec["conversations"] + plain * (i % 6)  # 1-6 rounds, <image> in the first only
        if i % 3 == 0:  # text only: no image, no placeholder
            members += sample(f"m{i:03d}", None, {"id": f"m{i:03d}", "conversations": plain * (1 + i % 6)})
        else:
            members += sample(f"m{i:03d}", jpg, {**rec, "conversations": conv})
    write_tar(tmp_path / "mixed-000.tar", members)

    def padding(group: bool) -> tuple[float, int]:
        dm = datamodule(synth, train_shards=str(tmp_path / "mixed-000.tar"), group_by_modality_length=group,
                        group_window=16, shuffle_buffer=32)
        loader = dm.train_dataloader()
        waste, n = 0.0, 0
        for _ in range(2):
            for b in loader:
                n += 1
                if group:
                    with_items = set(b["visual_items"][:, 0].tolist())
                    assert len(with_items) in (0, len(b["ids"]))  # one modality per batch
                waste += 1 - b["attention_mask"].float().mean().item()
        return waste / n, n

    grouped, n_grouped = padding(True)
    plain, n_plain = padding(False)
    assert n_grouped == n_plain == 2 * (96 // 4)
    assert grouped < 0.5 * plain, (grouped, plain)


# ----------------------------------------------------------------------------- failures


def test_decode_failures_are_skipped_and_counted_by_reason(synth, source, tmp_path):
    (jpg, rec), (jpg2, rec2) = source[0], source[1]
    question = rec["conversations"][0]["value"].replace("<image>\n", "")
    plain = [{**t, "value": t["value"].replace("<image>\n", "")} for t in rec["conversations"]]
    long_conv = rec["conversations"] + plain * 19  # 20 rounds: far beyond max_length, the image in round 1
    late_image = [{"from": "human", "value": (question + " ") * 30 + "<image>"}, rec["conversations"][1]]
    members = (
        sample("good", jpg, rec)
        + sample("noplaceholder", jpg2, {**rec2, "conversations": [
            {"from": "human", "value": question}, rec2["conversations"][1]]})  # fine: <image> is prepended
        + sample("badjpeg", b"\xff\xd8\xff\xe0 not a jpeg at all", rec)
        + sample("cutjpeg", jpg[: len(jpg) // 2], rec)
        + sample("notjson", jpg, b'{"conversations": [')
        + sample("notllava", jpg, {"id": "x", "question": "what?", "answer": "7"})
        + sample("badroles", jpg, {"conversations": rec["conversations"][::-1]})
        + sample("tokennoimage", None, {"conversations": rec["conversations"]})
        + sample("namesimage", None, {"image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": question}, rec["conversations"][1]]})
        + sample("imageonly", jpg, None)
        + sample("long", jpg, {"conversations": long_conv})
        + sample("lateimage", jpg, {"conversations": late_image})
    )
    write_tar(tmp_path / "bad-000.tar", members)

    def read(overlong):
        dm = datamodule(synth, val_shards=str(tmp_path / "bad-000.tar"), eval_batch_size=64, max_length=128,
                        overlong=overlong)
        (batch,) = list(dm.val_dataloader())
        return batch, dm.split_counts("val")

    batch, counts = read("truncate")
    assert batch["ids"] == ["good", "noplaceholder", "long"]
    assert ((batch["input_ids"] == 4).sum(1) == 1).all()  # one <image> each, also where it was prepended
    assert batch["attention_mask"][2].sum() == 128  # truncated to max_length, kept
    expect = {"image": 2, "json": 1, "record": 2, "image_token_without_image": 1, "missing_image": 1,
              "no_text": 1, "overlong": 1}
    assert {k[8:]: v for k, v in counts.items() if k.startswith("skipped_") and v} == expect
    assert counts["skipped"] == 9 and counts["seen"] == 12 and counts["truncated"] == 1

    batch, counts = read("skip")
    assert batch["ids"] == ["good", "noplaceholder"]
    assert counts["skipped_overlong"] == 2 and counts["truncated"] == 0 and counts["skipped"] == 10

    # training also drops samples whose answers were all cut away
    dm = datamodule(synth, train_shards=str(tmp_path / "bad-000.tar"), max_length=70)
    dec = dm._decoder("train")
    cut = {"__key__": "cut", "jpg": jpg, "json": json.dumps({"conversations": [
        {"from": "human", "value": "<image>\n" + (question + " ") * 10}, rec["conversations"][1]]}).encode()}
    with pytest.raises(skips.SampleError) as e:
        dec(cut)
    assert e.value.reason == "no_supervision"


def _cut_tar(src: Path, dst: Path, member: str) -> None:
    """Copy ``src`` cut in the middle of ``member``'s data (a download or copy that died)."""
    with tarfile.open(src) as tar:
        info = tar.getmember(member)
    dst.write_bytes(src.read_bytes()[: info.offset_data + info.size // 2])


def test_truncated_tar_is_counted_once_and_training_goes_on(synth, source, tmp_path):
    good = write_tar(tmp_path / "t-000.tar", [m for i in range(40) for m in sample(f"a{i:02d}", *source[i])])
    whole = write_tar(tmp_path / "whole.tar", [m for i in range(20) for m in sample(f"b{i:02d}", *source[40 + i])])
    _cut_tar(whole, tmp_path / "t-001.tar", "b12.jpg")
    pattern = str(tmp_path / "t-{000..001}.tar")

    dm = datamodule(synth, val_shards=pattern, eval_batch_size=100)
    ids = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert ids == [f"a{i:02d}" for i in range(40)] + [f"b{i:02d}" for i in range(12)]
    counts = dm.split_counts("val")
    assert counts["skipped_tar"] == 1 and counts["skipped"] == 1

    # training: the damaged shard is drawn again and again, each read counted; below the fraction
    dm = datamodule(synth, train_shards=pattern, num_workers=2, max_skip_fraction=0.1, skip_check_after=20)
    loader = dm.train_dataloader()
    assert len(loader) == (40 + 12) // 4  # the scan counts the samples before the damage
    assert [sum(len(b["ids"]) for b in loader) for _ in range(2)] == [52, 52]
    counts = dm.skip_counts
    assert counts["skipped_tar"] >= 1 and counts["skipped"] == counts["skipped_tar"]
    assert counts["skipped"] <= 0.1 * counts["seen"]


def test_skipped_fraction_above_the_limit_stops_with_reasons(synth, source, tmp_path):
    members = []
    for i in range(30):
        jpg, rec = source[i]
        if i % 3 == 0:
            members += sample(f"c{i:02d}", b"\xff\xd8 broken", rec)  # 1 in 3 is a corrupt image
        elif i % 10 == 1:
            members += sample(f"c{i:02d}", jpg, b"not json")
        else:
            members += sample(f"c{i:02d}", jpg, rec)
    write_tar(tmp_path / "f-000.tar", members)
    dm = datamodule(synth, train_shards=str(tmp_path / "f-000.tar"), num_workers=1, max_skip_fraction=0.2,
                    skip_check_after=30)
    with pytest.raises(skips.DataSkipError) as e:
        for _ in range(20):
            for _ in dm.train_dataloader():
                pass
    msg = str(e.value)
    assert "above data.max_skip_fraction=0.2" in msg and "train samples seen were skipped" in msg
    assert "top reasons: image" in msg and "json" in msg and "other" not in msg
    # under the limit nothing stops (0.6 > 13/30 skipped)
    dm = datamodule(synth, train_shards=str(tmp_path / "f-000.tar"), max_skip_fraction=0.6, skip_check_after=30)
    assert sum(1 for _ in dm.train_dataloader()) == 30 // 4
    assert dm.skip_counts["skipped_image"] > 0 and dm.skip_counts["skipped_json"] > 0


# ----------------------------------------------------------------------------- pickles


class _Plant:
    """Unpickling this object creates ``path`` (pickle calls ``open(path, "w")``)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_shards(folder: Path, source, marker: Path, n: int = 24, start: int = 0, bad: int = 0) -> str:
    """Two shards of ``n`` good samples each, also carrying .pyd / .pickle / .pth members whose
    unpickling writes ``marker``, as extra members of good samples and as samples of their own;
    plus ``bad`` undecodable samples per shard (a corrupt JPEG, then a non-LLaVA JSON, ...)."""
    payload = pickle.dumps(_Plant(marker))
    buf = io.BytesIO()
    torch.save(_Plant(marker), buf)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        members = []
        for i in range(n):
            key = f"p{s}_{i:03d}"
            members += sample(key, *source[start + s * n + i])
            if i % 4 == 0:
                members += [(f"{key}.pyd", payload), (f"{key}.pickle", payload), (f"{key}.pth", buf.getvalue())]
        for i in range(bad):
            jpg, rec = source[start + i]
            members += sample(f"x{s}_bad{i}", *((b"\xff\xd8 broken", rec) if i % 2 == 0 else (jpg, {"text": "?"})))
        members += [(f"evil{s}.pyd", payload), (f"evil{s}.pickle", payload), (f"evil{s}.pth", buf.getvalue())]
        write_tar(folder / f"p-{s:03d}.tar", members)
    return str(folder / "p-{000..001}.tar")


def test_planted_pickles_are_never_unpickled_by_the_datamodule(synth, source, tmp_path):
    marker = tmp_path / "pwned"
    pattern = planted_shards(tmp_path / "shards", source, marker)
    # the plant is live: webdataset's default decoders would have run it
    control = tmp_path / "control"
    planted_shards(tmp_path / "control_shards", source, control)
    for _ in wds.WebDataset(str(tmp_path / "control_shards" / "p-000.tar"), shardshuffle=False).decode(
            handler=wds.ignore_and_continue):
        pass
    assert control.exists()

    dm = datamodule(synth, train_shards=pattern, val_shards=pattern, test_shards=pattern, num_workers=1)
    assert dm._resolve("train")[2] == 48  # the pickle-only samples are not counted either
    assert sum(len(b["ids"]) for b in dm.train_dataloader()) == 48
    assert len([i for b in dm.val_dataloader() for i in b["ids"]]) == 48
    assert len([i for b in dm.test_dataloader() for i in b["ids"]]) == 48
    assert dm.skipped == 0
    assert not marker.exists()


@pytest.mark.slow
def test_train_py_on_llava_shards_with_pickles_and_bad_samples(workspace, synth, source, tmp_path):
    """``python train.py data=llava`` over shards with planted pickles and some undecodable
    samples: the run finishes, the marker file is never written, and MLflow holds the skip counts
    by reason (data/skipped, data/skipped_image, data/skipped_record)."""
    marker = tmp_path / "pwned"
    train = planted_shards(tmp_path / "train", source, marker, n=40, bad=2)  # 4 bad of 84 < max_skip_fraction
    evals = planted_shards(tmp_path / "eval", source, marker, n=8, start=120)
    drop = ("data.generate.", "encoder.pretrain.", "data.num_workers", "trainer.", "callbacks.")
    overrides = [o for o in TINY if not o.startswith(drop)] + [
        "data=llava", f"data.train_shards='{train}'", f"data.val_shards='{evals}'", f"data.test_shards='{evals}'",
        f"llm.tokenizer_path={synth / 'tokenizer'}", "data.num_workers=1", "data.shuffle_buffer=32",
        "encoder.pretrain=null", "encoder.path=null",  # a random-init tiny tower: no pre-training stage
        "trainer.max_steps=6", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1",
        "callbacks.model_checkpoint.every_n_train_steps=6", "seed=11", f"hydra.run.dir={tmp_path / 'run'}"]
    workspace.run("train.py", *overrides, tiny=False)
    assert not marker.exists()
    runs = [r for r in workspace.runs() if r.data.params.get("seed") == "11"]
    assert len(runs) == 1
    m = runs[0].data.metrics
    assert m["data/seen"] >= 48 and 1 <= m["data/skipped"] <= 0.1 * m["data/seen"]
    assert m["data/skipped"] == m.get("data/skipped_image", 0) + m.get("data/skipped_record", 0)
    assert "test/acc" in m
