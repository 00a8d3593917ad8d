"""Convert LLaVA-format conversation data into webdataset shards.

Usage::

    python -m vtc.data.convert --json llava_v1_5_mix665k.json --images /data/images \\
        --out /data/shards/mix665k [--shard-size 1000] [--workers 8] [--max-side 1024] \\
        [--prefix mix665k] [--exif-transpose] [--quiet]

Input: a JSON list of records, or JSONL (one record per line), each
``{"id", "image"? (path relative to --images), "conversations": [{"from", "value"}, ...], ...}``.

Output (everything in ``--out``)::

    {prefix}-000000.tar            shard i holds the kept samples of input records
    {prefix}-000001.tar            [i * shard_size, (i + 1) * shard_size), in input order
    ...
    {prefix}-000000.tar.done.json  per-shard completion marker: count, skipped records, fingerprint
    skipped.jsonl                  one line per skipped record: {"index", "id", "reason", "detail"}
    index.json                     {"shards": [{"path", "count"}], "total", "skipped", ...};
                                   written last: its presence means the conversion is complete

Each sample in a shard is ``{key}.jpg`` (only when the record has an image) and ``{key}.json``
(the input record unchanged: "id", "conversations", the original "image" path and any other
field). ``key`` is ``{position:09d}_{sanitised id}``: the record's 0-based position in the input
plus its id reduced to ``[A-Za-z0-9_-]`` (at most 64 characters), so keys are unique, sort in input
order, and contain no dot (webdataset splits key from extension at the first dot). The original id
is in the JSON. Tar members are sorted by name, with mtime 0, uid/gid 0, mode 0644: a shard's bytes
depend only on its input records and the options, never on ``--workers`` or on the clock.

Image policy (see :func:`to_rgb`, which is :func:`vtc.data.image.to_rgb` on white):

* every image is decoded fully (a truncated or corrupt file is skipped, never half-kept) and
  re-encoded as an RGB JPEG at quality 95 (Pillow's default 4:2:0 chroma subsampling), without
  EXIF or ICC data;
* transparency (LA, La, PA, RGBA, RGBa, P or L/RGB with a transparency key) is composited on
  **white**: transparent areas of diagrams, logos and screenshots are meant to be shown on a page,
  and black would swallow the black text and strokes they usually carry. (LLaVA's own loader calls
  ``convert("RGB")``, which drops alpha and leaves whatever colour the transparent pixels stored,
  often black.)
* 16-bit grey (I;16, I;16L, I;16B, I;16N) is scaled ``round(v * 255 / 65535)``, not clipped as
  Pillow's ``convert("L")`` does; 32-bit integer "I" images are read as 8-bit if all values lie in
  0..255, as 16-bit if they lie in 0..65535, else stretched min..max to 0..255; float "F" images
  as [0, 1] if they lie there, as 0..255 if they lie there, else stretched min..max (NaN -> 0);
* CMYK, YCbCr, 1, L, HSV and the rest go through Pillow's ``convert("RGB")``; ICC profiles are
  ignored, as in LLaVA's loader;
* the EXIF orientation tag is ignored by default, as in LLaVA's loader (the pixels are stored as
  the model would have seen them); ``--exif-transpose`` applies it instead;
* ``--max-side PX`` shrinks the longer side to PX keeping the aspect ratio (shorter side rounded,
  at least 1), with Pillow's antialiased bicubic filter (what CLIP's image processor uses); it
  never enlarges. JPEG sources are first decoded with DCT scaling (``Image.draft``) to no less
  than the target size, which is faster and changes the result only within resampling noise.

Record policy. Kept as they are (the converter never rewrites text):

* text-only records (no "image" key, or "image": null);
* multi-turn conversations;
* ``<image>`` anywhere in a turn (start, middle, end of the first human turn, or a later turn);
* a record with an image but no ``<image>`` in its text: LLaVA's loader prepends
  ``<image>\\n`` to the first human turn in that case, and our templates do the same.

Skipped, with the reason in ``skipped.jsonl``, the done markers, index.json and the summary:

==========================  ==================================================================
``bad_json``                a JSONL line that does not parse
``bad_record``              a record that is not a JSON object
``bad_conversation``        "conversations" missing, not a list, empty, a turn that is not an
                            object or lacks a string "from"/"value", or roles that do not
                            alternate human, gpt, human, ... starting with human (a conversation
                            may end on a human turn: evaluation prompts do)
``bad_image_field``         "image" present but not a non-empty string (multi-image lists are
                            not supported: one image per sample)
``image_token_without_image``  ``<image>`` in the text but no image
``multiple_image_tokens``   more than one ``<image>`` for the one image
``missing_image``           the image path is not a file under --images
``corrupt_image``           the file cannot be decoded (random bytes, truncated, ...)
``image_too_large``         beyond Pillow's decompression-bomb limit
``unsupported_image_mode``  a mode that cannot be turned into RGB
==========================  ==================================================================

Parallelism and resumption. Records are cut into chunks of ``--shard-size``; chunk i becomes shard
i, written whole by one worker of a ``multiprocessing.Pool`` (``imap`` over chunks), so the output
is identical for any ``--workers``. A shard is written to ``name.tar.tmp``, fsynced, and renamed
to ``name.tar``; only then is ``name.tar.done.json`` written (also via a temporary file and a
rename). A killed run therefore never leaves a partial file under a final name. A rerun deletes
``index.json`` and stale ``*.tmp`` files, keeps each shard whose done marker matches (same input
records, same options, same tar size) and rewrites the others; shards left over from an earlier
run with more chunks are deleted. Changes to image files on disk are not detected: delete the done
markers (or the output) to force a rebuild. Two converters must not share an output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from vtc.data.image import to_rgb as _to_rgb

# Bump when a change alters the bytes written for the same input: it invalidates done markers.
FORMAT_VERSION = 1
JPEG_QUALITY = 95
BACKGROUND = (255, 255, 255)  # transparency is composited on white (see module docstring)
IMAGE_TOKEN = "<image>"
KEY_ID_CHARS = 64
MIN_KEY_DIGITS = 9

INDEX_NAME = "index.json"
SKIPPED_NAME = "skipped.jsonl"
DONE_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"

# Reason codes, stable strings (tests and downstream reports match on them).
BAD_JSON = "bad_json"
BAD_RECORD = "bad_record"
BAD_CONVERSATION = "bad_conversation"
BAD_IMAGE_FIELD = "bad_image_field"
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"
MULTIPLE_IMAGE_TOKENS = "multiple_image_tokens"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_KEY_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_-]+")


class SkipSample(Exception):
    """A record that cannot become a sample. ``reason`` is one of the reason codes above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Options:
    """Per-run settings for the workers. ``max_side`` and ``exif_transpose`` decide a shard's
    bytes and enter its fingerprint; ``images_dir`` does not (moving the images is harmless)."""

    images_dir: str
    max_side: int | None = None
    exif_transpose: bool = False


