"""The converter's throughput benchmark (``vtc bench loader`` reports it), and its test images.

Separate from the converter because nothing in a conversion needs it: it builds records and
images of its own, then times :func:`vtc.data.convert.convert` end to end.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vtc.data.convert import convert


def benchmark_images(image_size: tuple[int, int]) -> list[Image.Image]:
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
        for k, im in enumerate(benchmark_images(image_size)):
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
