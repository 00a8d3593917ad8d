"""One raw webdataset sample (bytes per tar member extension) -> one decoded, tokenised sample.

Separate from the datamodule so that evaluation, the loader benchmark and the tests can decode
samples exactly as training does without importing lightning.

Only images (``jpg``, ``jpeg``, ``png``, ``webp``, read with PIL from bytes) and text (``json``,
``txt``) are ever read out of a tar -- never webdataset's default decoders, which unpickle some
extensions; members with any other extension (``.pyd``, ``.pickle``, ``.pth``, ``.npy``, ...) are
dropped unread, by name, before their bytes are read (:func:`keep_member`, the filter the shard
readers pass to the tar iterator). A ``json`` member holds a LLaVA record (``conversations``,
optional ``question_type``); a lone ``txt`` member is a caption (``<image>`` -> caption, for
``plain`` pretraining). Visual items (docs/video.md): the image member of a single-image sample
(``jpg``), the images of a multi-image one (``img0.jpg``, ``img1.jpg``, ...), the frames of each
video (``vid0.000.jpg``, ...); the k-th ``<image>``/``<video>`` of the text takes the next image /
video, and the decoded sample lists them as ``visual``: (kind, frames [t, 3, H, W]) in text order.
A sample with one item whose text has no placeholder gets ``<image>\\n`` prepended to the first
human turn (LLaVA's rule). What cannot be decoded raises :class:`vtc.data.skips.SampleError`
with its skip reason.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence

import torch
from PIL import Image

from vtc.data.batch import IGNORE_INDEX, IMAGE_PLACEHOLDER, ITEM_IMAGE, ITEM_VIDEO
from vtc.data.image import ImageProcessor
from vtc.data.skips import DataStats, SampleError, check_unknown_tokens
from vtc.data.templates import encode_conversation, placeholder_kinds

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("json", "txt")
_KEEP_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS)
OVERLONG = ("truncate", "skip")


def keep_member(fname: str) -> bool:
    """Tar member filter: only image and text extensions are read into samples."""
    return fname.rsplit(".", 1)[-1].lower() in _KEEP_EXTS


_MULTI_IMAGE = re.compile(rf"img(\d+)\.({'|'.join(IMAGE_EXTS)})")
_VIDEO_FRAME = re.compile(rf"vid(\d+)\.(\d+)\.({'|'.join(IMAGE_EXTS)})")


def visual_members(sample: dict) -> dict[str, list[list[str]]]:
    """A raw sample's visual members by kind, each item as its member names (docs/video.md):
    ``{"image": [[jpg] or [img0.jpg], [img1.jpg], ...], "video": [[vid0.000.jpg, ...], ...]}``,
    images and videos each in index order, a video's frames in time order."""
    single = [e for e in IMAGE_EXTS if e in sample]
    images = sorted((int(m.group(1)), k) for k in sample if (m := _MULTI_IMAGE.fullmatch(k)))
    frames: dict[int, list[tuple[int, str]]] = {}
    for k in sample:
        if m := _VIDEO_FRAME.fullmatch(k):
            frames.setdefault(int(m.group(1)), []).append((int(m.group(2)), k))
    return {"image": [[e] for e in single[:1]] + [[k] for _, k in images],
            "video": [[k for _, k in sorted(frames[v])] for v in sorted(frames)]}


