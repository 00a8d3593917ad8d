"""The converter's input: reading a LLaVA JSON / JSONL file, and the checks a record must pass.

Separate from the image handling (:mod:`vtc.data.convert_images`) and the shard writing
(:mod:`vtc.data.convert_shards`): this is the converter's record policy and its vocabulary of
skip reasons, which the image, video and shard modules raise too.

Input: a JSON list of records, or JSONL (one record per line), each
``{"id", "image"?, "video"?, "conversations": [{"from", "value"}, ...], ...}``. ``"image"`` is one
path (relative to --images) or a list of paths; ``"video"`` (Video-LLaVA / LLaVA-Video records)
one path (relative to --videos) or a list. The placeholders ``<image>`` and ``<video>`` in the
text say where each item goes (docs/video.md): the k-th ``<image>`` takes the k-th image, the k-th
``<video>`` the k-th video.

Record policy. Kept as they are (the converter never rewrites text; it only adds a video record's
``"video_timestamps"``):

* text-only records (no "image"/"video" key, or null);
* multi-turn conversations;
* placeholders anywhere in a turn (start, middle, end of the first human turn, or a later turn);
* a record whose one visual item (one image or one video, given as a string) has no placeholder
  in its text: LLaVA's loader prepends ``<image>\\n`` to the first human turn in that case, and
  our templates do the same;
* lists of images and/or videos with exactly one placeholder per item (a list of one included).

Skipped (:class:`SkipSample`), with the reason in ``skipped.jsonl``, the done markers, index.json
and the summary:

==============================  ==============================================================
``bad_json``                    a JSONL line that does not parse
``bad_record``                  a record that is not a JSON object
``bad_conversation``            "conversations" missing, not a list, empty, a turn that is not
                                an object or lacks a string "from"/"value", or roles that do not
                                alternate human, gpt, human, ... starting with human (a
                                conversation may end on a human turn: evaluation prompts do)
``bad_image_field``             "image" neither a non-empty string nor a list of them, or a list
                                whose length is not the number of ``<image>`` in the text
``bad_video_field``             the same for "video" and ``<video>``
``image_token_without_image``   ``<image>`` in the text but no "image"
``video_token_without_video``   ``<video>`` in the text but no "video"
``multiple_image_tokens``       more than one ``<image>`` for one image given as a string
``multiple_video_tokens``       more than one ``<video>`` for one video given as a string
``missing_placeholder``         a string "image"/"video" with no placeholder in a record with
                                several visual items (only a lone item may omit it)
``missing_image``               an image path that is not a file under --images
``corrupt_image``               the file cannot be decoded (random bytes, truncated, ...)
``image_too_large``             beyond Pillow's decompression-bomb limit
``unsupported_image_mode``      a mode that cannot be turned into RGB
``missing_video``               a video path that is not a file under --videos
``corrupt_video``               unreadable: an empty file, or FFmpeg (PyAV) cannot open it or
                                reports a decoding error (random bytes, truncated, ...)
``no_video_stream``             the file opens but holds no video stream (audio, cover art)
``video_too_short``             the video stream yields no frame; a video with at least one frame
                                but fewer than --frames is kept, frames repeated as Video-LLaVA
                                does (:mod:`vtc.data.video_frames`)
==============================  ==============================================================

One record is one sample: a failure of any of its items skips the whole record, with that item's
reason (images are loaded first, then videos, each in list order).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"

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
BAD_VIDEO_FIELD = "bad_video_field"
VIDEO_TOKEN_WITHOUT_VIDEO = "video_token_without_video"
MULTIPLE_VIDEO_TOKENS = "multiple_video_tokens"
MISSING_PLACEHOLDER = "missing_placeholder"
MISSING_VIDEO = "missing_video"
CORRUPT_VIDEO = "corrupt_video"
NO_VIDEO_STREAM = "no_video_stream"
VIDEO_TOO_SHORT = "video_too_short"

# Per kind of item: (record field, placeholder, bad field, token without item, several tokens).
_KINDS = {"image": ("image", IMAGE_TOKEN, BAD_IMAGE_FIELD, IMAGE_TOKEN_WITHOUT_IMAGE,
                    MULTIPLE_IMAGE_TOKENS),
          "video": ("video", VIDEO_TOKEN, BAD_VIDEO_FIELD, VIDEO_TOKEN_WITHOUT_VIDEO,
                    MULTIPLE_VIDEO_TOKENS)}


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


@dataclass(frozen=True)
class Visuals:
    """A valid record's items: image and video paths, each list in placeholder order."""

    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()

    @property
    def single_image(self) -> bool:
        """One image and nothing else: stored as ``KEY.jpg`` (as before video support)."""
        return len(self.images) == 1 and not self.videos


def validate_record(record: Any) -> Visuals:
    """Check a record's structure and placeholders. Returns its items or raises SkipSample."""
    if not isinstance(record, dict):
        raise SkipSample(BAD_RECORD, f"a {type(record).__name__}, not an object")
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise SkipSample(BAD_CONVERSATION, "'conversations' missing or not a list")
    if not conv:
        raise SkipSample(BAD_CONVERSATION, "empty conversation")
    counts = {kind: 0 for kind in _KINDS}
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise SkipSample(BAD_CONVERSATION, f"turn {i} is not an object")
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or not isinstance(value, str):
            raise SkipSample(BAD_CONVERSATION, f"turn {i} lacks a string 'from' or 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise SkipSample(BAD_CONVERSATION, f"turn {i} is from {role!r}, expected {expected!r}")
        for kind, (_, token, *_) in _KINDS.items():
            counts[kind] += value.count(token)

    items, unplaced = {}, []
    for kind, (field, token, bad_field, without, multiple) in _KINDS.items():
        value, n_tokens = record.get(field), counts[kind]
        if value is None:
            if n_tokens:
                raise SkipSample(without, f"{n_tokens} {token} but no {field}")
            items[kind] = ()
        elif isinstance(value, str) and value:
            if n_tokens > 1:
                raise SkipSample(multiple, f"{n_tokens} {token} for one {field}")
            if n_tokens == 0:
                unplaced.append(field)
            items[kind] = (value,)
        elif isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            if len(value) != n_tokens:
                raise SkipSample(bad_field, f"{len(value)} {field} paths for {n_tokens} {token}")
            items[kind] = tuple(value)
        else:
            raise SkipSample(bad_field, f"{field!r} is {type(value).__name__} {str(value)[:80]!r}")
    visuals = Visuals(images=items["image"], videos=items["video"])
    if unplaced and len(visuals.images) + len(visuals.videos) > 1:
        raise SkipSample(MISSING_PLACEHOLDER, f"no placeholder for the {unplaced[0]} of a record "
                                              f"with {len(visuals.images)} images and "
                                              f"{len(visuals.videos)} videos")
    return visuals
