"""Digit-grid VQA: a small synthetic benchmark that needs the image and its fine detail.

The task. Each image is a ``grid`` x ``grid`` board on an ``image_size`` px square canvas. A
cell holds one real handwritten digit from sklearn's ``load_digits()`` (8x8, 0..16 levels,
upscaled bicubically to a random 80-95% of the cell (``render.GLYPH_MIN``..``GLYPH_MAX``), placed at a random offset inside the cell,
with its own intensity) or nothing (probability ``P_EMPTY`` per cell). The whole board is either
light digits on a dark background (``render.P_DARK``) or dark digits on a light one, slightly tinted, with mild
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

This module is the world's content: the source digits and their split pools, the cell geometry,
boards and the questions asked about them. :mod:`vtc.synthetic.render` draws a board into its
image and packs one sample; :mod:`vtc.synthetic.shards` writes the splits to disk
(:func:`~vtc.synthetic.shards.generate`, :func:`~vtc.synthetic.shards.ensure_synthetic`, the
``vtc synthetic`` CLI).
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np

SPLITS = ("train", "val", "test")
POOL_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
P_EMPTY = 0.12
QUESTION_MIX = {"cell": 0.4, "count": 0.3, "relation": 0.3}
MAX_COUNT = 5
SUFFIX = "Answer the question using a single word or phrase."
DIRECTIONS = {  # name -> (d_row, d_col, phrase)
    "right": (0, 1, "to the right of"),
    "left": (0, -1, "to the left of"),
    "below": (1, 0, "below"),
    "above": (-1, 0, "above"),
}
EMPTY = -1
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
