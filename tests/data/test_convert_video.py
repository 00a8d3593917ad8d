"""The converter's video and multi-image records, on real video files written here with PyAV.

Every frame of a test video is one solid colour of :data:`PALETTE`, frame i colour i, so the
colour of a stored frame says which source frame was sampled.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vtc.data import convert as C
from vtc.data import convert_records as R
from vtc.data import convert_shards, video_frames
from vtc.data.convert_images import Options

av = pytest.importorskip("av")

LEVELS = (0, 85, 170, 255)
PALETTE = [(r, g, b) for r in LEVELS for g in LEVELS for b in LEVELS]  # 64 colours, 85 apart
FPS = 10
SIZE = (64, 48)
MAX_SIDE = 32
SHARD_SIZE = 4
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
    except Exception:
        return False
    return True


CODECS = [c for c in ("libx264", "mpeg4") if _has_encoder(c)]
CODEC = CODECS[0] if CODECS else None
pytestmark = pytest.mark.skipif(CODEC is None, reason="this PyAV has neither libx264 nor mpeg4")


def write_video(path: Path, n: int, codec: str | None = None, faststart: bool = False) -> Path:
    """An mp4 of ``n`` SIZE frames at FPS, frame i filled with PALETTE[i]."""
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec or CODEC, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        for i in range(n):
            rgb = np.empty((SIZE[1], SIZE[0], 3), np.uint8)
            rgb[:] = PALETTE[i]
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def write_cover_art_audio(path: Path) -> Path:
    """A FLAC file with a cover picture, which FFmpeg lists as a (one-frame) video stream."""
    with av.open(str(path), "w") as out:
        audio = out.add_stream("flac", rate=8000)
        cover = out.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 16, 16, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        picture = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        out.mux(cover.encode(picture.reformat(format="yuvj420p")))
        out.mux(cover.encode())
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16",
                                           layout="mono")
        frame.sample_rate = 8000
        out.mux(audio.encode(frame))
        out.mux(audio.encode())
    return path


def write_truncated(path: Path, n: int = 30) -> Path:
    """An mp4 (index first) cut inside its last packet, as an interrupted download leaves it."""
    write_video(path, n, faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[:-6])
    return path


def palette_index(im: Image.Image) -> int:
    rgb = np.asarray(im.convert("RGB"), dtype=float)[im.height // 2, im.width // 2]
    return int(np.argmin([np.sum((rgb - np.array(c)) ** 2) for c in PALETTE]))


def _close(got, colour, tol=12):
    return all(abs(g - c) <= tol for g, c in zip(got, colour))


def _conv(first: str) -> list[dict]:
    return [{"from": "human", "value": first}, {"from": "gpt", "value": "answer"}]


# --------------------------------------------------------------------------- sampling (PyAV)


def test_sample_indices_are_video_llavas_linspace():
    vs = video_frames.sample_indices
    assert vs(30, 8) == [0, 4, 8, 12, 16, 20, 24, 29]
    assert vs(12, 8) == [0, 1, 3, 4, 6, 7, 9, 11]
    assert vs(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]  # shorter than N: frames repeat
    assert vs(1, 3) == [0, 0, 0] and vs(30, 1) == [0]
    for n in (1, 7, 8, 30, 100):
        assert vs(30, n) == np.linspace(0, 29, n, dtype=int).tolist()
    with pytest.raises(ValueError):
        vs(0, 8)


@pytest.mark.parametrize("codec", CODECS)
def test_sample_video_returns_the_uniformly_sampled_frames_and_times(tmp_path, codec):
    path = write_video(tmp_path / "v.mp4", 30, codec=codec)
    got = video_frames.sample_video(path, 8)
    assert got.frame_count == 30
    assert got.indices == [0, 4, 8, 12, 16, 20, 24, 29]
    assert [palette_index(f) for f in got.frames] == got.indices  # presentation order
    assert all(f.mode == "RGB" and f.size == SIZE for f in got.frames)
    assert got.timestamps == [i / FPS for i in got.indices]
    frames, times = video_frames.read_frames(path, 4)
    assert [palette_index(f) for f in frames] == [0, 9, 19, 29]
    assert times == [0.0, 0.9, 1.9, 2.9]


def test_short_video_repeats_frames(tmp_path):
    got = video_frames.sample_video(write_video(tmp_path / "s.mp4", 5), 8)
    assert got.frame_count == 5
    assert [palette_index(f) for f in got.frames] == [0, 0, 1, 1, 2, 2, 3, 4]
    assert got.timestamps == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.4]


def test_segment_indices_are_mvbench_s_rule_worked_by_hand():
    """MVBench's get_index, worked by hand (seg = (end_idx - start_idx) / n; int(start + seg/2 +
    round-half-even(seg * i)))."""
    si = video_frames.segment_indices
    # whole video, 30 frames (max_frame 29): seg 29/4 = 7.25 -> 3.625 + {0, 7, 14, 22}
    assert si(4, 10.0, 29) == [3, 10, 17, 25]
    # bound [1.0, 2.0] s at 10 fps: frames 10..20, seg 2.5 -> 11.25 + {0, 2 (2.5 to even), 5, 8 (7.5 to even)}
    assert si(4, 10.0, 29, (1.0, 2.0)) == [11, 13, 16, 19]
    # a folder of 6 frames at 3 fps numbered from 1, bound [0, 2] s: 1..6, seg 1.25 -> 1.625 + {0, 1, 2, 4}
    assert si(4, 3.0, 6, (0.0, 2.0), first_idx=1) == [1, 2, 3, 5]
    # a bound past the end keeps to the video's frames (the notebook would index out of range)
    assert si(2, 10.0, 29, (5.0, 9.0)) == [29, 29]
    with pytest.raises(video_frames.VideoError) as e:
        si(4, None, 29, (1.0, 2.0))
    assert e.value.reason == video_frames.NO_FRAME_RATE
    assert si(4, None, 29) == [3, 10, 17, 25]  # no bound: the frame rate is not needed


def test_sample_video_at_mvbench_indices_inside_a_bound(tmp_path):
    path = write_video(tmp_path / "v.mp4", 30)
    got = video_frames.sample_video(path, 4, pick=lambda count, fps: video_frames.segment_indices(
        4, fps, count - 1, (1.0, 2.0)))
    assert got.indices == [11, 13, 16, 19]
    assert [palette_index(f) for f in got.frames] == got.indices
    assert got.timestamps == [i / FPS for i in got.indices]


def _bad_videos(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, expected VideoError reason, or 'missing' for FileNotFoundError)."""
    rng = np.random.default_rng(0)
    (d / "random.mp4").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (d / "empty.mp4").write_bytes(b"")
    # a real stream header and no frame (yuv4mpeg is the one format whose header PyAV reads
    # without any frame following it)
    (d / "header_only.y4m").write_bytes(b"YUV4MPEG2 W16 H16 F10:1 Ip A1:1 C420jpeg\n")
    return {"random": (d / "random.mp4", video_frames.UNREADABLE),
            "empty": (d / "empty.mp4", video_frames.UNREADABLE),
            "truncated": (write_truncated(d / "truncated.mp4"), video_frames.UNREADABLE),
            "audio": (write_audio_only(d / "audio.wav"), video_frames.NO_VIDEO_STREAM),
            "cover_art": (write_cover_art_audio(d / "cover.flac"), video_frames.NO_VIDEO_STREAM),
            "no_frames": (d / "header_only.y4m", video_frames.NO_FRAMES),
            "missing": (d / "missing.mp4", "missing")}


