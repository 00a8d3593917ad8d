"""Digit-grid VQA on disk: the synthetic benchmark (:mod:`vtc.synthetic.world`) written as
shards, with its tokenizer and prior statistics, and cached so that a run builds it only once.

Layout written by :func:`generate` (``out_dir``)::

    train/train-00000.tar ... index.json   {"shards": [{"path", "count"}], "total"}
    val/...  test/...
    tokenizer/                              build_tiny_tokenizer over every text generated
    meta.json                               parameters and prior statistics
    DONE                                    written last

Shard members are ``{key}.jpg`` and ``{key}.json`` (key ``{split}_{index:06d}``, also the
``id``), in plain USTAR tar files with mtime 0 and no owner names: the same seed gives
byte-identical shards, whatever ``workers`` is (every shard has its own numpy Generator seeded
with ``(seed, split, shard)``). Generation happens in a temporary sibling directory that is
renamed into place at the end, so a killed run leaves nothing that looks complete.

CLI: ``python -m vtc.synthetic.shards --out DIR [--seed 0] [--train 20000 --val 500 --test 500]
[--image-size 112] [--grid 3] [--train-turns 1] [--train-readout 0] [--shard-size 2000] [--workers N]
[--force]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from vtc.data.tokenizer import build_tiny_tokenizer
from vtc.synthetic.render import make_sample
from vtc.synthetic.world import SPLITS, question_mix, source_pools

# Seeds each shard's generators with (seed, split code, shard): shards are independent of workers.
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_shard(job: dict) -> dict:
    """Worker: write one shard; returns answer counts per type and the texts seen."""
    split, shard, start, count = job["split"], job["shard"], job["start"], job["count"]
    grid, image_size = job["grid"], job["image_size"]
    pool = source_pools(job["seed"])[split]
    rng = np.random.default_rng([job["seed"], _SPLIT_CODE[split], shard])
    turn_rng = np.random.default_rng([job["seed"], _SPLIT_CODE[split], shard, 1])
    turns, readout = job.get("turns", 1), job.get("readout", 0)
    mix = question_mix(grid)
    types, probs = list(mix), np.array(list(mix.values()))
    answers: dict[str, Counter] = {t: Counter() for t in types}
    texts: set[str] = set()
    with tarfile.open(job["path"], "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(start, start + count):
            key = f"{split}_{i:06d}"
            qtype = types[int(rng.choice(len(types), p=probs))]
            jpg, record = make_sample(rng, key, qtype, grid, pool, image_size, turns, turn_rng, readout)
            _add_member(tar, f"{key}.jpg", jpg)
            _add_member(tar, f"{key}.json", json.dumps(record).encode("utf-8"))
            answers[qtype][record["conversations"][1]["value"]] += 1
            texts.update(turn["value"] for turn in record["conversations"])
    return {"split": split, "answers": {t: dict(c) for t, c in answers.items()}, "texts": sorted(texts)}


def prior_stats(answers: dict[str, Counter]) -> dict:
    """Per type ``{n, majority, prior}`` and ``overall`` (type-aware majority baseline)."""
    out: dict = {"types": {}}
    hit = total = 0
    for qtype, counter in sorted(answers.items()):
        n = sum(counter.values())
        if not n:
            continue
        majority, m = max(sorted(counter.items()), key=lambda kv: kv[1])
        out["types"][qtype] = {"n": n, "majority": majority, "prior": m / n}
        hit, total = hit + m, total + n
    out["n"] = total
    out["overall_prior"] = hit / total if total else 0.0
    return out


def _print_stats(stats: dict) -> None:
    for split, s in stats["splits"].items():
        if not s["n"]:
            continue
        print(f"[synthetic] {split}: {s['n']} samples, prior of the majority answer per question type:")
        for qtype, t in s["types"].items():
            print(f"  {qtype:<9} n={t['n']:<6} majority={t['majority']!r:<7} prior={100 * t['prior']:.1f}%")
        print(f"  overall   prior={100 * s['overall_prior']:.1f}%")
    if "test_prior_from_train_majority" in stats:
        print(f"[synthetic] test accuracy of train's majority answers: {100 * stats['test_prior_from_train_majority']:.1f}%")


def _replaceable(path: Path) -> bool:
    return path.is_dir() and ((path / "DONE").exists() or (path / "meta.json").exists() or not any(path.iterdir()))


def generate(
    out_dir,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 500,
    n_test: int = 500,
    image_size: int = 112,
    grid: int = 3,
    shard_size: int = 2000,
    workers: int | None = None,
    verbose: bool = True,
    train_turns: int = 1,
    train_readout: int = 0,
) -> dict:
    """Generate the benchmark into ``out_dir`` (replacing an earlier generated one); see module doc.

    ``train_turns``: question/answer rounds per training conversation (val and test keep one, the
    benchmark's format); priors count the first question of each sample only.
    ``train_readout``: how many of a training conversation's follow-up rounds read a whole row or
    column out ("What digits are in column 2?" -> "3 none 7"); 0 .. train_turns - 1. They teach
    the text-to-grid mapping that cell and relation questions need; val/test never ask them.

    Returns the statistics also saved in ``meta.json``: ``params``, ``splits[split]`` =
    ``{n, overall_prior, types: {qtype: {n, majority, prior}}}``,
    ``test_prior_from_train_majority`` and ``seconds``.
    """
    if int(train_turns) < 1:
        raise ValueError(f"train_turns must be >= 1, got {train_turns}")
    if not 0 <= int(train_readout) < int(train_turns):
        raise ValueError(f"train_readout must be in 0..train_turns-1 = 0..{int(train_turns) - 1} (readouts are "
                         f"follow-up rounds), got {train_readout}")
    if grid < 1 or image_size < 4 * grid or shard_size < 1:
        raise ValueError(f"need grid >= 1, image_size >= 4*grid, shard_size >= 1 (got {grid}, {image_size}, {shard_size})")
    sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(sizes.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    params = {"seed": int(seed), "n_train": sizes["train"], "n_val": sizes["val"], "n_test": sizes["test"],
              "image_size": int(image_size), "grid": int(grid), "shard_size": int(shard_size),
              "train_turns": int(train_turns), "train_readout": int(train_readout)}
    out, tmp, t0 = start_set(out_dir)
    try:
        jobs, index = [], {}
        for split in SPLITS:
            (tmp / split).mkdir()
            shards = []
            for shard, start in enumerate(range(0, sizes[split], shard_size)):
                count = min(shard_size, sizes[split] - start)
                name = f"{split}-{shard:05d}.tar"
                shards.append({"path": name, "count": count})
                jobs.append({"split": split, "shard": shard, "start": start, "count": count,
                             "path": str(tmp / split / name), "seed": int(seed), "grid": int(grid),
                             "image_size": int(image_size),
                             "turns": int(train_turns) if split == "train" else 1,
                             "readout": int(train_readout) if split == "train" else 0})
            index[split] = {"shards": shards, "total": sizes[split]}
        workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, int(workers))
        workers = min(workers, max(1, len(jobs)))
        if workers == 1:
            results = [_write_shard(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                results = list(ex.map(_write_shard, jobs))
        answers = {s: {t: Counter() for t in question_mix(grid)} for s in SPLITS}
        texts: set[str] = set()
        for res in results:
            for qtype, counts in res["answers"].items():
                answers[res["split"]][qtype].update(counts)
            texts.update(res["texts"])
        for split in SPLITS:
            (tmp / split / "index.json").write_text(json.dumps(index[split], indent=1) + "\n")

        build_tiny_tokenizer(sorted(texts), tmp / "tokenizer")
        stats: dict = {"params": params, "question_mix": question_mix(grid),
                       "splits": {s: prior_stats(answers[s]) for s in SPLITS}}
        finish_set(tmp, out, stats, answers, sizes["test"], t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _print_stats(stats)
        print(f"[synthetic] wrote {out} in {stats['seconds']:.1f} s")
    return stats


def start_set(out_dir) -> tuple[Path, Path, float]:
    """(out, a fresh temporary folder beside it, start time) for generating a set (images or
    videos); refuses an ``out`` that holds something other than a generated benchmark."""
    out = Path(out_dir)
    if out.exists() and not _replaceable(out):
        raise FileExistsError(f"{out} exists and does not look like a generated benchmark; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    return out, tmp, t0


def finish_set(tmp: Path, out: Path, stats: dict, answers: dict, n_test: int, t0: float) -> None:
    """Complete a generated set (images or videos) built in ``tmp``: the test prior of the train
    majority answers and the wall time into ``stats``, ``meta.json`` and ``DONE`` written last, then
    ``tmp`` renamed to ``out`` (an earlier generated ``out`` is swapped out, then deleted)."""
    train_types = stats["splits"]["train"]["types"]
    if n_test and train_types:
        hit = sum(answers["test"][q][train_types[q]["majority"]] for q in train_types)
        stats["test_prior_from_train_majority"] = hit / n_test
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    (tmp / "meta.json").write_text(json.dumps(stats, indent=1) + "\n")
    (tmp / "DONE").write_text("ok\n")
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / "old")
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def ensure_synthetic(out_dir, **kw) -> dict:
    """Generate into ``out_dir`` only when ``out_dir/DONE`` is missing; returns the statistics.

    When the benchmark exists, the parameters given (``seed``, ``n_train``, ...) must match the
    ones it was made with, else ``ValueError`` (delete the folder or pick another one).
    Concurrent callers are safe: each generates in its own temporary folder and the loser of the
    final rename keeps the winner's copy.
    """
    return ensure_built(Path(out_dir), generate, kw, kind=None)


def ensure_built(out: Path, build, params: dict, kind: str | None) -> dict:
    """The one policy of both synthetic sets (images, videos): ``build(out, **params)`` only when
    ``out/DONE`` is missing; an existing set must be of ``kind`` (``meta.json``'s params.kind,
    absent for the image set) and made with ``params``, else ``ValueError``; a concurrent caller
    that lost the final rename returns the winner's statistics."""
    if (out / "DONE").exists():
        meta = json.loads((out / "meta.json").read_text())
        if meta["params"].get("kind") != kind:
            raise ValueError(f"{out} holds a synthetic {meta['params'].get('kind') or 'image'} set, "
                             f"not a{' ' + kind if kind else 'n image'} one")
        wanted = {k: v for k, v in params.items() if k in meta["params"]}
        diff = {k: (meta["params"][k], v) for k, v in wanted.items() if meta["params"][k] != v}
        if diff:
            raise ValueError(f"{out} was generated with other parameters (have, want): {diff}")
        return meta
    try:
        return build(out, **params)
    except OSError:
        if (out / "DONE").exists():  # another process finished first
            return json.loads((out / "meta.json").read_text())
        raise


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vtc.synthetic.shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--train-turns", type=int, default=1, help="question rounds per training conversation")
    p.add_argument("--train-readout", type=int, default=0,
                   help="of those, follow-up rounds that read a whole row or column out")
    p.add_argument("--workers", type=int, default=None, help="processes (default: cores, at most 8)")
    p.add_argument("--force", action="store_true", help="regenerate even when DONE exists")
    a = p.parse_args(argv)
    kw = dict(seed=a.seed, n_train=a.train, n_val=a.val, n_test=a.test, image_size=a.image_size,
              grid=a.grid, shard_size=a.shard_size, workers=a.workers, train_turns=a.train_turns,
              train_readout=a.train_readout)
    if a.force or not (Path(a.out) / "DONE").exists():
        return generate(a.out, **kw)
    stats = ensure_synthetic(a.out, **{k: v for k, v in kw.items() if k != "workers"})
    print(f"[synthetic] {a.out} already complete (DONE present); statistics from meta.json:")
    _print_stats(stats)
    return stats


if __name__ == "__main__":
    main()
