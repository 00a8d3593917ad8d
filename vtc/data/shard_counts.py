"""Samples per shard, for the training epoch's length and the shard weights of resampling.

Separate from the stream stages: counting happens once, in the main process, before any stream
is built (:meth:`vtc.data.datamodule.VTCDataModule.setup`), and reads tar headers only.

Counts of local shards come from an ``index.json`` beside them (as written by
:mod:`vtc.data.convert` and :mod:`vtc.synthetic.shards`) when it lists them, else from scanning
the tar files; remote shards cannot be counted (then the datamodule needs ``train_samples``).
"""

from __future__ import annotations

import json
import tarfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from vtc.data.decode import keep_member


def _local_path(url: str) -> Path | None:
    if url.startswith("file:"):
        url = url[5:]
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def _member_key(name: str) -> str:
    """webdataset's sample key of a tar member: its folder plus its name up to the first dot."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def _scan(path: Path) -> int:
    """Samples in one local tar (keys with an image or text member); a damaged tar counts what
    can be read before the damage, with a warning."""
    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and keep_member(m.name):
                    keys.add(_member_key(m.name))
    except (tarfile.TarError, OSError) as e:
        warnings.warn(f"vtc.data: {path} is damaged ({e}); counted the {len(keys)} samples before the damage")
    return len(keys)


def shard_counts(urls: Sequence[str]) -> list[int] | None:
    """Samples per local shard: from ``index.json`` beside them when it lists them, else by scanning;
    None when a shard is remote."""
    paths = [_local_path(u) for u in urls]
    if any(p is None for p in paths):
        return None
    counts: dict[Path, int] = {}
    for index_file in {p.parent / "index.json" for p in paths}:
        if index_file.exists():
            for shard in json.loads(index_file.read_text()).get("shards", []):
                counts[(index_file.parent / shard["path"]).resolve()] = int(shard["count"])
    out = []
    for p in paths:
        rp = p.resolve()
        out.append(counts[rp] if rp in counts else _scan(p))
    return out
