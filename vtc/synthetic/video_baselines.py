"""What one frame, or an average of all frames, can tell about a video question: oracle readers.

Why. The video benchmark (:mod:`vtc.synthetic.video_world`) is meant to need several frames in
time order. These readers measure how far a model gets without that, on the clips' board states
(no pixels, no model): each knows the generator's rules and the question, sees a restricted view
of the clip, and answers with a guess distribution ``{answer: probability}``; its accuracy on a
clip is the probability it gives the true answer (a uniform guess among ``n`` candidates scores
``1/n``). :func:`baseline_stats` sums them per question type next to the majority prior.

``one_frame(k)``  sees the board of frame ``k`` only (and knows ``k``):
    frame_cell   the asked cell's content if ``k`` is the asked frame, else any of the 10 other
                 contents (the asked cell never shows one content twice);
    count_times  the likeliest answer given whether frame ``k`` shows the digit (exact, over the
                 generator's blink patterns, :func:`~vtc.synthetic.video_world.blink_patterns`);
    last         any digit on the board (a newcomer looks like a digit that stands still);
    direction    at the board's left or right edge the 5 has either not moved yet or just
                 arrived: early in the clip the first, late the second; elsewhere a coin.
``average``       sees, per cell, how many frames held each content, but not when:
    frame_cell   any content the asked cell held;
    count_times  nothing (the digit is on in half the frames whatever the answer): any count;
    last         any digit that held a cell for fewer than all frames (the newcomers);
    direction    a coin (a clip and its time reversal average alike, with opposite answers).

The best single frame (the ``k`` with the highest accuracy) is reported as ``one_frame``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from vtc.synthetic.video_world import CONTENTS, EMPTY, SIDEWAYS, blink_patterns, word

Guess = dict[str, float]


def _uniform(answers) -> Guess:
    answers = sorted(set(answers))
    return {a: 1.0 / len(answers) for a in answers} if answers else {}


def one_frame(qtype: str, args: dict, states: np.ndarray, k: int) -> Guess:
    """The guess of a reader who sees frame ``k`` only (module doc)."""
    frames, grid = states.shape[0], states.shape[1]
    board = states[k]
    if qtype == "frame_cell":
        seen = int(board[args["r"], args["c"]])
        if k == args["f"]:
            return {word(seen): 1.0}
        return _uniform(word(v) for v in CONTENTS if v != seen)
    if qtype == "count_times":
        shown = bool((board == args["d"]).any())
        like = {n: float((p[:, k] == shown).mean()) for n, p in blink_patterns(frames).items()}
        best = max(like.values())  # answers are uniform a priori: the likeliest is the best guess
        return _uniform(str(n) for n, v in like.items() if v >= best - 1e-12)
    if qtype == "last":
        return _uniform(word(v) for v in board.ravel() if v != EMPTY) or _uniform(str(d) for d in range(10))
    if qtype == "direction":
        cols = np.argwhere(board == args["d"])[:, 1]
        if len(cols) == 1 and cols[0] in (0, grid - 1):
            inward = "right" if cols[0] == 0 else "left"
            outward = "left" if inward == "right" else "right"
            return {inward if k < (frames - 1) / 2 else outward: 1.0} if k != (frames - 1) / 2 else _uniform(SIDEWAYS)
        return _uniform(SIDEWAYS)
    raise ValueError(f"unknown video question type {qtype!r}")


def average(qtype: str, args: dict, states: np.ndarray) -> Guess:
    """The guess of a reader who sees how long each cell held each content, not when (module doc)."""
    frames, grid = states.shape[0], states.shape[1]
    if qtype == "frame_cell":
        return _uniform(word(v) for v in states[:, args["r"], args["c"]])
    if qtype == "count_times":
        return _uniform(str(n) for n in range(1, frames // 2 + 1))
    if qtype == "last":
        moving = set()
        for r in range(grid):
            for c in range(grid):
                held = Counter(int(v) for v in states[:, r, c] if v != EMPTY)
                moving.update(str(v) for v, n in held.items() if n < frames)
        return _uniform(moving) or _uniform(str(d) for d in range(10))
    if qtype == "direction":
        return _uniform(SIDEWAYS)
    raise ValueError(f"unknown video question type {qtype!r}")


class BaselineCounter:
    """Accumulates, per question type, the expected hits of every single-frame reader and of the
    average reader, and the sample count; mergeable across shards (:meth:`update` with
    :meth:`to_dict`'s output)."""

    def __init__(self) -> None:
        self.n: Counter = Counter()
        self.one: dict[str, np.ndarray] = {}
        self.avg: Counter = Counter()

    def add(self, qtype: str, args: dict, states: np.ndarray, answer: str) -> None:
        frames = states.shape[0]
        hits = np.array([one_frame(qtype, args, states, k).get(answer, 0.0) for k in range(frames)])
        self.one[qtype] = self.one.get(qtype, np.zeros(frames)) + hits
        self.avg[qtype] += average(qtype, args, states).get(answer, 0.0)
        self.n[qtype] += 1

    def to_dict(self) -> dict:
        return {"n": dict(self.n), "one": {q: v.tolist() for q, v in self.one.items()}, "avg": dict(self.avg)}

    def update(self, d: dict) -> None:
        self.n.update(d["n"])
        self.avg.update(d["avg"])
        for q, v in d["one"].items():
            self.one[q] = self.one.get(q, np.zeros(len(v))) + np.asarray(v)

    def stats(self) -> dict:
        """``{qtype: {"one_frame", "one_frame_at" (1-based frame), "average"}}`` and ``overall``."""
        out: dict = {}
        for q in sorted(self.n):
            k = int(np.argmax(self.one[q]))
            out[q] = {"one_frame": float(self.one[q][k] / self.n[q]), "one_frame_at": k + 1,
                      "average": float(self.avg[q] / self.n[q])}
        total = sum(self.n.values())
        if total:
            out["overall"] = {
                "one_frame": float(max(sum(self.one[q][k] for q in self.n) for k in range(len(next(iter(self.one.values())))))
                                   / total),
                "average": float(sum(self.avg.values()) / total)}
        return out


def baseline_stats(samples) -> dict:
    """:meth:`BaselineCounter.stats` over ``(qtype, args, states, answer)`` tuples."""
    counter = BaselineCounter()
    for qtype, args, states, answer in samples:
        counter.add(qtype, args, states, answer)
    return counter.stats()
