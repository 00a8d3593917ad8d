"""Printing FLOP counts: ``1.23e12`` as ``'1.23 T'`` and plain-text tables of result rows.

Used by ``vtc flops`` (:mod:`vtc.cli.flops`) and the tests' reference tables; no arithmetic of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_flops", "format_table"]


def format_flops(x: float) -> str:
    """``1.23e12`` -> ``'1.23 T'`` (SI prefixes, FLOPs)."""
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {suffix}"
    return f"{x:.0f}"


def _cell(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, int):
        return format_flops(v) if abs(v) >= 1e6 else str(v)
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return format_flops(v)
        return f"{v:.4g}"
    return str(v)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts); columns = ``columns`` or the union of the keys in
    first-seen order. Numbers >= 1e6 are printed with SI prefixes (``'1.23 T'``), other floats
    with 4 significant digits; text columns are left-aligned, numeric ones right-aligned.
    """
    rows = list(rows)
    if columns is None:
        cols: list[str] = []
        for r in rows:
            for k in r:
                if k not in cols:
                    cols.append(str(k))
    else:
        cols = list(columns)
    if not cols:
        return ""
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    numeric = [
        all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
            for r in rows if r.get(c) is not None)
        for c in cols
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]

    def line(vals: Sequence[str]) -> str:
        out = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cols), sep] + [line(r) for r in cells])
