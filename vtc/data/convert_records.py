"""The converter's input: reading a LLaVA JSON / JSONL file, and the checks a record must pass.

Separate from the image handling (:mod:`vtc.data.convert_images`) and the shard writing
(:mod:`vtc.data.convert_shards`): this is the converter's record policy and its vocabulary of
skip reasons, which the other two raise too.

Input: a JSON list of records, or JSONL (one record per line), each
``{"id", "image"? (path relative to --images), "conversations": [{"from", "value"}, ...], ...}``.

Record policy. Kept as they are (the converter never rewrites text):

* text-only records (no "image" key, or "image": null);
* multi-turn conversations;
* ``<image>`` anywhere in a turn (start, middle, end of the first human turn, or a later turn);
* a record with an image but no ``<image>`` in its text: LLaVA's loader prepends
  ``<image>\\n`` to the first human turn in that case, and our templates do the same.

Skipped (:class:`SkipSample`), with the reason in ``skipped.jsonl``, the done markers, index.json
and the summary:

==========================  ==================================================================
``bad_json``                a JSONL line that does not parse
``bad_record``              a record that is not a JSON object
``bad_conversation``        "conversations" missing, not a list, empty, a turn that is not an
                            object or lacks a string "from"/"value", or roles that do not
                            alternate human, gpt, human, ... starting with human (a conversation
                            may end on a human turn: evaluation prompts do)
``bad_image_field``         "image" present but not a non-empty string (multi-image lists are
                            not supported: one image per sample)
``image_token_without_image``  ``<image>`` in the text but no image
``multiple_image_tokens``   more than one ``<image>`` for the one image
``missing_image``           the image path is not a file under --images
``corrupt_image``           the file cannot be decoded (random bytes, truncated, ...)
``image_too_large``         beyond Pillow's decompression-bomb limit
``unsupported_image_mode``  a mode that cannot be turned into RGB
==========================  ==================================================================
"""

from __future__ import annotations

import json
import os
from typing import Any

IMAGE_TOKEN = "<image>"

# Reason codes, stable strings (tests and downstream reports match on them).
BAD_JSON = "bad_json"
BAD_RECORD = "bad_record"
BAD_CONVERSATION = "bad_conversation"
BAD_IMAGE_FIELD = "bad_image_field"
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"
MULTIPLE_IMAGE_TOKENS = "multiple_image_tokens"
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TOO_LARGE = "image_too_large"
UNSUPPORTED_IMAGE_MODE = "unsupported_image_mode"


class SkipSample(Exception):
    """A record that cannot become a sample. ``reason`` is one of the reason codes above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def load_records(path: str | os.PathLike) -> list[tuple[Any, str | None]]:
    """Read a LLaVA JSON list or a JSONL file. Returns ``(record, error)`` pairs in file order.

    ``error`` is None for a parsed record, or the parse error of a JSONL line (the record is then
    the line's first 200 characters), so that a bad line is reported, not fatal. A JSON document
    that is not a list, or a ``.json`` file that is not valid JSON or JSONL, raises ValueError.
    """
    with open(path, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        return [(r, None) for r in data]
    if stripped.startswith("{"):
        # JSONL, or a single JSON object spanning several lines (not supported: say so).
        items: list[tuple[Any, str | None]] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((json.loads(line), None))
            except json.JSONDecodeError as e:
                items.append((line[:200], f"line {lineno}: {e}"))
        if items and all(err is not None for _, err in items):
            raise ValueError(f"{path}: neither a JSON list nor JSONL")
        return items
    if not stripped:
        return []
    raise ValueError(f"{path}: expected a JSON list of records or JSONL, got {stripped[:40]!r}")


def validate_record(record: Any) -> str | None:
    """Check a record's structure. Returns its image path (None if text-only) or raises SkipSample."""
    if not isinstance(record, dict):
        raise SkipSample(BAD_RECORD, f"a {type(record).__name__}, not an object")
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise SkipSample(BAD_CONVERSATION, "'conversations' missing or not a list")
    if not conv:
        raise SkipSample(BAD_CONVERSATION, "empty conversation")
    n_tokens = 0
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise SkipSample(BAD_CONVERSATION, f"turn {i} is not an object")
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            raise SkipSample(BAD_CONVERSATION, f"turn {i} lacks a string 'from' or 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise SkipSample(BAD_CONVERSATION, f"turn {i} is from {role!r}, expected {expected!r}")
        n_tokens += value.count(IMAGE_TOKEN)

    image = record.get("image")
    if image is None:
        if n_tokens:
            raise SkipSample(IMAGE_TOKEN_WITHOUT_IMAGE, f"{n_tokens} {IMAGE_TOKEN} but no image")
        return None
    if not isinstance(image, str) or not image:
        raise SkipSample(BAD_IMAGE_FIELD, f"'image' is {type(image).__name__} {str(image)[:80]!r}")
    if n_tokens > 1:
        raise SkipSample(MULTIPLE_IMAGE_TOKENS, f"{n_tokens} {IMAGE_TOKEN} for one image")
    return image
