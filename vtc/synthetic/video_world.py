"""Digit-board clips: a synthetic video benchmark whose questions need several frames in order.

What. A clip is ``frames`` (default 8, 4..16) boards of the image world (:mod:`vtc.synthetic.world`:
a ``grid`` x ``grid`` board, one handwritten digit or nothing per cell) that change over time:
digits appear, disappear, change into others and move to a neighbouring cell (background events,
``P_EVENT`` per frame). Each clip is drawn for its question, as the image world draws a board for
its question. One question per clip in val/test, answered with one word; questions say rows,
columns and frames 1-based (``QUESTION_MIX``: a quarter each):

``frame_cell``   "What digit is in row 2, column 3 in frame 4?" -> ``"0"``..``"9"`` / ``"none"``.
                 The asked cell shows another content in every frame (all different up to 11
                 frames: successive permutations of the 11 contents).
``count_times``  "How many times does the 7 appear?" -> ``"1"``..``str(frames // 2)`` (uniform):
                 the 7 blinks in one cell, on in exactly half of the frames, in that many separate
                 stretches (:func:`blink_patterns`: never on in both the first and the last frame);
                 no other cell ever holds a 7.
``last``         "Which digit appears last?" -> a digit. ``K`` different digits pop up one at a
                 time, at different frames, each in a cell that was empty the frame before, and
                 each stays exactly ``D`` frames (``D`` in ``LAST_LIFE``, one for the clip; the
                 onsets fill all but at most two of the frames where a ``D``-frame stay fits);
                 ``LAST_STILL`` other digits stand still the whole clip. The answer is the last
                 to pop up; nothing else changes.
``direction``    "Which way does the 5 move?" -> ``"left"`` / ``"right"``. The 5 comes in, stands
                 ``L`` frames in one cell (``L`` in 1..frames//4), steps one column sideways,
                 stands ``L`` frames there and goes; no other cell ever holds a 5.

Why one frame, or an average of all frames, is not enough (the readers and their measured
accuracies: :mod:`vtc.synthetic.video_baselines`, printed by the generator next to the *prior*,
the accuracy of always giving a type's most frequent answer). At 8 frames on a 3x3 board:

* An average keeps, per cell, which contents it held and for how long, never when. The asked cell
  of ``frame_cell`` held 8 contents one frame each: 1 in 8 (prior ~1/11). ``count_times``' 7 is on
  in 4 of 8 frames whatever the answer: nothing (prior 1/4). ``last``'s newcomers all stay ``D``
  frames: 1 in ``K`` (~16%; prior ~1/10). A ``direction`` clip and its time reversal average
  alike and have opposite answers: 50% (= the prior; the way is only left/right because an
  average would show the axis of an up/down move).
* One frame, even knowing its index, shows the asked frame of ``frame_cell`` one time in 8 (~22%
  with the rule that the cell never repeats a content). Whether the 7 is on in one frame hardly
  depends on its number of stretches (~33% against 25%, at the clip's ends). A newcomer looks like
  one of the 5 still digits (~20% against ~10%, on the last frame). The 5 stands in one of its two
  cells and the frame does not say which came first, except at the board's edge near the clip's
  ends (~55% against 50%).

Every frame is rendered on its own by :func:`vtc.synthetic.render.render_board` (new handwriting
sample, placement and colours in every frame, like a jittery camera): a change shows as another
digit, never as a pixel difference a model could spot without reading the digits.

The human turn is ``"<video>\\n{question}\\nAnswer the question using a single word or phrase."``.
Training conversations may hold more rounds (:func:`follow_up_turns`; training data only): a cell
in a frame, the number of frames that show a digit ("How many frames show a 7?" -> ``"0"``..), and
readouts of a row in a frame ("What digits are in row 2 in frame 5?" -> ``"3 none 7"``).

This module is content only: board states and questions, deterministic from the caller's numpy
Generator. :mod:`vtc.synthetic.video_shards` renders the frames and writes the splits.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from vtc.data.batch import VIDEO_PLACEHOLDER
from vtc.synthetic.world import EMPTY, P_EMPTY, SUFFIX

FRAMES = 8
FPS = 1.0  # a clip's frame t is at t / FPS seconds (video_timestamps)
CONTENTS = tuple(range(10)) + (EMPTY,)
QUESTION_MIX = {"frame_cell": 0.25, "count_times": 0.25, "last": 0.25, "direction": 0.25}
P_EVENT = 0.5  # background: the chance that a frame differs from the one before in one cell
LAST_LIFE = (1, 2)  # last: every newcomer of a clip stays D frames, D drawn in this range
LAST_STILL = 5  # last: digits that stand still the whole clip (fewer on small boards)
SIDEWAYS = {"left": -1, "right": 1}


def word(v: int) -> str:
    return "none" if int(v) == EMPTY else str(int(v))


def check_geometry(grid: int, frames: int) -> None:
    if grid < 2:
        raise ValueError(f"video clips need grid >= 2 (a digit steps sideways), got {grid}")
    if not 4 <= frames <= 16:
        raise ValueError(f"video clips need 4 <= frames <= 16, got {frames}")


# ----------------------------------------------------------------------------- background


def _event(rng, board: np.ndarray, cells: list[tuple[int, int]], allowed: list[int]) -> None:
    """One background change in ``board`` (in place), in one of ``cells``: an empty cell gets a
    digit; a filled one changes digit, empties, or moves to an empty neighbour among ``cells``."""
    r, c = cells[int(rng.integers(len(cells)))]
    v = int(board[r, c])
    if v == EMPTY:
        board[r, c] = allowed[int(rng.integers(len(allowed)))]
        return
    free = [(r + dr, c + dc) for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0))
            if (r + dr, c + dc) in cells and board[r + dr, c + dc] == EMPTY]
    kind = int(rng.integers(3 if free else 2))
    if kind == 0:
        others = [d for d in allowed if d != v]
        board[r, c] = others[int(rng.integers(len(others)))] if others else EMPTY
    elif kind == 1:
        board[r, c] = EMPTY
    else:
        board[free[int(rng.integers(len(free)))]] = v
        board[r, c] = EMPTY


def background(rng, grid: int, frames: int, exclude=(), reserved=(), still: bool = False) -> np.ndarray:
    """States ``[frames, grid, grid]`` (-1 empty): a random board without the digits ``exclude``,
    cells ``reserved`` empty, then (unless ``still``) per frame a background event with
    probability ``P_EVENT`` in a cell outside ``reserved``."""
    allowed = [d for d in range(10) if d not in set(exclude)]
    board = np.asarray(allowed)[rng.integers(0, len(allowed), size=(grid, grid))]
    board[rng.random((grid, grid)) < P_EMPTY] = EMPTY
    for r, c in reserved:
        board[r, c] = EMPTY
    cells = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in set(reserved)]
    states = np.empty((frames, grid, grid), np.int64)
    states[0] = board
    for t in range(1, frames):
        board = board.copy()
        if not still and cells and rng.random() < P_EVENT:
            _event(rng, board, cells, allowed)
        states[t] = board
    return states


def _content_sequence(rng, n: int) -> list[int]:
    """``n`` cell contents, all different when n <= 11 (successive permutations of the 11
    contents, never the same twice in a row)."""
    seq: list[int] = []
    while len(seq) < n:
        perm = [CONTENTS[i] for i in rng.permutation(len(CONTENTS))]
        if seq and perm[0] == seq[-1]:
            perm = perm[1:] + perm[:1]
        seq += perm
    return seq[:n]


# ----------------------------------------------------------------------------- question types
# Each returns (states, question, answer, args); args hold what video_baselines needs.


def _frame_cell(rng, grid: int, frames: int):
    r, c = (int(x) for x in rng.integers(0, grid, size=2))
    f = int(rng.integers(frames))
    states = background(rng, grid, frames, reserved=[(r, c)])
    states[:, r, c] = _content_sequence(rng, frames)
    return (states, f"What digit is in row {r + 1}, column {c + 1} in frame {f + 1}?",
            word(states[f, r, c]), {"r": r, "c": c, "f": f})


@lru_cache(maxsize=8)
def blink_patterns(frames: int) -> dict[int, np.ndarray]:
    """count_times' on/off patterns, by their number of on-stretches k in 1..frames//2: every
    pattern of ``frames`` frames that is on in exactly ``frames // 2`` of them and not in both the
    first and the last frame, as ``{k: bool [n, frames]}``."""
    bits = (np.arange(2**frames)[:, None] >> np.arange(frames)[::-1]) & 1
    on = bits.astype(bool)
    starts = on & ~np.concatenate([np.zeros((len(on), 1), bool), on[:, :-1]], axis=1)
    keep = (on.sum(1) == frames // 2) & ~(on[:, 0] & on[:, -1])
    runs = starts.sum(1)
    return {k: on[keep & (runs == k)] for k in range(1, frames // 2 + 1)}


def _count_times(rng, grid: int, frames: int):
    d = int(rng.integers(10))
    k = int(rng.integers(1, frames // 2 + 1))
    patterns = blink_patterns(frames)[k]
    r, c = (int(x) for x in rng.integers(0, grid, size=2))
    states = background(rng, grid, frames, exclude=[d], reserved=[(r, c)])
    states[patterns[int(rng.integers(len(patterns)))], r, c] = d
    return states, f"How many times does the {d} appear?", str(k), {"d": d}


def _last(rng, grid: int, frames: int):
    life = int(rng.integers(LAST_LIFE[0], min(LAST_LIFE[1], frames - 2) + 1))
    slots = frames - life + 1  # onsets 0 .. frames - life: everyone stays its whole life
    hi = min(slots, 10)
    k = int(rng.integers(min(max(2, slots - 2), hi), hi + 1))
    most = grid * grid - life - 1  # newcomers need life + 1 cells free of still digits
    n_still = min(LAST_STILL, most)
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    still_cells = [cells[i] for i in rng.choice(len(cells), size=n_still, replace=False)]
    states = np.full((frames, grid, grid), EMPTY, np.int64)
    for r, c in still_cells:
        states[:, r, c] = int(rng.integers(10))
    onsets = np.sort(rng.choice(slots, size=k, replace=False))
    digits = rng.choice(10, size=k, replace=False)
    for a, d in zip(onsets, digits):
        span = slice(max(int(a) - 1, 0), int(a) + life)  # empty the frame before it pops up, too
        free = [(r, c) for r, c in cells if (r, c) not in still_cells and (states[span, r, c] == EMPTY).all()]
        r, c = free[int(rng.integers(len(free)))]
        states[int(a):int(a) + life, r, c] = int(d)
    return states, "Which digit appears last?", str(int(digits[-1])), {"life": life, "k": k}


def _direction(rng, grid: int, frames: int):
    d = int(rng.integers(10))
    way = "left" if rng.random() < 0.5 else "right"
    step = SIDEWAYS[way]
    r = int(rng.integers(grid))
    c0 = int(rng.integers(1, grid)) if step < 0 else int(rng.integers(0, grid - 1))
    c1 = c0 + step
    stay = int(rng.integers(1, max(1, frames // 4) + 1))  # frames in each cell
    start = int(rng.integers(0, frames - 2 * stay + 1))
    states = background(rng, grid, frames, exclude=[d], reserved=[(r, c0), (r, c1)])
    states[start:start + stay, r, c0] = d
    states[start + stay:start + 2 * stay, r, c1] = d
    return states, f"Which way does the {d} move?", way, {"d": d}


QUESTIONS = {"frame_cell": _frame_cell, "count_times": _count_times, "last": _last, "direction": _direction}


def make_clip(rng, qtype: str, grid: int, frames: int = FRAMES):
    """A clip drawn for a question of ``qtype``: ``(states [frames, grid, grid], question, answer,
    args)``."""
    check_geometry(grid, frames)
    return QUESTIONS[qtype](rng, grid, frames)


def human_turn(question: str, first: bool) -> str:
    return f"{VIDEO_PLACEHOLDER}\n{question}\n{SUFFIX}" if first else f"{question}\n{SUFFIX}"


# ----------------------------------------------------------------------------- training rounds


def _generic_question(rng, states: np.ndarray, readout: bool) -> tuple[str, str]:
    frames, grid = states.shape[0], states.shape[1]
    f = int(rng.integers(frames))
    if readout:
        i = int(rng.integers(grid))
        return (f"What digits are in row {i + 1} in frame {f + 1}?",
                " ".join(word(v) for v in states[f, i, :]))
    if rng.random() < 0.5:
        r, c = (int(x) for x in rng.integers(0, grid, size=2))
        return f"What digit is in row {r + 1}, column {c + 1} in frame {f + 1}?", word(states[f, r, c])
    d = int(rng.integers(10))
    return f"How many frames show a {d}?", str(int((states == d).any(axis=(1, 2)).sum()))


def follow_up_turns(rng, states: np.ndarray, first_question: str, n: int, readout: int = 0) -> list[dict]:
    """``n`` more rounds about the same clip (no question repeated): ``n - readout`` about any
    cell in a frame or any digit's frame count, then ``readout`` row-in-a-frame readouts."""
    asked, turns = {first_question}, []
    for want_readout, count in ((False, n - readout), (True, readout)):
        target = len(turns) + 2 * count
        for _ in range(8 * count):
            if len(turns) == target:
                break
            q, a = _generic_question(rng, states, want_readout)
            if q not in asked:
                asked.add(q)
                turns += [{"from": "human", "value": human_turn(q, False)}, {"from": "gpt", "value": a}]
    return turns