def test_sample_video_errors(tmp_path):
    for name, (path, reason) in _bad_videos(tmp_path).items():
        if reason == "missing":
            with pytest.raises(FileNotFoundError):
                video_frames.sample_video(path, 8)
            continue
        with pytest.raises(video_frames.VideoError) as e:
            video_frames.sample_video(path, 8)
        assert e.value.reason == reason, (name, e.value)


# --------------------------------------------------------------------------- conversion

V_CLIP = [0, 4, 8, 12, 16, 20, 24, 29]   # 30 frames, N = 8
V_SHORT = [0, 0, 1, 1, 2, 2, 3, 4]       # 5 frames, N = 8
V_MPEG4 = [0, 1, 3, 4, 6, 7, 9, 11]      # 12 frames, N = 8


def make_dataset(root: Path):
    """Images, videos (in their own directory) and records. Returns (json, images, videos, cases);
    a case's expect: {"reason"} for a skip, else {"jpg": colour} | {"img": [colours]} and/or
    {"vid": [frame indices per video]}."""
    images, videos = root / "images", root / "videos"
    images.mkdir(parents=True)
    (videos / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 40), RED).save(images / "red.png")
    Image.new("RGB", (40, 40), BLUE).save(images / "blue.png")
    write_video(videos / "sub" / "clip.mp4", 30)
    write_video(videos / "short.mp4", 5)
    write_video(videos / "mpeg4.mp4", 12, codec="mpeg4" if "mpeg4" in CODECS else None)
    for name, (path, _) in _bad_videos(videos).items():
        assert name == "missing" or path.parent == videos

    clip, ok = "sub/clip.mp4", None
    cases = [
        ({"id": "clip", "video": clip, "conversations": _conv("<video>\nWhat happens?")},
         {"reason": ok, "vid": [V_CLIP]}),
        ({"id": "short", "video": "short.mp4", "conversations": _conv("<video>\nQ")},
         {"reason": ok, "vid": [V_SHORT]}),
        ({"id": "corrupt", "video": "random.mp4", "conversations": _conv("<video>\nQ")},
         {"reason": R.CORRUPT_VIDEO}),
        ({"id": "truncated", "video": "truncated.mp4", "conversations": _conv("<video>\nQ")},
         {"reason": R.CORRUPT_VIDEO}),
        ({"id": "empty", "video": "empty.mp4", "conversations": _conv("<video>\nQ")},
         {"reason": R.CORRUPT_VIDEO}),
        ({"id": "missing", "video": "nope/missing.mp4", "conversations": _conv("<video>\nQ")},
         {"reason": R.MISSING_VIDEO}),
        ({"id": "audio", "video": "audio.wav", "conversations": _conv("<video>\nQ")},
         {"reason": R.NO_VIDEO_STREAM}),
        ({"id": "cover-art", "video": "cover.flac", "conversations": _conv("<video>\nQ")},
         {"reason": R.NO_VIDEO_STREAM}),
        ({"id": "no-frames", "video": "header_only.y4m", "conversations": _conv("<video>\nQ")},
         {"reason": R.VIDEO_TOO_SHORT}),
        ({"id": "two-images", "image": ["red.png", "blue.png"],
          "conversations": _conv("<image>\nand <image>\nSame colour?")},
         {"reason": ok, "img": [RED, BLUE]}),
        ({"id": "two-images-rev", "image": ["blue.png", "red.png"],
          "conversations": _conv("<image> <image> Same?")},
         {"reason": ok, "img": [BLUE, RED]}),
        ({"id": "list-of-one", "image": ["red.png"], "conversations": _conv("<image>\nColour?")},
         {"reason": ok, "jpg": RED}),
        ({"id": "list-mismatch", "image": ["red.png", "blue.png"],
          "conversations": _conv("<image>")},
         {"reason": R.BAD_IMAGE_FIELD}),
        ({"id": "list-no-token", "image": ["red.png", "blue.png"], "conversations": _conv("Q")},
         {"reason": R.BAD_IMAGE_FIELD}),
        ({"id": "list-missing", "image": ["red.png", "nope.png"],
          "conversations": _conv("<image><image>")},
         {"reason": R.MISSING_IMAGE}),
        ({"id": "two-videos", "video": [clip, "short.mp4"],
          "conversations": _conv("<video>\n<video>\nCompare.")},
         {"reason": ok, "vid": [V_CLIP, V_SHORT]}),
        ({"id": "mixed", "image": "red.png", "video": clip,
          "conversations": _conv("<video>\n<image>\nIs the picture in the video?")},
         {"reason": ok, "img": [RED], "vid": [V_CLIP]}),
        ({"id": "video-no-token", "video": clip, "conversations": _conv("What happens?")},
         {"reason": ok, "vid": [V_CLIP]}),
        ({"id": "token-no-video", "conversations": _conv("<video>\nQ")},
         {"reason": R.VIDEO_TOKEN_WITHOUT_VIDEO}),
        ({"id": "video-list-mismatch", "video": [clip], "conversations": _conv("<video><video>")},
         {"reason": R.BAD_VIDEO_FIELD}),
        ({"id": "two-video-tokens", "video": clip, "conversations": _conv("<video><video>")},
         {"reason": R.MULTIPLE_VIDEO_TOKENS}),
        ({"id": "unplaced", "image": "red.png", "video": clip,
          "conversations": _conv("<video>\nQ")},
         {"reason": R.MISSING_PLACEHOLDER}),
        ({"id": "video-not-a-path", "video": 5, "conversations": _conv("<video>")},
         {"reason": R.BAD_VIDEO_FIELD}),
        ({"id": "text", "conversations": _conv("Hello")}, {"reason": ok}),
        ({"id": "image", "image": "red.png", "conversations": _conv("<image>\nQ")},
         {"reason": ok, "jpg": RED}),
        ({"id": "mpeg4", "video": "mpeg4.mp4", "conversations": _conv("<video>\nQ")},
         {"reason": ok, "vid": [V_MPEG4]}),
        ({"id": "image-and-bad-video", "image": "red.png", "video": "random.mp4",
          "conversations": _conv("<image><video>")},
         {"reason": R.CORRUPT_VIDEO}),
    ]
    path = root / "data.json"
    path.write_text(json.dumps([r for r, _ in cases]))
    return path, images, videos, cases


