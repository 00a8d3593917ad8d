"""LLaVA JSON -> webdataset converter: content, layout, determinism, resumption."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vtc.data import convert as C
from vtc.data import convert_images, convert_shards
from vtc.data import convert_records as R

MAX_SIDE = 64
SHARD_SIZE = 4


def _conv(first: str, *rest: str) -> list[dict]:
    turns = [{"from": "human", "value": first}, {"from": "gpt", "value": "answer 0"}]
    for i, text in enumerate(rest, 1):
        turns += [{"from": "human", "value": text}, {"from": "gpt", "value": f"answer {i}"}]
    return turns


def _halves(mode, size, left, right):
    im = Image.new(mode, size, left)
    im.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return im


def _save(im: Image.Image, path: Path, **kw) -> None:
    im.save(path, **kw)


def make_dataset(root: Path):
    """A LLaVA JSON with every rough edge. Returns (json path, image dir, cases).

    Each case is (record, expect) with expect = {"reason": skip reason or None,
    "size": expected (w, h) of the stored JPEG at MAX_SIDE or None for no image,
    "pixels": [((x, y), (r, g, b)), ...] approximate colours to check}.
    """
    img = root / "images"
    (img / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)

    _save(Image.new("RGB", (64, 48), (30, 120, 200)), img / "rgb.jpg", quality=95)
    _save(Image.new("L", (40, 30), 77), img / "gray.png")
    pal = _halves("P", (32, 32), 0, 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    _save(pal, img / "sub" / "pal.png", transparency=0)
    _save(_halves("RGBA", (32, 32), (0, 0, 0, 0), (0, 0, 255, 255)), img / "rgba.png")
    _save(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), img / "cmyk.jpg", quality=95)
    i16 = Image.fromarray(np.where(np.arange(32)[None, :] < 16, 65535, 32768)
                          .repeat(32, 0).astype(np.uint16))
    assert i16.mode == "I;16"
    _save(i16, img / "i16.png")
    _save(_halves("LA", (32, 32), (0, 0), (200, 255)), img / "la.png")
    (img / "corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    _save(Image.new("RGB", (300, 120), (0, 200, 0)), img / "big.png")
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", quality=90)
    (img / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    _save(Image.fromarray(np.where(np.arange(32)[None, :] < 16, 0, 200)
                          .repeat(32, 0).astype(np.int32)), img / "int32.tif")
    _save(Image.fromarray(np.where(np.arange(32)[None, :] < 16, 0.0, 0.5)
                          .repeat(32, 0).astype(np.float32)), img / "float.tif")
    _save(Image.new("RGB", (20, 10), (250, 250, 0)), img / "tiny.png")
    pal.save(img / "plain.gif")  # the same palette image, no transparency this time
    _save(Image.new("1", (16, 16), 1), img / "bilevel.png")

    white, ok = (255, 255, 255), None
    cases = [
        ({"id": "rgb", "image": "rgb.jpg", "conversations": _conv("<image>\nWhat colour?")},
         {"reason": ok, "size": (64, 48), "pixels": [((10, 10), (30, 120, 200))]}),
        ({"id": "gray", "image": "gray.png", "conversations": _conv("<image>\nGrey?")},
         {"reason": ok, "size": (40, 30), "pixels": [((5, 5), (77, 77, 77))]}),
        ({"id": "pal", "image": "sub/pal.png", "conversations": _conv("<image>\nPalette")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), white), ((28, 16), (255, 0, 0))]}),
        ({"id": "rgba", "image": "rgba.png", "conversations": _conv("<image>\nAlpha")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), white), ((28, 16), (0, 0, 255))]}),
        ({"id": "cmyk", "image": "cmyk.jpg", "conversations": _conv("<image>\nCMYK")},
         {"reason": ok, "size": (32, 32), "pixels": [((16, 16), (255, 0, 0))]}),
        ({"id": "i16", "image": "i16.png", "conversations": _conv("<image>\n16 bits")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), white), ((28, 16), (128,) * 3)]}),
        ({"id": "la", "image": "la.png", "conversations": _conv("<image>\nLA")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), white), ((28, 16), (200,) * 3)]}),
        ({"id": "missing", "image": "nope/missing.jpg", "conversations": _conv("<image>\nx")},
         {"reason": R.MISSING_IMAGE}),
        ({"id": "corrupt", "image": "corrupt.jpg", "conversations": _conv("<image>\nx")},
         {"reason": R.CORRUPT_IMAGE}),
        ({"id": "text-only", "conversations": _conv("What is 2+2?", "And 3+3?")},
         {"reason": ok, "size": None}),
        ({"id": "multi", "image": "rgb.jpg", "conversations": _conv("<image>\nQ1", "Q2", "Q3")},
         {"reason": ok, "size": (64, 48)}),
        ({"id": "middle", "image": "rgb.jpg",
          "conversations": _conv("Look at this <image> and describe it.")},
         {"reason": ok, "size": (64, 48)}),
        ({"id": "no-token", "image": "rgb.jpg", "conversations": _conv("Describe the picture.")},
         {"reason": ok, "size": (64, 48)}),
        ({"id": "conv-not-list", "image": "rgb.jpg", "conversations": "hello"},
         {"reason": R.BAD_CONVERSATION}),
        ({"id": "conv-empty", "conversations": []}, {"reason": R.BAD_CONVERSATION}),
        ({"id": "turn-no-value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]},
         {"reason": R.BAD_CONVERSATION}),
        ({"id": "two-humans", "conversations": [{"from": "human", "value": "a"},
                                                {"from": "human", "value": "b"}]},
         {"reason": R.BAD_CONVERSATION}),
        ({"id": "gpt-first", "conversations": [{"from": "gpt", "value": "a"},
                                               {"from": "human", "value": "b"}]},
         {"reason": R.BAD_CONVERSATION}),
        ({"id": "token-no-image", "conversations": _conv("<image>\nWhat is this?")},
         {"reason": R.IMAGE_TOKEN_WITHOUT_IMAGE}),
        ({"id": "big", "image": "big.png", "conversations": _conv("<image>\nBig")},
         {"reason": ok, "size": (64, 26), "pixels": [((30, 13), (0, 200, 0))]}),
        ({"id": "a.b/c d:\u00e9", "image": "rgb.jpg", "conversations": _conv("<image>\nKey"),
          "source": "extra-field", "meta": {"k": [1, 2]}},
         {"reason": ok, "size": (64, 48)}),
        ({"id": "truncated", "image": "truncated.jpg", "conversations": _conv("<image>\nx")},
         {"reason": R.CORRUPT_IMAGE}),
        ({"id": "int32", "image": "int32.tif", "conversations": _conv("<image>\nI")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), (0,) * 3), ((28, 16), (200,) * 3)]}),
        ({"id": "float", "image": "float.tif", "conversations": _conv("<image>\nF")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), (0,) * 3), ((28, 16), (128,) * 3)]}),
        ({"id": "tiny", "image": "tiny.png", "conversations": _conv("<image>\nTiny")},
         {"reason": ok, "size": (20, 10)}),
        ({"id": "two-tokens", "image": "rgb.jpg", "conversations": _conv("<image>\n<image>\nx")},
         {"reason": R.MULTIPLE_IMAGE_TOKENS}),
        ({"id": "image-list", "image": ["rgb.jpg", "gray.png"], "conversations": _conv("<image>")},
         {"reason": R.BAD_IMAGE_FIELD}),
        (["not", "an", "object"], {"reason": R.BAD_RECORD}),
        ({"id": "rgb", "image": "rgb.jpg", "conversations": _conv("<image>\nSame id again")},
         {"reason": ok, "size": (64, 48)}),
        ({"id": "unicode", "conversations": _conv("日本語で答えて"), "lang": "ja"},
         {"reason": ok, "size": None}),
        ({"id": "gif", "image": "plain.gif", "conversations": _conv("<image>\nGIF")},
         {"reason": ok, "size": (32, 32), "pixels": [((4, 16), (0, 0, 0)), ((28, 16), (255, 0, 0))]}),
        ({"id": "bilevel", "image": "bilevel.png", "conversations": _conv("<image>\n1-bit")},
         {"reason": ok, "size": (16, 16), "pixels": [((8, 8), white)]}),
    ]
    path = root / "data.json"
    path.write_text(json.dumps([r for r, _ in cases], ensure_ascii=False, indent=1))
    return path, img, cases


EXPECTED_RECORDS = 32
EXPECTED_KEPT = 20
EXPECTED_REASONS = {R.BAD_CONVERSATION: 5, R.CORRUPT_IMAGE: 2, R.MISSING_IMAGE: 1,
                    R.IMAGE_TOKEN_WITHOUT_IMAGE: 1, R.MULTIPLE_IMAGE_TOKENS: 1,
                    R.BAD_IMAGE_FIELD: 1, R.BAD_RECORD: 1}


def _run(json_path, images, out, workers=1, **kw):
    kw = {"shard_size": SHARD_SIZE, "max_side": MAX_SIDE, "progress": False, "summary": False,
          "prefix": "llava", **kw}
    return C.convert(json_path, images, out, workers=workers, **kw)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    json_path, images, cases = make_dataset(root)
    out = root / "out1"
    index = _run(json_path, images, out, workers=1)
    return {"root": root, "json": json_path, "images": images, "cases": cases, "out": out,
            "index": index}


def _shard_urls(out: Path, index: dict) -> list[str]:
    return [str(out / s["path"]) for s in index["shards"]]


# --------------------------------------------------------------------------- counts and reasons


def test_fixture_expectations_are_consistent(built):
    cases = built["cases"]
    assert len(cases) == EXPECTED_RECORDS
    assert sum(e["reason"] is None for _, e in cases) == EXPECTED_KEPT
    reasons = {}
    for _, e in cases:
        if e["reason"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    assert reasons == EXPECTED_REASONS


def test_index_counts_and_skipped_reasons(built):
    out, cases = built["out"], built["cases"]
    index = json.loads((out / "index.json").read_text())
    assert index == built["index"]
    assert index["records"] == EXPECTED_RECORDS
    assert index["total"] == EXPECTED_KEPT
    assert index["skipped"] == EXPECTED_RECORDS - EXPECTED_KEPT
    assert index["skipped_by_reason"] == EXPECTED_REASONS
    # chunk i -> shard i: 32 records / 4 = 8 shards, counts are the kept records of each chunk
    assert [s["path"] for s in index["shards"]] == [f"llava-{i:06d}.tar" for i in range(8)]
    per_chunk = [sum(e["reason"] is None for _, e in cases[i:i + SHARD_SIZE])
                 for i in range(0, EXPECTED_RECORDS, SHARD_SIZE)]
    assert [s["count"] for s in index["shards"]] == per_chunk
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", "skipped.jsonl"] + [f"llava-{i:06d}.tar" for i in range(8)]
        + [f"llava-{i:06d}.tar.done.json" for i in range(8)])

    lines = (out / "skipped.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in lines]
    expected = [(i, r.get("id") if isinstance(r, dict) else None, e["reason"])
                for i, (r, e) in enumerate(cases) if e["reason"]]
    assert [(s["index"], s["id"], s["reason"]) for s in skipped] == expected
    assert all(isinstance(s["detail"], str) for s in skipped)


def test_cli_prints_summary_by_reason(built, tmp_path, capsys):
    rc = C.main(["--json", str(built["json"]), "--images", str(built["images"]),
                 "--out", str(tmp_path / "cli"), "--shard-size", str(SHARD_SIZE),
                 "--max-side", str(MAX_SIDE), "--prefix", "llava", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"converted {EXPECTED_KEPT} of {EXPECTED_RECORDS} records into 8 shards" in text
    for reason, count in EXPECTED_REASONS.items():
        assert any(line.split() == [reason, str(count)] for line in text.splitlines()), reason
    # the CLI and the API write the same bytes
    assert _files(tmp_path / "cli") == _files(built["out"])


# --------------------------------------------------------------------------- reading back


def test_stock_webdataset_reads_every_sample(built):
    out, cases, index = built["out"], built["cases"], built["index"]
    ds = wds.WebDataset(_shard_urls(out, index), shardshuffle=False)
    samples = list(ds)  # raw samples: bytes per extension, no decoders
    kept = [(i, r, e) for i, (r, e) in enumerate(cases) if e["reason"] is None]
    assert len(samples) == len(kept) == index["total"]
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    for sample, (pos, record, expect) in zip(samples, kept):
        key = sample["__key__"]
        assert "." not in key and "/" not in key
        assert key == convert_shards.make_key(pos, record["id"])
        assert key.startswith(f"{pos:09d}")
        assert json.loads(sample["json"].decode("utf-8")) == record  # every field kept as is
        if expect["size"] is None:
            assert "jpg" not in sample
            continue
        im = Image.open(io.BytesIO(sample["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == expect["size"]
        assert max(im.size) <= MAX_SIDE
        for (x, y), colour in expect.get("pixels", []):
            got = im.getpixel((x, y))
            assert all(abs(g - c) <= 6 for g, c in zip(got, colour)), (record["id"], got, colour)
    by_id = {s["__key__"]: s for s in samples}
    assert "000000020_a_b_c_d" in by_id  # "a.b/c d:é" sanitised, original id in the JSON
    assert json.loads(by_id["000000020_a_b_c_d"]["json"])["id"] == "a.b/c d:\u00e9"
    middle = json.loads(by_id["000000011_middle"]["json"])
    assert middle["conversations"][0]["value"] == "Look at this <image> and describe it."


def test_tar_layout_is_deterministic_and_tar_readable(built):
    out, index = built["out"], built["index"]
    for shard in index["shards"]:
        path = out / shard["path"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert all(m.isfile() and m.mtime == 0 and m.uid == 0 and m.gid == 0
                   and m.mode == 0o644 for m in members)
        assert sum(n.endswith(".json") for n in names) == shard["count"]
        for n in names:
            key, ext = n.split(".", 1)
            assert ext in ("jpg", "json") and "/" not in key
        if shutil.which("tar"):
            listed = subprocess.run(["tar", "tf", str(path)], check=True, capture_output=True,
                                    text=True).stdout.split()
            assert listed == names


def test_max_side_never_upsizes_and_keeps_aspect(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    sizes = {"wide.png": (300, 120), "tall.jpg": (90, 400), "small.png": (20, 10),
             "exact.png": (64, 64)}
    for name, size in sizes.items():
        Image.new("RGB", size, (9, 9, 9)).save(img / name)
    recs = [{"id": n, "image": n, "conversations": _conv("<image>")} for n in sizes]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    index = _run(tmp_path / "d.json", img, tmp_path / "out", max_side=64)
    got = {}
    for s in wds.WebDataset(_shard_urls(tmp_path / "out", index), shardshuffle=False):
        got[json.loads(s["json"])["id"]] = Image.open(io.BytesIO(s["jpg"])).size
    # 400 -> 64 scales 90 by 0.16 = 14.4 -> 14, although draft() decodes the JPEG at 23 x 100
    assert got == {"wide.png": (64, 26), "tall.jpg": (14, 64), "small.png": (20, 10),
                   "exact.png": (64, 64)}
    index = _run(tmp_path / "d.json", img, tmp_path / "full", max_side=None)
    got = [Image.open(io.BytesIO(s["jpg"])).size
           for s in wds.WebDataset(_shard_urls(tmp_path / "full", index), shardshuffle=False)]
    assert got == list(sizes.values())


def test_exif_orientation_ignored_by_default_applied_on_request(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (80, 40), (50, 60, 70)).save(img / "rot.jpg", exif=exif.tobytes())
    (tmp_path / "d.json").write_text(json.dumps(
        [{"id": "rot", "image": "rot.jpg", "conversations": _conv("<image>")}]))
    for flag, expected in ((False, (32, 16)), (True, (16, 32))):
        out = tmp_path / f"out{flag}"
        index = _run(tmp_path / "d.json", img, out, max_side=32, exif_transpose=flag)
        (sample,) = list(wds.WebDataset(_shard_urls(out, index), shardshuffle=False))
        im = Image.open(io.BytesIO(sample["jpg"]))
        assert im.size == expected
        assert 0x0112 not in im.getexif()  # no metadata carried over


@pytest.mark.parametrize("mode,value,expected", [
    ("La", (100, 255), (100, 100, 100)),
    ("PA", (0, 0), (255, 255, 255)),
    ("RGBa", (10, 20, 30, 255), (10, 20, 30)),
    ("I", 65535 * 2, (255, 255, 255)),      # outside 0..65535: stretched (flat -> 0)
    ("F", 3.0, (3, 3, 3)),                    # within 0..255: taken as 8-bit values
    ("YCbCr", (128, 128, 128), (128, 128, 128)),
    ("I;16B", 257 * 40, (40, 40, 40)),
])
def test_to_rgb_modes(mode, value, expected):
    im = Image.new(mode, (4, 4), value)
    rgb = convert_images.to_rgb(im)
    assert rgb.mode == "RGB"
    if mode == "I":  # a flat image outside 16 bits has no range to stretch: black
        expected = (0, 0, 0)
    assert all(abs(a - b) <= 1 for a, b in zip(rgb.getpixel((0, 0)), expected))


# --------------------------------------------------------------------------- determinism


def test_same_bytes_for_one_and_two_workers(built, tmp_path):
    index = _run(built["json"], built["images"], tmp_path / "w2", workers=2)
    assert index == built["index"]
    assert _files(tmp_path / "w2") == _files(built["out"])


def test_jsonl_input_and_moved_images_give_the_same_output(built, tmp_path):
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in built["cases"]))
    moved = shutil.copytree(built["images"], tmp_path / "elsewhere" / "imgs")
    _run(jsonl, moved, tmp_path / "jl")
    # shards, markers, skipped.jsonl and index.json name no absolute path
    assert _files(tmp_path / "jl") == _files(built["out"])


def test_jsonl_bad_line_is_skipped_not_fatal(tmp_path):
    good = {"id": "ok", "conversations": _conv("hi")}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps(good) + "\n")
    index = _run(tmp_path / "d.jsonl", tmp_path, tmp_path / "out")
    assert (index["total"], index["skipped"], index["skipped_by_reason"]) == (2, 1, {"bad_json": 1})


# --------------------------------------------------------------------------- resumption


def test_resume_after_simulated_crash(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    reference = _files(built["out"])
    (out / "index.json").unlink()
    (out / "llava-000002.tar.done.json").unlink()                  # renamed, marker not written
    (out / "llava-000005.tar").write_bytes(b"half a shard")        # size disagrees with marker
    (out / "llava-000006.tar.tmp").write_bytes(b"partial")         # killed mid-write
    (out / "llava-000006.tar.done.json.tmp").write_bytes(b"{")
    (out / "llava-000099.tar").write_bytes(b"left over from a bigger run")
    untouched = {p.name: p.stat().st_mtime_ns for p in out.glob("llava-00000[0134].tar")}
    time.sleep(0.01)

    index = _run(built["json"], built["images"], out)
    assert index == built["index"]
    assert _files(out) == reference  # complete, identical, nothing stale, nothing duplicated
    assert {n: (out / n).stat().st_mtime_ns for n in untouched} == untouched  # reused as is
    keys = [s["__key__"] for s in wds.WebDataset(_shard_urls(out, index), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == EXPECTED_KEPT


def test_changed_options_rebuild_every_shard(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    index = _run(built["json"], built["images"], out, max_side=32)
    assert index["total"] == EXPECTED_KEPT
    sizes = [Image.open(io.BytesIO(s["jpg"])).size
             for s in wds.WebDataset(_shard_urls(out, index), shardshuffle=False) if "jpg" in s]
    assert max(max(s) for s in sizes) == 32
