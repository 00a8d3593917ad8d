"""Where a model's synthetic-benchmark answers go wrong: ``python -m vtc.synthetic.error_analysis PREDICTIONS
SPLIT_DIR [--json OUT]``.

PREDICTIONS is the ``predictions.jsonl`` a training run's test (or ``eval.py``) writes next to its
checkpoints and logs to MLflow; SPLIT_DIR the split's shard folder (e.g.
``data/synthetic-.../test``), whose JSON records carry each board (``grid``, -1 = empty cell).

Printed: accuracy per question type, then for the cell questions ("What digit is in row r, column
c?") how the model localises: the share of answers naming a digit that stands somewhere in the asked
row (``row_hit``) or column (``col_hit``), each against ``chance``, the same share had the model
named the content of a uniformly random cell of the board. Wrong answers that name a digit are
split the same way, counting only the *other* cells of the row / column, against the digit of a
random other filled cell, plus the share of them that stands on the board at all. High hits with
low accuracy: the model reads the board but misplaces the coordinates; hits near chance: it does
not localise.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from vtc.synthetic.encoder_pretrain import read_samples
from vtc.synthetic.world import EMPTY

_CELL = re.compile(r"row (\d+), column (\d+)")


def load_boards(split_dir: str | Path) -> dict[str, dict]:
    """``id -> {grid, question}`` from a split's shards (read as the encoder pre-training reads
    them: through the split's ``index.json``, no webdataset, nothing unpickled)."""

    if not (Path(split_dir) / "index.json").is_file():
        raise SystemExit(f"{split_dir}: no index.json of shards here; pass the split folder, e.g. data/synthetic-.../test")
    return {rec["id"]: {"grid": rec["grid"], "question": rec["conversations"][0]["value"]}
            for _, rec in read_samples(str(split_dir), sys.maxsize) if "grid" in rec}


def _digit(text: str) -> int | None:
    t = text.strip()
    return int(t) if t.isdigit() and len(t) == 1 else None


def _share(hits: list) -> float | None:
    return sum(hits) / len(hits) if hits else None


def analyse(predictions: list[dict], boards: dict[str, dict]) -> dict:
    """Per-type accuracy and the cell questions' row/column localisation (see the module doc)."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    missing = 0
    cell = {"row_hit": [], "col_hit": [], "row_chance": [], "col_chance": []}
    wrong = {"digit": [], "on_board": [], "row_other": [], "col_other": [], "row_other_chance": [], "col_other_chance": []}
    for p in predictions:
        ok = p["text"].strip() == p["answer"].strip()
        by_type[p["question_type"]].append(ok)
        if p["question_type"] != "cell":
            continue
        b = boards.get(p["question_id"])
        m = _CELL.search(b["question"]) if b else None
        if m is None:
            missing += 1
            continue
        g = b["grid"]
        n = len(g)
        r, c = int(m.group(1)) - 1, int(m.group(2)) - 1
        row = [g[r][j] for j in range(n)]
        col = [g[i][c] for i in range(n)]
        cells = [(i, j) for i in range(n) for j in range(n)]
        d = _digit(p["text"])
        # The same test for a uniformly random cell's content (empty cells answer "none": no hit).
        cell["row_hit"].append(d is not None and d in row)
        cell["col_hit"].append(d is not None and d in col)
        cell["row_chance"].append(_share([g[i][j] != EMPTY and g[i][j] in row for i, j in cells]))
        cell["col_chance"].append(_share([g[i][j] != EMPTY and g[i][j] in col for i, j in cells]))
        if ok:
            continue
        row_o = [g[r][j] for j in range(n) if j != c]
        col_o = [g[i][c] for i in range(n) if i != r]
        others = [(i, j) for i, j in cells if (i, j) != (r, c) and g[i][j] != EMPTY]
        wrong["digit"].append(d is not None)
        if d is None:
            continue
        # Wrong answers that name a digit, against naming the digit of a random other filled cell.
        wrong["on_board"].append(any(g[i][j] == d for i, j in cells))
        wrong["row_other"].append(d in row_o)
        wrong["col_other"].append(d in col_o)
        wrong["row_other_chance"].append(_share([g[i][j] in row_o for i, j in others]) or 0.0)
        wrong["col_other_chance"].append(_share([g[i][j] in col_o for i, j in others]) or 0.0)
    mean = _share  # shares of hits and mean chances alike
    return {
        "n": len(predictions),
        "acc": mean([ok for v in by_type.values() for ok in v]),
        "types": {t: {"n": len(v), "acc": mean(v)} for t, v in sorted(by_type.items())},
        "cell": {k: mean(v) for k, v in cell.items()} | {"n": len(cell["row_hit"]), "without_board": missing},
        "cell_wrong": {k: mean(v) for k, v in wrong.items()} | {"n": len(wrong["digit"]), "n_digit": len(wrong["on_board"])},
    }


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def render(res: dict) -> str:
    lines = [f"{res['n']} predictions, accuracy {_pct(res['acc'])}"]
    lines += [f"  {t:<9} n={v['n']:<5} acc {_pct(v['acc'])}" for t, v in res["types"].items()]
    c, w = res["cell"], res["cell_wrong"]
    if c["n"]:
        lines.append(f"cell questions ({c['n']}): answer in the asked row {_pct(c['row_hit'])} (chance "
                     f"{_pct(c['row_chance'])}), in the asked column {_pct(c['col_hit'])} (chance {_pct(c['col_chance'])})")
    if w["n"]:
        lines.append(f"wrong cell answers ({w['n']}): {_pct(w['digit'])} name a digit; of those ({w['n_digit']}), on the "
                     f"board {_pct(w['on_board'])}, in another cell of the asked row {_pct(w['row_other'])} (chance "
                     f"{_pct(w['row_other_chance'])}), of the asked column {_pct(w['col_other'])} (chance "
                     f"{_pct(w['col_other_chance'])})")
    if c.get("without_board"):
        lines.append(f"({c['without_board']} cell predictions had no board in the split folder and were left out)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m vtc.synthetic.error_analysis", description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", help="predictions.jsonl of a test/eval run")
    ap.add_argument("split_dir", help="the split's shard folder (its JSON records carry the boards)")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    a = ap.parse_args(argv)
    try:
        with open(a.predictions) as f:
            preds = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{a.predictions}: cannot read predictions ({e}); pass a run's predictions.jsonl") from None
    res = analyse(preds, load_boards(a.split_dir))
    print(render(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
