"""Drawing the synthetic digit-grid world (:mod:`vtc.synthetic.world`) into images, and one
whole sample: a board drawn for its question, rendered, saved as JPEG, with its JSON record.

A board is either light digits on a dark background (``P_DARK``) or dark digits on a light one,
slightly tinted, with mild pixel noise; each digit is a real handwritten one from the split's pool,
upscaled bicubically to a random ``GLYPH_MIN``..``GLYPH_MAX`` of its cell, placed at a random
offset inside the cell (never crossing it), with its own intensity. The image is saved as a JPEG
(quality ``JPEG_QUALITY``, 4:4:4).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vtc.synthetic.world import _QUESTIONS, EMPTY, SUFFIX, _digits, cell_edges, follow_up_turns, question_mix

# Glyph size as a fraction of its cell, and the share of light-on-dark boards. Smaller glyphs and
# mixed polarity made the tiny ViT's pre-training stage far slower to converge (26% patch
# accuracy after 600 steps at 0.6-0.9 and 50/50), so digits nearly fill their cells and boards
# are mostly light-on-dark, as sklearn's digits are.
GLYPH_MIN, GLYPH_MAX = 0.8, 0.95
P_DARK = 0.8
JPEG_QUALITY = 90


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