# --------------------------------------------------------------------------- input


def load_records(path: str | os.PathLike) -> list[tuple[Any, str | None]]:
    """Read a LLaVA JSON list or a JSONL file. Returns ``(record, error)`` pairs in file order.

    ``error`` is None for a parsed record, or the parse error of a JSONL line (the record is then
    the line's first 200 characters), so that a bad line is reported, not fatal. A JSON document
    that is not a list, or a ``.json`` file that is not valid JSON or JSONL, raises ValueError.
    """
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        return [(r, None) for r in data]
    if stripped.startswith("{"):
        # JSONL, or a single JSON object spanning several lines (not supported: say so).
        items: list[tuple[Any, str | None]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), None))
            except json.JSONDecodeError as e:
                items.append((line[:200], f"line {lineno}: {e}"))
        if items and all(err is not None for _, err in items):
            raise ValueError(f"{path}: neither a JSON list nor JSONL")
        return items
    if not stripped:
        return []
    raise ValueError(f"{path}: expected a JSON list of records or JSONL, got {stripped[:40]!r}")


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


# --------------------------------------------------------------------------- validation


def validate_record(record: Any) -> str | None:
    """Check a record's structure. Returns its image path (None if text-only) or raises SkipSample."""
    if not isinstance(record, dict):
        raise SkipSample(BAD_RECORD, f"a {type(record).__name__}, not an object")
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise SkipSample(BAD_CONVERSATION, "'conversations' missing or not a list")
    if not conv:
        raise SkipSample(BAD_CONVERSATION, "empty conversation")
    n_tokens = 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise SkipSample(BAD_CONVERSATION, f"turn {i} is not an object")
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            raise SkipSample(BAD_CONVERSATION, f"turn {i} lacks a string 'from' or 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise SkipSample(BAD_CONVERSATION, f"turn {i} is from {role!r}, expected {expected!r}")
        n_tokens += value.count(IMAGE_TOKEN)

    image = record.get("image")
    if image is None:
        if n_tokens:
            raise SkipSample(IMAGE_TOKEN_WITHOUT_IMAGE, f"{n_tokens} {IMAGE_TOKEN} but no image")
        return None
    if not isinstance(image, str) or not image:
        raise SkipSample(BAD_IMAGE_FIELD, f"'image' is {type(image).__name__} {str(image)[:80]!r}")
    if n_tokens > 1:
        raise SkipSample(MULTIPLE_IMAGE_TOKENS, f"{n_tokens} {IMAGE_TOKEN} for one image")
    return image


# --------------------------------------------------------------------------- images


def to_rgb(im: Image.Image, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Any Pillow image to RGB, composited on white by default: the one policy of
    :func:`vtc.data.image.to_rgb` (the evaluation images' too), with the converter's background."""
    return _to_rgb(im, background)


def target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """Size after shrinking the longer side to ``max_side`` (never enlarging)."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side


def load_image(image: str, opts: Options) -> Image.Image:
    """Open ``image`` (relative to ``opts.images_dir``), fully decode, convert to RGB and resize
    per ``opts``, or raise SkipSample (whose detail names the relative path, not the full one)."""
    path = os.path.join(opts.images_dir, image)
    if not os.path.isfile(path):
        raise SkipSample(MISSING_IMAGE, f"no file {image!r} under the image directory")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning, odd-metadata chatter
        try:
            with Image.open(path) as src:
                # The final size comes from the stored size, not from draft()'s rounded one.
                size = target_size(src.width, src.height, opts.max_side)
                if size != src.size and src.format == "JPEG":
                    src.draft(None, size)  # DCT-domain downscale to >= the target size
                src.load()
                im = src
                if opts.exif_transpose:
                    im = ImageOps.exif_transpose(src)
                    if src.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 degrees
                        size = size[::-1]
                if im.width < 1 or im.height < 1:
                    raise SkipSample(CORRUPT_IMAGE, f"empty image {im.size}")
                try:
                    rgb = to_rgb(im)
                except Exception as e:
                    raise SkipSample(UNSUPPORTED_IMAGE_MODE,
                                     f"{im.mode}: {type(e).__name__}: {e}") from e
                if rgb is src:
                    rgb = src.copy()  # detach from the file about to be closed
        except SkipSample:
            raise
        except Image.DecompressionBombError as e:
            raise SkipSample(IMAGE_TOO_LARGE, str(e).replace(path, image)) from e
        except Exception as e:  # decoders raise all sorts on corrupt data
            raise SkipSample(CORRUPT_IMAGE,
                             f"{type(e).__name__}: {str(e).replace(path, image)}") from e
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb


def encode_jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def convert_record(record: Any, opts: Options) -> tuple[bytes | None, bytes]:
    """One record to ``(jpeg bytes or None, json bytes)``, or raise SkipSample."""
    image = validate_record(record)
    jpg = None
    if image is not None:
        jpg = encode_jpeg(load_image(image, opts))
    text = json.dumps(record, ensure_ascii=False).encode("utf-8")
    return jpg, text


# --------------------------------------------------------------------------- shards


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: str, data: bytes) -> None:
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
              "exif_transpose": opts.exif_transpose}
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
            jpg, text = convert_record(record, task.opts)
        except SkipSample as s:
            rid = _record_id(record)
            skipped.append({"index": position, "id": rid, "reason": s.reason, "detail": s.detail})
            continue
        key = make_key(position, _record_id(record), task.digits)
        if jpg is not None:
            members.append((f"{key}.jpg", jpg))
        members.append((f"{key}.json", text))
    tmp = final + TMP_SUFFIX
    size = write_tar(tmp, members)
    os.replace(tmp, final)
    marker = {"path": name, "count": sum(1 for n, _ in members if n.endswith(".json")),
              "records": len(task.items), "start": task.start, "bytes": size,
              "fingerprint": task.fingerprint, "skipped": skipped}
    _atomic_write(done, json.dumps(marker, ensure_ascii=False, indent=1).encode("utf-8"))
    return marker


def _read_valid_marker(out_dir: str, name: str, fingerprint: str) -> dict | None:
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


def _clean_output_dir(out_dir: str, prefix: str, n_shards: int) -> list[str]:
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


# --------------------------------------------------------------------------- driver


def convert(json_path: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
            shard_size: int = 1000, workers: int = 1, max_side: int | None = None,
            prefix: str = "shard", exif_transpose: bool = False, progress: bool = True,
            summary: bool = True) -> dict:
    """Convert a LLaVA JSON/JSONL file to webdataset shards in ``out_dir``. Returns index.json."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
    t0 = time.perf_counter()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    items = load_records(json_path)
    n = len(items)
    digits = max(MIN_KEY_DIGITS, len(str(max(n - 1, 0))))
    opts = Options(images_dir=os.fspath(images_dir), max_side=max_side,
                   exif_transpose=exif_transpose)
    n_shards = math.ceil(n / shard_size)
    _clean_output_dir(out_dir, prefix, n_shards)

    markers: dict[int, dict] = {}
    todo: list[ShardTask] = []
    for i in range(n_shards):
        start = i * shard_size
        chunk = items[start:start + shard_size]
        fp = chunk_fingerprint(chunk, start, opts, digits)
        marker = _read_valid_marker(out_dir, shard_name(prefix, i), fp)
        if marker is not None:
            markers[i] = marker
        else:
            todo.append(ShardTask(i, start, chunk, out_dir, prefix, digits, fp, opts))

    reused = sum(m["records"] for m in markers.values())
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, initial=reused, unit="sample", desc="convert", dynamic_ncols=True)
    try:
        n_proc = min(workers, len(todo))
        if n_proc <= 1:
            for task in todo:
                markers[task.index] = write_shard(task)
                if bar is not None:
                    bar.update(markers[task.index]["records"])
        else:
            import multiprocessing as mp

            pool = mp.get_context().Pool(n_proc)
            try:
                # imap keeps chunk i -> shard i; each worker writes whole shards.
                for task, marker in zip(todo, pool.imap(write_shard, todo, chunksize=1)):
                    markers[task.index] = marker
                    if bar is not None:
                        bar.update(marker["records"])
                pool.close()
            except BaseException:
                pool.terminate()  # a failed shard or Ctrl-C: stop the others, .tmp files remain
                raise
            finally:
                pool.join()
    finally:
        if bar is not None:
            bar.close()

    shards = [{"path": markers[i]["path"], "count": markers[i]["count"]} for i in range(n_shards)]
    skipped = sorted((s for m in markers.values() for s in m["skipped"]), key=lambda s: s["index"])
    reasons = Counter(s["reason"] for s in skipped)
    total = sum(s["count"] for s in shards)
    _atomic_write(os.path.join(out_dir, SKIPPED_NAME),
                  "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped).encode())
    index = {"shards": shards, "total": total, "skipped": len(skipped), "records": n,
             "skipped_by_reason": dict(sorted(reasons.items())),
             "options": {"shard_size": shard_size, "prefix": prefix, "jpeg_quality": JPEG_QUALITY,
                         **{k: v for k, v in asdict(opts).items() if k != "images_dir"}},
             "format_version": FORMAT_VERSION}
    _atomic_write(os.path.join(out_dir, INDEX_NAME),
                  json.dumps(index, ensure_ascii=False, indent=1).encode("utf-8"))
    elapsed = time.perf_counter() - t0
    if summary:
        print(format_summary(index, out_dir, elapsed, resumed=n_shards - len(todo)))
    return index


def format_summary(index: dict, out_dir: str, elapsed: float, resumed: int = 0) -> str:
    n = index["records"]
    lines = [f"converted {index['total']} of {n} records into {len(index['shards'])} shards in "
             f"{out_dir} ({index['skipped']} skipped) in {elapsed:.1f} s, "
             f"{n / max(elapsed, 1e-9):.1f} records/s"
             + (f"; {resumed} shards reused from an earlier run" if resumed else "")]
    if index["skipped_by_reason"]:
        lines.append("skipped by reason:")
        width = max(len(r) for r in index["skipped_by_reason"])
        for reason, count in sorted(index["skipped_by_reason"].items(), key=lambda kv: -kv[1]):
            lines.append(f"  {reason:<{width}}  {count}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- benchmark


def _benchmark_images(image_size: tuple[int, int]) -> list[Image.Image]:
    """Real photos from scikit-learn (offline) resized to ``image_size``; synthetic if absent."""
    try:
        from sklearn.datasets import load_sample_images

        photos = [Image.fromarray(a) for a in load_sample_images().images]
    except Exception:  # scikit-learn missing: smooth gradients with some edges
        yy, xx = np.mgrid[0:image_size[1], 0:image_size[0]]
        photos = []
        for k in range(2):
            a = np.stack([(xx * (3 + k)) % 256, (yy * 2) % 256, ((xx + yy) // (2 + k)) % 256], -1)
            photos.append(Image.fromarray(a.astype(np.uint8)))
    out = []
    for p in photos:
        p = p.resize(image_size, Image.Resampling.BICUBIC)
        out += [p, p.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return out


def benchmark_convert(n: int, workers: int, *, image_size: tuple[int, int] = (640, 480),
                      max_side: int | None = None, shard_size: int | None = None,
                      tmp_dir: str | None = None) -> float:
    """Converter throughput in samples/s, end to end (pool start-up included, no progress bar).

    Builds ``n`` LLaVA records over a few 640x480 JPEG photos (COCO's typical size; quality 90),
    writes them to a temporary directory and times :func:`convert` alone. ``shard_size`` defaults
    to about four chunks per worker (at most 1000) so every worker has work.
    """
    if n < 1 or workers < 1:
        raise ValueError("n and workers must be >= 1")
    if shard_size is None:
        shard_size = max(1, min(1000, math.ceil(n / (4 * workers))))
    with tempfile.TemporaryDirectory(dir=tmp_dir, prefix="vtc-bench-convert-") as tmp:
        img_dir = os.path.join(tmp, "images")
        os.makedirs(img_dir)
        names = []
        for k, im in enumerate(_benchmark_images(image_size)):
            names.append(f"img{k}.jpg")
            im.save(os.path.join(img_dir, names[-1]), quality=90)
        records = [{"id": f"bench-{i}", "image": names[i % len(names)],
                    "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                      {"from": "gpt", "value": "A photograph." * 5}]}
                   for i in range(n)]
        json_path = os.path.join(tmp, "data.json")
        with open(json_path, "w") as f:
            json.dump(records, f)
        out = os.path.join(tmp, "out")
        t0 = time.perf_counter()
        index = convert(json_path, img_dir, out, shard_size=shard_size, workers=workers,
                        max_side=max_side, progress=False, summary=False)
        elapsed = time.perf_counter() - t0
    if index["total"] != n:
        raise RuntimeError(f"benchmark converted {index['total']} of {n} samples")
    return n / elapsed


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.data.convert",
                                description="Convert LLaVA-format JSON/JSONL + images to webdataset "
                                            "shards (see the module docstring for the layout).")
    p.add_argument("--json", required=True, help="LLaVA JSON list or JSONL file")
    p.add_argument("--images", required=True, help="directory the records' 'image' paths are under")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--shard-size", type=int, default=1000, help="input records per shard")
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink images so the longer side is at most this many pixels")
    p.add_argument("--prefix", default="shard", help="shard name prefix: PREFIX-000000.tar")
    p.add_argument("--exif-transpose", action="store_true",
                   help="apply the EXIF orientation tag (LLaVA's loader does not)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    try:
        convert(a.json, a.images, a.out, shard_size=a.shard_size, workers=a.workers,
                max_side=a.max_side, prefix=a.prefix, exif_transpose=a.exif_transpose,
                progress=not a.quiet)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