EXPECTED_KEPT = 11
EXPECTED_REASONS = {R.CORRUPT_VIDEO: 4, R.MISSING_VIDEO: 1, R.NO_VIDEO_STREAM: 2,
                    R.VIDEO_TOO_SHORT: 1, R.BAD_IMAGE_FIELD: 2, R.MISSING_IMAGE: 1,
                    R.VIDEO_TOKEN_WITHOUT_VIDEO: 1, R.BAD_VIDEO_FIELD: 2,
                    R.MULTIPLE_VIDEO_TOKENS: 1, R.MISSING_PLACEHOLDER: 1}


def _run(d, out, **kw):
    kw = {"shard_size": SHARD_SIZE, "max_side": MAX_SIDE, "progress": False, "summary": False,
          "prefix": "vid", "videos_dir": d["videos"], **kw}
    return C.convert(d["json"], d["images"], out, **kw)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _samples(out: Path, index: dict) -> list[dict]:
    urls = [str(out / s["path"]) for s in index["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    json_path, images, videos, cases = make_dataset(root)
    d = {"root": root, "json": json_path, "images": images, "videos": videos, "cases": cases}
    d["out"] = root / "out"
    d["index"] = _run(d, d["out"])
    return d


def test_counts_and_skip_reasons(built):
    cases, index = built["cases"], built["index"]
    assert sum(e["reason"] is None for _, e in cases) == EXPECTED_KEPT
    assert index["records"] == len(cases) and index["total"] == EXPECTED_KEPT
    assert index["skipped_by_reason"] == EXPECTED_REASONS
    assert index["options"]["frames"] == 8 and "videos_dir" not in index["options"]
    lines = (built["out"] / "skipped.jsonl").read_text().splitlines()
    skipped = [json.loads(line) for line in lines]
    assert [(s["id"], s["reason"]) for s in skipped] == [
        (r["id"], e["reason"]) for r, e in cases if e["reason"]]
    details = " ".join(s["detail"] for s in skipped)
    assert str(built["root"]) not in details  # relative paths only


def test_members_frames_colours_and_timestamps(built):
    kept = [(i, r, e) for i, (r, e) in enumerate(built["cases"]) if e["reason"] is None]
    samples = _samples(built["out"], built["index"])
    assert len(samples) == len(kept)
    for sample, (pos, record, expect) in zip(samples, kept):
        assert sample["__key__"] == convert_shards.make_key(pos, record["id"])
        want = {"json"}
        if "jpg" in expect:
            want.add("jpg")
        want |= {f"img{i}.jpg" for i in range(len(expect.get("img", [])))}
        want |= {f"vid{j}.{f:03d}.jpg" for j, idx in enumerate(expect.get("vid", []))
                 for f in range(len(idx))}
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == want, record["id"]
        stored = json.loads(sample["json"])
        if "vid" in expect:
            assert stored == {**record, "video_timestamps": [[i / FPS for i in idx]
                                                             for idx in expect["vid"]]}
        else:
            assert stored == record and "video_timestamps" not in stored
        if "jpg" in expect:
            assert _close(Image.open(io.BytesIO(sample["jpg"])).getpixel((5, 5)), expect["jpg"])
        for i, colour in enumerate(expect.get("img", [])):
            im = Image.open(io.BytesIO(sample[f"img{i}.jpg"]))
            assert im.size == (32, 32) and _close(im.getpixel((5, 5)), colour), record["id"]
        for j, indices in enumerate(expect.get("vid", [])):
            frames = [Image.open(io.BytesIO(sample[f"vid{j}.{f:03d}.jpg"]))
                      for f in range(len(indices))]
            assert all(f.format == "JPEG" and f.mode == "RGB" and f.size == (32, 24)
                       for f in frames)  # 64 x 48 shrunk to --max-side 32
            assert [palette_index(f) for f in frames] == indices, record["id"]


def test_same_bytes_for_one_and_two_workers(built, tmp_path):
    index = _run(built, tmp_path / "w2", workers=2)
    assert index == built["index"]
    assert _files(tmp_path / "w2") == _files(built["out"])


def test_resume_reuses_finished_shards_and_rebuilds_the_rest(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    reference = _files(built["out"])
    (out / "index.json").unlink()
    (out / "vid-000000.tar.done.json").unlink()          # renamed, marker not written
    (out / "vid-000003.tar").write_bytes(b"half a shard")  # size disagrees with its marker
    (out / "vid-000005.tar.tmp").write_bytes(b"partial")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("vid-00000[1246].tar")}
    time.sleep(0.01)
    assert _run(built, out) == built["index"]
    assert _files(out) == reference
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # reused as they were


def test_changed_frames_rebuild_shards(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    opts = Options(images_dir="x", max_side=MAX_SIDE, frames=8)
    items = [(r, None) for r, _ in built["cases"][:SHARD_SIZE]]
    assert (convert_shards.chunk_fingerprint(items, 0, opts, 9)
            != convert_shards.chunk_fingerprint(items, 0, Options("x", MAX_SIDE, frames=4), 9))
    index = _run(built, out, frames=4)
    assert index["options"]["frames"] == 4 and index["total"] == EXPECTED_KEPT
    by_id = {json.loads(s["json"])["id"]: s for s in _samples(out, index)}
    clip = by_id["clip"]
    assert sorted(k for k in clip if k.startswith("vid")) == [f"vid0.{f:03d}.jpg" for f in range(4)]
    assert [palette_index(Image.open(io.BytesIO(clip[f"vid0.{f:03d}.jpg"]))) for f in range(4)] \
        == [0, 9, 19, 29]
    assert json.loads(clip["json"])["video_timestamps"] == [[0.0, 0.9, 1.9, 2.9]]
    # and back: the same bytes as a fresh conversion with 8 frames
    _run(built, out)
    assert _files(out) == _files(built["out"])


def test_cli_frames_and_videos_options(built, tmp_path, capsys):
    args = ["--json", str(built["json"]), "--images", str(built["images"]), "--videos",
            str(built["videos"]), "--shard-size", str(SHARD_SIZE), "--max-side", str(MAX_SIDE),
            "--prefix", "vid", "--quiet"]
    assert C.main(args + ["--out", str(tmp_path / "cli")]) == 0
    assert _files(tmp_path / "cli") == _files(built["out"])  # --frames defaults to 8
    text = capsys.readouterr().out
    for reason, count in EXPECTED_REASONS.items():
        assert any(line.split() == [reason, str(count)] for line in text.splitlines()), reason
    for bad in ("0", "1000"):
        assert C.main(args + ["--out", str(tmp_path / "bad"), "--frames", bad]) == 2
        assert "frames must be in 1..999" in capsys.readouterr().err


def test_without_pyav_images_convert_and_videos_fail_loudly(built, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    images_only = tmp_path / "images.json"
    images_only.write_text(json.dumps([r for r, e in built["cases"]
                                       if "video" not in r and e["reason"] is None]))
    index = C.convert(images_only, built["images"], tmp_path / "img", progress=False,
                      summary=False)
    assert index["total"] == 5 and index["skipped"] == 0
    with pytest.raises(ImportError, match="pip install av"):
        _run(built, tmp_path / "vid")  # never "every video is corrupt"