class SampleDecoder:
    """Raw webdataset sample (bytes per extension) -> decoded, tokenised sample for
    :func:`vtc.data.collate.collate`.

    Raises :class:`SampleError` (with its skip reason) on anything unusable; the pipeline's
    handler skips and counts the sample. ``overlong``: ``truncate`` (cut on the right, see
    :mod:`vtc.data.templates`) or ``skip`` samples with more than ``max_length`` text tokens.
    ``stats`` (optional) counts every sample seen and every truncation.
    """

    def __init__(self, tokenizer, template: str, max_length: int | None, processor: ImageProcessor,
                 require_supervision: bool, overlong: str = "truncate", stats: DataStats | None = None,
                 system_prompt: str | None = None, max_unk_fraction: float | None = None):
        if overlong not in OVERLONG:
            raise ValueError(f"overlong: {overlong!r}; use one of {OVERLONG}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.processor = processor
        self.require_supervision = require_supervision
        self.overlong = overlong
        self.stats = stats
        self.system_prompt = system_prompt
        self.max_unk_fraction = max_unk_fraction  # None: no <unk> guard (eval splits, other callers)
        self._unk = self._supervised = 0  # this process's answer tokens so far (check_unknown_tokens)

    def _count_unknown(self, labels: Sequence[int]) -> None:
        unk_id = self.tokenizer.unk_token_id
        if self.max_unk_fraction is None or unk_id is None:  # byte-level BPE (Qwen2) has no <unk>
            return
        supervised = [t for t in labels if t != IGNORE_INDEX]
        self._unk += sum(t == unk_id for t in supervised)
        self._supervised += len(supervised)
        check_unknown_tokens(self._unk, self._supervised, self.tokenizer, self.max_unk_fraction)

    def __call__(self, sample: dict) -> dict:
        if self.stats is not None:
            self.stats.seen()
        key = sample.get("__key__", "?")
        members = visual_members(sample)
        if "json" in sample:
            try:
                record = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError) as e:
                raise SampleError("json", f"{key}: json member is not JSON ({e})") from None
            if not isinstance(record, dict) or "conversations" not in record:
                raise SampleError("record", f"{key}: json is not a LLaVA record (no 'conversations')")
            conversations = record["conversations"]
        elif "txt" in sample:
            record = {}
            try:
                caption = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
            except UnicodeDecodeError as e:
                raise SampleError("json", f"{key}: txt member is not UTF-8 ({e})") from None
            conversations = [{"from": "human", "value": IMAGE_PLACEHOLDER if members["image"] else ""},
                             {"from": "gpt", "value": caption.strip()}]
        else:
            raise SampleError("no_text", f"{key}: no json or txt member (has {sorted(k for k in sample if not k.startswith('__'))})")
        if (record.get("image") and not members["image"]) or (record.get("video") and not members["video"]):
            what = "image" if record.get("image") and not members["image"] else "video"
            raise SampleError("missing_image",
                              f"{key}: record names {what} {record[what]!r} but the sample has no {what} member")
        kinds = placeholder_kinds(conversations) if isinstance(conversations, list) else []
        n_members = len(members["image"]) + len(members["video"])
        if not n_members and kinds:
            raise SampleError("image_token_without_image", f"{key}: {IMAGE_PLACEHOLDER} in the text but no image")
        if not kinds and n_members == 1:  # LLaVA's rule: the one item goes first (templates prepends it)
            kinds = ["image" if members["image"] else "video"]
        if kinds.count("image") != len(members["image"]) or kinds.count("video") != len(members["video"]):
            raise SampleError("record", f"{key}: the text has {kinds.count('image')} <image> and "
                              f"{kinds.count('video')} <video>, the sample {len(members['image'])} image and "
                              f"{len(members['video'])} video member(s)")
        queues = {kind: list(members[kind]) for kind in ("image", "video")}
        visual = [(ITEM_IMAGE if kind == "image" else ITEM_VIDEO, self._frames(key, sample, queues[kind].pop(0)))
                  for kind in kinds]
        try:
            enc = encode_conversation(self.tokenizer, conversations, self.template, None,
                                      system=self.system_prompt, visual_items=len(visual))
        except ValueError as e:
            raise SampleError("record", f"{key}: {e}") from None
        if self.max_length is not None and len(enc["input_ids"]) > self.max_length:
            if self.overlong == "skip":
                raise SampleError("overlong", f"{key}: {len(enc['input_ids'])} tokens > max_length={self.max_length}")
            try:
                enc = encode_conversation(self.tokenizer, conversations, self.template, self.max_length,
                                          system=self.system_prompt, visual_items=len(visual))
            except ValueError as e:
                raise SampleError("overlong", f"{key}: cannot truncate: {e}") from None
            if self.stats is not None:
                self.stats.truncated()
        if self.require_supervision and all(t == IGNORE_INDEX for t in enc["labels"]):
            raise SampleError("no_supervision",
                              f"{key}: no assistant token left after truncation to max_length={self.max_length}")
        self._count_unknown(enc["labels"])
        return {
            "id": key,
            "input_ids": enc["input_ids"],
            "labels": enc["labels"],
            "gen_input_ids": enc["gen_input_ids"],
            "answer": enc["answer"],
            "question_type": str(record.get("question_type") or ""),
            "visual": visual,
        }

    def _frames(self, key: str, sample: dict, names: list[str]) -> torch.Tensor:
        """One item's members (an image: one; a video: its frames in time order) -> [t, 3, H, W]."""
        frames = []
        for name in names:
            try:
                with Image.open(io.BytesIO(sample[name])) as img:
                    img.load()
                    frames.append(self.processor(img))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                raise SampleError("image", f"{key}.{name}: cannot decode the image ({e!r})") from None
        return torch.stack(frames)
