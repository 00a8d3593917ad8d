"""Digit-grid VQA: a small synthetic benchmark that needs the image and its fine detail.

The task. Each image is a ``grid`` x ``grid`` board on an ``image_size`` px square canvas. A
cell holds one real handwritten digit from sklearn's ``load_digits()`` (8x8, 0..16 levels,
upscaled bicubically to a random 80-95% of the cell (``GLYPH_MIN``..``GLYPH_MAX``), placed at a random offset inside the cell,
with its own intensity) or nothing (probability ``P_EMPTY`` per cell). The whole board is either
light digits on a dark background (``P_DARK``) or dark digits on a light one, slightly tinted, with mild
pixel noise; it is saved as a JPEG (quality 90, 4:4:4). Digits never cross their cell.

Cell ``(r, c)`` (0-based) covers pixel rows ``[round(r*S/g), round((r+1)*S/g))`` and columns
``[round(c*S/g), round((c+1)*S/g))`` of the ``S`` px canvas (:func:`cell_edges`). The JSON's
``grid`` gives the digit in every cell (-1 empty); an encoder pre-training stage can label each
patch with the digit of the cell under its centre.

One question per image, answered with a single word (questions say rows/columns 1-based):

``cell``      "What digit is in row r, column c?" -> ``"0"``..``"9"`` or ``"none"`` (empty cell).
``count``     "How many 7s are there?" -> ``"0"``..``"K"``, ``K = min(5, grid*grid)``; the board
              is drawn for the question: the count is uniform on 0..K, the other cells hold
              other digits or nothing, so the answer cannot be guessed from priors.
``relation``  "What digit is to the right of / to the left of / below / above the 4?" -> the
              neighbour's digit or ``"none"``; asked only when the anchor digit is unique on the
              board and the neighbour cell exists.

Training conversations may hold more rounds about the same board (``train_turns``), and the last
``train_readout`` of them read a whole row or column out: "What digits are in column 2?" ->
``"3 none 7"`` (top to bottom; a row left to right). Readouts are training data only, like the
captions and grounding data of LLaVA's instruction mix; val and test ask the three types above.

Mix: ``QUESTION_MIX`` (cell 40%, count 30%, relation 30%; relation needs grid >= 2). The
*prior* of a question type is the accuracy of always giving that type's most frequent answer;
expected priors are ~12% (cell, relation) and ~17% (count), ~13-14% overall, and the generator
prints the measured ones. The human turn is ``"<image>\\n{question}\\nAnswer the question using
a single word or phrase."`` (LLaVA-1.5's short-answer suffix).

Splits. The 1797 source digits are split per class, by index, with the seed, into disjoint pools
(70% train, 15% val, 15% test): no handwritten digit seen in training appears in val or test.

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

CLI: ``python -m vtc.data.synthetic --out DIR [--seed 0] [--train 20000 --val 500 --test 500]
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
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
POOL_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
P_EMPTY = 0.12
# Glyph size as a fraction of its cell, and the share of light-on-dark boards. Smaller glyphs and
# mixed polarity made the tiny ViT's pre-training stage far slower to converge (26% patch
# accuracy after 600 steps at 0.6-0.9 and 50/50), so digits nearly fill their cells and boards
# are mostly light-on-dark, as sklearn's digits are.
GLYPH_MIN, GLYPH_MAX = 0.8, 0.95
P_DARK = 0.8
QUESTION_MIX = {"cell": 0.4, "count": 0.3, "relation": 0.3}
MAX_COUNT = 5
JPEG_QUALITY = 90
SUFFIX = "Answer the question using a single word or phrase."
DIRECTIONS = {  # name -> (d_row, d_col, phrase)
    "right": (0, 1, "to the right of"),
    "left": (0, -1, "to the left of"),
    "below": (1, 0, "below"),
    "above": (-1, 0, "above"),
}
EMPTY = -1
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_POOL_SEED_TAG = 7919


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def source_pools(seed: int) -> dict[str, dict[int, np.ndarray]]:
    """Disjoint per-split pools of ``load_digits()`` indices, per class: ``{split: {digit: idx}}``."""
    _, labels = _digits()
    rng = np.random.default_rng([seed, _POOL_SEED_TAG])
    pools: dict[str, dict[int, np.ndarray]] = {s: {} for s in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_val = int(round(len(idx) * POOL_FRACTIONS["val"]))
        n_test = int(round(len(idx) * POOL_FRACTIONS["test"]))
        pools["val"][digit] = np.sort(idx[:n_val])
        pools["test"][digit] = np.sort(idx[n_val : n_val + n_test])
        pools["train"][digit] = np.sort(idx[n_val + n_test :])
    return pools


def cell_edges(image_size: int, grid: int) -> list[int]:
    """Pixel boundaries of the cells along one axis: cell i spans ``[e[i], e[i+1])``."""
    return [int(round(i * image_size / grid)) for i in range(grid + 1)]


def question_mix(grid: int) -> dict[str, float]:
    mix = {k: v for k, v in QUESTION_MIX.items() if grid >= 2 or k != "relation"}
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items()}


# ----------------------------------------------------------------------------- boards


def _random_board(rng: np.random.Generator, grid: int) -> np.ndarray:
    board = rng.integers(0, 10, size=(grid, grid))
    board[rng.random((grid, grid)) < P_EMPTY] = EMPTY
    return board


def _cell_question(rng, grid):
    board = _random_board(rng, grid)
    r, c = (int(x) for x in rng.integers(0, grid, size=2))
    v = int(board[r, c])
    return board, f"What digit is in row {r + 1}, column {c + 1}?", "none" if v == EMPTY else str(v)


def _count_question(rng, grid):
    digit = int(rng.integers(0, 10))
    k = int(rng.integers(0, min(MAX_COUNT, grid * grid) + 1))
    others = rng.integers(0, 9, size=grid * grid)
    others[others >= digit] += 1  # uniform over the nine other digits
    others[rng.random(grid * grid) < P_EMPTY] = EMPTY
    others[rng.permutation(grid * grid)[:k]] = digit
    return others.reshape(grid, grid), f"How many {digit}s are there?", str(k)


def _relation_question(rng, grid):
    names = list(DIRECTIONS)
    while True:
        board = _random_board(rng, grid)
        name = names[int(rng.integers(0, len(names)))]
        dr, dc, phrase = DIRECTIONS[name]
        counts = Counter(int(v) for v in board.ravel())
        cands = [
            (r, c)
            for r in range(grid)
            for c in range(grid)
            if board[r, c] != EMPTY
            and counts[int(board[r, c])] == 1
            and 0 <= r + dr < grid
            and 0 <= c + dc < grid
        ]
        if cands:
            break
    r, c = cands[int(rng.integers(0, len(cands)))]
    v = int(board[r + dr, c + dc])
    return board, f"What digit is {phrase} the {int(board[r, c])}?", "none" if v == EMPTY else str(v)


_QUESTIONS = {"cell": _cell_question, "count": _count_question, "relation": _relation_question}


def _ask_about(rng, board: np.ndarray, qtype: str) -> tuple[str, str] | None:
    """A question of ``qtype`` about an existing ``board`` (None: no relation anchor on it)."""
    grid = board.shape[0]
    if qtype == "cell":
        r, c = (int(x) for x in rng.integers(0, grid, size=2))
        v = int(board[r, c])
        return f"What digit is in row {r + 1}, column {c + 1}?", "none" if v == EMPTY else str(v)
    if qtype == "count":
        digit = int(rng.integers(0, 10))
        return f"How many {digit}s are there?", str(int((board == digit).sum()))
    counts = Counter(int(v) for v in board.ravel())
    cands = [(r, c, name) for name, (dr, dc, _) in DIRECTIONS.items() for r in range(grid) for c in range(grid)
             if board[r, c] != EMPTY and counts[int(board[r, c])] == 1 and 0 <= r + dr < grid and 0 <= c + dc < grid]
    if not cands:
        return None
    r, c, name = cands[int(rng.integers(0, len(cands)))]
    dr, dc, phrase = DIRECTIONS[name]
    v = int(board[r + dr, c + dc])
    return f"What digit is {phrase} the {int(board[r, c])}?", "none" if v == EMPTY else str(v)


def _readout_question(rng, board: np.ndarray) -> tuple[str, str]:
    """A whole row or column read out: "What digits are in column 2?" -> "3 none 7" (top to
    bottom; a row left to right)."""
    i = int(rng.integers(0, board.shape[0]))
    if rng.random() < 0.5:
        question, line = f"What digits are in column {i + 1}?", board[:, i]
    else:
        question, line = f"What digits are in row {i + 1}?", board[i, :]
    return question, " ".join("none" if int(v) == EMPTY else str(int(v)) for v in line)


def follow_up_turns(rng, board: np.ndarray, first_question: str, n: int, mix: dict[str, float],
                    readout: int = 0) -> list[dict]:
    """``n`` more question/answer rounds about the same board (no question repeated), as
    LLaVA-1.5's instruction mix groups the VQA questions of one image into one multi-turn
    conversation: ``n - readout`` of the benchmark's types (drawn from ``mix``), then ``readout``
    row/column readouts (:func:`_readout_question`; training data only, never asked in val/test)."""
    types, probs = list(mix), np.array(list(mix.values()))
    asked, turns = {first_question}, []

    def add(qa) -> None:
        if qa is not None and qa[0] not in asked:
            asked.add(qa[0])
            turns.extend([{"from": "human", "value": f"{qa[0]}\n{SUFFIX}"}, {"from": "gpt", "value": qa[1]}])

    for _ in range(8 * (n - readout)):
        if len(turns) == 2 * (n - readout):
            break
        add(_ask_about(rng, board, types[int(rng.choice(len(types), p=probs))]))
    target = len(turns) + 2 * readout
    for _ in range(8 * readout):
        if len(turns) == target:
            break
        add(_readout_question(rng, board))
    return turns


def render_board(
    rng: np.random.Generator, board: np.ndarray, pool: dict[int, np.ndarray], image_size: int
) -> Image.Image:
    """Draw ``board`` (digits, -1 empty) with digits drawn from ``pool``; returns an RGB image."""
    images, _ = _digits()
    grid = board.shape[0]
    edges = cell_edges(image_size, grid)
    alpha = np.zeros((image_size, image_size), np.float32)
    for r in range(grid):
        for c in range(grid):
            digit = int(board[r, c])
            if digit == EMPTY:
                continue
            src = images[int(rng.choice(pool[digit]))]
            ch, cw = edges[r + 1] - edges[r], edges[c + 1] - edges[c]
            side = min(ch, cw)
            bh = max(4, int(round(side * rng.uniform(GLYPH_MIN, GLYPH_MAX))))
            bw = max(4, min(cw, int(round(bh * rng.uniform(0.85, 1.0)))))
            y0 = edges[r] + int(rng.integers(0, ch - bh + 1))
            x0 = edges[c] + int(rng.integers(0, cw - bw + 1))
            glyph = Image.fromarray(np.uint8(np.rint(src * 255)), mode="L").resize(
                (bw, bh), Image.Resampling.BICUBIC
            )
            a = np.asarray(glyph, np.float32) / 255.0 * np.float32(rng.uniform(0.8, 1.0))
            alpha[y0 : y0 + bh, x0 : x0 + bw] = a
    dark = rng.random() < P_DARK
    lo, hi = (rng.uniform(0, 60), rng.uniform(185, 255))
    bg_level, fg_level = (lo, hi) if dark else (hi, lo)
    bg = np.clip(bg_level + rng.uniform(-15, 15, size=3), 0, 255).astype(np.float32)
    fg = np.clip(fg_level + rng.uniform(-15, 15, size=3), 0, 255).astype(np.float32)
    noise = rng.standard_normal((image_size, image_size, 1), dtype=np.float32)
    noise *= np.float32(3.0)
    rgb = alpha[..., None] * (fg - bg) + (bg + 0.5)  # +0.5: round on the cast below
    rgb += noise
    np.clip(rgb, 0, 255, out=rgb)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def make_sample(rng, key: str, qtype: str, grid: int, pool, image_size: int,
                turns: int = 1, turn_rng=None, readout: int = 0) -> tuple[bytes, dict]:
    """One sample: JPEG bytes and its JSON record. ``turns > 1``: the first question (of type
    ``qtype``; the board is drawn for it) is followed by ``turns - 1`` more about the same board,
    drawn from ``turn_rng`` so the first question and the image do not depend on ``turns``; the
    last ``readout`` of those read a whole row or column out."""
    board, question, answer = _QUESTIONS[qtype](rng, grid)
    img = render_board(rng, board, pool, image_size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    record = {
        "id": key,
        "image": f"{key}.jpg",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}\n{SUFFIX}"},
            {"from": "gpt", "value": answer},
        ],
        "question_type": qtype,
        "grid": [[int(v) for v in row] for row in board],
    }
    if turns > 1:
        record["conversations"] += follow_up_turns(turn_rng, board, question, turns - 1, question_mix(grid), readout)
    return buf.getvalue(), record


# ----------------------------------------------------------------------------- shards


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
    out = Path(out_dir)
    if out.exists() and not _replaceable(out):
        raise FileExistsError(f"{out} exists and does not look like a generated benchmark; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
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

        from vtc.data.tokenizer import build_tiny_tokenizer

        build_tiny_tokenizer(sorted(texts), tmp / "tokenizer")
        stats: dict = {"params": params, "question_mix": question_mix(grid),
                       "splits": {s: prior_stats(answers[s]) for s in SPLITS}}
        train_types = stats["splits"]["train"]["types"]
        if sizes["test"] and train_types:
            hit = sum(answers["test"][q][train_types[q]["majority"]] for q in train_types)
            stats["test_prior_from_train_majority"] = hit / sizes["test"]
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "meta.json").write_text(json.dumps(stats, indent=1) + "\n")
        (tmp / "DONE").write_text("ok\n")
        if out.exists():  # an earlier generated benchmark: swap it out, then delete it
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _print_stats(stats)
        print(f"[synthetic] wrote {out} in {stats['seconds']:.1f} s")
    return stats


def ensure_synthetic(out_dir, **kw) -> dict:
    """Generate into ``out_dir`` only when ``out_dir/DONE`` is missing; returns the statistics.

    When the benchmark exists, the parameters given (``seed``, ``n_train``, ...) must match the
    ones it was made with, else ``ValueError`` (delete the folder or pick another one).
    Concurrent callers are safe: each generates in its own temporary folder and the loser of the
    final rename keeps the winner's copy.
    """
    out = Path(out_dir)
    if (out / "DONE").exists():
        meta = json.loads((out / "meta.json").read_text())
        wanted = {k: v for k, v in kw.items() if k in meta["params"]}
        diff = {k: (meta["params"][k], v) for k, v in wanted.items() if meta["params"][k] != v}
        if diff:
            raise ValueError(f"{out} was generated with other parameters (have, want): {diff}")
        return meta
    try:
        return generate(out, **kw)
    except OSError:
        if (out / "DONE").exists():  # another process finished first
            return json.loads((out / "meta.json").read_text())
        raise


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vtc.data.synthetic", description=__doc__.split("\n\n")[0])
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
