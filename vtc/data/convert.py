"""Convert LLaVA-format conversation data into webdataset shards: the driver and its CLI.

Usage::

    python -m vtc.data.convert --json llava_v1_5_mix665k.json --images /data/images \\
        --out /data/shards/mix665k [--shard-size 1000] [--workers 8] [--max-side 1024] \\
        [--prefix mix665k] [--exif-transpose] [--videos /data/videos] [--frames 8] [--quiet]

Input: a JSON list of records, or JSONL (one record per line), each
``{"id", "image"? (a path relative to --images, or a list of them), "video"? (a path relative to
--videos, default --images, or a list), "conversations": [{"from", "value"}, ...], ...}``. A
video is stored as ``--frames`` frames sampled uniformly over its length (docs/video.md).

Output (everything in ``--out``)::

    {prefix}-000000.tar            shard i holds the kept samples of input records
    {prefix}-000001.tar            [i * shard_size, (i + 1) * shard_size), in input order
    ...
    {prefix}-000000.tar.done.json  per-shard completion marker: count, skipped records, fingerprint
    skipped.jsonl                  one line per skipped record: {"index", "id", "reason", "detail"}
    index.json                     {"shards": [{"path", "count"}], "total", "skipped", ...};
                                   written last: its presence means the conversion is complete

The parts, each documented where it lives: which records are kept and why the others are
skipped (:mod:`vtc.data.convert_records`), how images are re-encoded
(:mod:`vtc.data.convert_images`), which frames of a video are kept (:mod:`vtc.data.video_frames`,
:mod:`vtc.data.convert_videos`), the samples' keys and the shards' bytes and done markers
(:mod:`vtc.data.convert_shards`). :mod:`vtc.data.convert_bench` times :func:`convert`.

Parallelism and resumption. Records are cut into chunks of ``--shard-size``; chunk i becomes shard
i, written whole by one worker of a ``multiprocessing.Pool`` (``imap`` over chunks), so the output
is identical for any ``--workers``. A killed run never leaves a partial file under a final name
(each shard and marker is written to a temporary file and renamed). A rerun deletes
``index.json`` and stale ``*.tmp`` files, keeps each shard whose done marker matches (same input
records, same options, same tar size) and rewrites the others; shards left over from an earlier
run with more chunks are deleted. Changes to image or video files on disk are not detected: delete
the done markers (or the output) to force a rebuild. Two converters must not share an output
directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict
from typing import Sequence

from vtc.data.convert_images import JPEG_QUALITY, Options
from vtc.data.convert_records import load_records
from vtc.data.convert_shards import (
    FORMAT_VERSION,
    INDEX_NAME,
    MIN_KEY_DIGITS,
    SKIPPED_NAME,
    ShardTask,
    atomic_write,
    chunk_fingerprint,
    clean_output_dir,
    read_valid_marker,
    shard_name,
    write_shard,
)
from vtc.data.convert_videos import MAX_FRAMES

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def convert(json_path: str | os.PathLike, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
            shard_size: int = 1000, workers: int = 1, max_side: int | None = None,
            prefix: str = "shard", exif_transpose: bool = False, progress: bool = True,
            summary: bool = True, frames: int = 8,
            videos_dir: str | os.PathLike | None = None) -> dict:
    """Convert a LLaVA JSON/JSONL file to webdataset shards in ``out_dir``. Returns index.json.

    ``frames``: frames kept per video; ``videos_dir``: where video paths are relative to
    (default ``images_dir``)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if not 1 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be in 1..{MAX_FRAMES}, got {frames}")
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"prefix must match {_PREFIX_RE.pattern}, got {prefix!r}")
    t0 = time.perf_counter()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    items = load_records(json_path)
    n = len(items)
    digits = max(MIN_KEY_DIGITS, len(str(max(n - 1, 0))))
    opts = Options(images_dir=os.fspath(images_dir), max_side=max_side,
                   exif_transpose=exif_transpose, frames=frames,
                   videos_dir=None if videos_dir is None else os.fspath(videos_dir))
    n_shards = math.ceil(n / shard_size)
    clean_output_dir(out_dir, prefix, n_shards)

    markers: dict[int, dict] = {}
    todo: list[ShardTask] = []
    for i in range(n_shards):
        start = i * shard_size
        chunk = items[start:start + shard_size]
        fp = chunk_fingerprint(chunk, start, opts, digits)
        marker = read_valid_marker(out_dir, shard_name(prefix, i), fp)
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
    atomic_write(os.path.join(out_dir, SKIPPED_NAME),
                  "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped).encode())
    index = {"shards": shards, "total": total, "skipped": len(skipped), "records": n,
             "skipped_by_reason": dict(sorted(reasons.items())),
             "options": {"shard_size": shard_size, "prefix": prefix, "jpeg_quality": JPEG_QUALITY,
                         **{k: v for k, v in asdict(opts).items()
                            if k not in ("images_dir", "videos_dir")}},
             "format_version": FORMAT_VERSION}
    atomic_write(os.path.join(out_dir, INDEX_NAME),
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vtc.data.convert",
                                description="Convert LLaVA-format JSON/JSONL + images to webdataset "
                                            "shards (see the module docstring for the layout).")
    p.add_argument("--json", required=True, help="LLaVA JSON list or JSONL file")
    p.add_argument("--images", required=True, help="directory the records' 'image' paths are under")
    p.add_argument("--videos", default=None,
                   help="directory the records' 'video' paths are under (default: --images)")
    p.add_argument("--frames", type=int, default=8,
                   help="frames sampled uniformly over each video (Video-LLaVA's rule)")
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
                progress=not a.quiet, frames=a.frames, videos_dir=a.videos)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
