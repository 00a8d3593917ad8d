"""One chunk of input records -> one deterministic webdataset shard and its done marker.

Separate from the driver (:mod:`vtc.data.convert`): this is what a converter worker process runs,
one whole shard at a time, and it alone fixes the shards' names, members and bytes, and the
markers by which a rerun knows which shards it may keep.

Each sample in a shard is ``{key}.json`` (the input record unchanged: "id", "conversations", the
original "image"/"video" paths and any other field; a video record gains ``"video_timestamps"``)
plus its visual items (docs/video.md, :func:`convert_record`): ``{key}.jpg`` for a sample whose
only item is one image; otherwise ``{key}.img0.jpg``, ``{key}.img1.jpg``, ... for its images and
``{key}.vid0.000.jpg``, ``{key}.vid0.001.jpg``, ... for the frames of its videos, images and
videos each numbered in placeholder order.

``key`` is ``{position:09d}_{sanitised id}``: the record's 0-based position in the input plus its
id reduced to ``[A-Za-z0-9_-]`` (at most 64 characters), so keys are unique, sort in input order,
and contain no dot (webdataset splits key from extension at the first dot, so ``vid0.000.jpg`` is
one extension). The original id is in the JSON. Tar members are sorted by name, with mtime 0,
uid/gid 0, mode 0644: a shard's bytes depend only on its input records and the options, never on
``--workers`` or on the clock.

A shard is written to ``name.tar.tmp``, fsynced, and renamed to ``name.tar``; only then is
``name.tar.done.json`` written (also via a temporary file and a rename: :func:`atomic_write`). A
killed run therefore never leaves a partial file under a final name. A done marker is valid only
for the same input records, the same options (``--frames`` included) and the same tar size
(:func:`chunk_fingerprint`, :func:`read_valid_marker`); :func:`clean_output_dir` removes what a
rerun must not trust.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from vtc.data.convert_images import BACKGROUND, JPEG_QUALITY, Options, encode_jpeg, load_image
from vtc.data.convert_records import BAD_JSON, SkipSample, validate_record
from vtc.data.convert_videos import load_video

# Bump when a change alters the bytes written for the same input: it invalidates done markers.
# 2: video and multi-image records (skipped by version 1) are kept.
FORMAT_VERSION = 2
KEY_ID_CHARS = 64
MIN_KEY_DIGITS = 9

INDEX_NAME = "index.json"
SKIPPED_NAME = "skipped.jsonl"
DONE_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"

_KEY_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_id(value: Any) -> str:
    """The part of a key derived from a record id: ``[A-Za-z0-9_-]`` only, at most 64 chars."""
    if value is None:
        return ""
    s = _KEY_UNSAFE_RE.sub("_", str(value)).strip("_")
    return s[:KEY_ID_CHARS]


def make_key(position: int, record_id: Any, digits: int = MIN_KEY_DIGITS) -> str:
    sid = sanitize_id(record_id)
    return f"{position:0{digits}d}_{sid}" if sid else f"{position:0{digits}d}"


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def convert_record(record: Any, opts: Options) -> tuple[list[tuple[str, bytes]], bytes]:
    """One record to ``(visual members as (extension, bytes), json bytes)``, or raise SkipSample.

    Extensions: ``jpg`` for a lone image; else ``img{i}.jpg`` per image and ``vid{j}.{f:03d}.jpg``
    per frame of each video. A video record's JSON gains ``"video_timestamps"``: per video, its
    frames' times in seconds."""
    visuals = validate_record(record)
    members: list[tuple[str, bytes]] = []
    if visuals.single_image:
        members.append(("jpg", encode_jpeg(load_image(visuals.images[0], opts))))
    else:
        for i, image in enumerate(visuals.images):
            members.append((f"img{i}.jpg", encode_jpeg(load_image(image, opts))))
    timestamps = []
    for j, video in enumerate(visuals.videos):
        frames, times = load_video(video, opts)
        members += [(f"vid{j}.{f:03d}.jpg", jpg) for f, jpg in enumerate(frames)]
        timestamps.append(times)
    if visuals.videos:
        record = {**record, "video_timestamps": timestamps}
    text = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return members, text


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str, data: bytes) -> None:
    tmp = path + TMP_SUFFIX
    _fsync_write(tmp, data)
    os.replace(tmp, path)


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Write a deterministic tar (sorted names, mtime 0, root:root 0644). Returns its size."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in sorted(members, key=lambda m: m[0]):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _record_id(record: Any) -> Any:
    return record.get("id") if isinstance(record, dict) else None


def chunk_fingerprint(items: Sequence[tuple[Any, str | None]], start: int, opts: Options,
                      digits: int) -> str:
    """Hash of a chunk's records, position and options: a done marker is valid only if equal."""
    h = hashlib.sha256()
    header = {"version": FORMAT_VERSION, "quality": JPEG_QUALITY, "background": BACKGROUND,
              "start": start, "digits": digits, "max_side": opts.max_side,
              "exif_transpose": opts.exif_transpose, "frames": opts.frames}
    h.update(json.dumps(header, sort_keys=True).encode())
    for record, error in items:
        h.update(b"\n")
        h.update(json.dumps([record, error], sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


@dataclass
class ShardTask:
    index: int
    start: int
    items: list[tuple[Any, str | None]]
    out_dir: str
    prefix: str
    digits: int
    fingerprint: str
    opts: Options


def write_shard(task: ShardTask) -> dict:
    """Convert one chunk into one shard plus its done marker. Returns the marker's content."""
    name = shard_name(task.prefix, task.index)
    final = os.path.join(task.out_dir, name)
    done = final + DONE_SUFFIX
    if os.path.exists(done):  # stale marker for other content: drop it before rewriting
        os.unlink(done)
    members: list[tuple[str, bytes]] = []
    skipped: list[dict] = []
    for offset, (record, error) in enumerate(task.items):
        position = task.start + offset
        try:
            if error is not None:
                raise SkipSample(BAD_JSON, error)
            visual, text = convert_record(record, task.opts)
        except SkipSample as s:
            rid = _record_id(record)
            skipped.append({"index": position, "id": rid, "reason": s.reason, "detail": s.detail})
            continue
        key = make_key(position, _record_id(record), task.digits)
        members += [(f"{key}.{ext}", data) for ext, data in visual]
        members.append((f"{key}.json", text))
    tmp = final + TMP_SUFFIX
    size = write_tar(tmp, members)
    os.replace(tmp, final)
    marker = {"path": name, "count": sum(1 for n, _ in members if n.endswith(".json")),
              "records": len(task.items), "start": task.start, "bytes": size,
              "fingerprint": task.fingerprint, "skipped": skipped}
    atomic_write(done, json.dumps(marker, ensure_ascii=False, indent=1).encode("utf-8"))
    return marker


def read_valid_marker(out_dir: str, name: str, fingerprint: str) -> dict | None:
    final = os.path.join(out_dir, name)
    try:
        with open(final + DONE_SUFFIX, "rb") as f:
            marker = json.load(f)
        if (marker.get("fingerprint") == fingerprint
                and os.path.getsize(final) == marker.get("bytes")):
            return marker
    except (OSError, ValueError):
        pass
    return None


def clean_output_dir(out_dir: str, prefix: str, n_shards: int) -> list[str]:
    """Remove index.json, stale temporary files and shards beyond ``n_shards``. Returns removed."""
    shard_re = re.compile(re.escape(prefix) + r"-(\d{6,})\.tar(" + re.escape(DONE_SUFFIX) + r")?$")
    removed = []
    for fname in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, fname)
        stale = False
        if fname == INDEX_NAME:
            stale = True
        elif fname.endswith(TMP_SUFFIX) and (
                fname.startswith(prefix + "-") or fname in (INDEX_NAME + TMP_SUFFIX,
                                                            SKIPPED_NAME + TMP_SUFFIX)):
            stale = True
        else:
            m = shard_re.match(fname)
            stale = bool(m and int(m.group(1)) >= n_shards)
        if stale and os.path.isfile(path):
            os.unlink(path)
            removed.append(fname)
    return removed
