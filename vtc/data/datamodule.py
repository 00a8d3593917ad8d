"""webdataset shards -> batches of the :mod:`vtc.data.batch` contract, as a LightningDataModule.

Where the data is (one of):

- ``root``: a folder with ``train/ val/ test/`` (shards + ``index.json`` each, as written by
  :mod:`vtc.data.synthetic`) and ``tokenizer/``. With ``synthetic={...}`` (keyword arguments of
  :func:`vtc.data.synthetic.generate`), ``prepare_data`` generates it there when ``DONE`` is
  missing.
- ``train_shards`` / ``val_shards`` / ``test_shards``: webdataset brace patterns, URLs or lists,
  with ``tokenizer_path``. Sample counts come from ``{split}_samples`` when given, else from an
  ``index.json`` beside local shards, else by scanning local tar files; remote training shards
  need ``train_samples`` (the epoch length depends on it).

Decoding. Only images (``jpg``, ``jpeg``, ``png``, ``webp``, read with PIL from bytes) and text
(``json``, ``txt``) are ever read out of a tar -- never webdataset's default decoders, which
unpickle some extensions; members with any other extension (``.pyd``, ``.pickle``, ``.pth``,
``.npy``, ...) are dropped unread, by name, before their bytes are read. A ``json`` member holds a
LLaVA record (``conversations``, optional ``question_type``); a lone ``txt`` member is a caption
(``<image>`` -> caption, for ``plain`` pretraining). An image whose text has no ``<image>`` gets
``<image>\\n`` prepended to the first human turn (LLaVA's rule).

Failures are skipped and counted by reason (:data:`SKIP_REASONS`), never fatal one by one:

====================  ========================================================================
``tar``               a shard that cannot be opened or read to its end (truncated in the middle
                      of a member, bad header, missing file, duplicate member): counted once per
                      shard read; the samples before the damage are kept
``image``             image bytes PIL cannot decode (corrupt or truncated JPEG, ...)
``json``              a ``json`` member that is not UTF-8 JSON
``record``            JSON that is not LLaVA-shaped (no ``conversations``, bad turns or roles,
                      several ``<image>``) -- the template's :class:`ValueError`
``missing_image``     the record names an ``image`` but the sample carries no image member
``image_token_without_image``  ``<image>`` in the text of a sample that has no image
``no_text``           a sample with no ``json`` / ``txt`` member (e.g. an image alone)
``overlong``          more text tokens than ``max_length`` with ``overlong=skip``; with
                      ``overlong=truncate`` only when the image placeholder itself falls beyond
                      ``max_length`` (truncated samples are counted as ``truncated``, kept)
``no_supervision``    training only: no assistant token left after truncation
``other``             anything else the decoder raised
====================  ========================================================================

The counts live in shared memory (every DataLoader worker adds to them), per split:
:attr:`VTCDataModule.skip_counts` (training: ``seen``, ``skipped``, ``truncated``,
``skipped_<reason>``), which :class:`vtc.lit.module.LMMModule` logs as ``data/*`` metrics (summed
over ranks), and :attr:`VTCDataModule.skipped` (all splits). They are saved in the datamodule's
checkpoint state. Once ``skip_check_after`` samples of a split have been seen, a skipped fraction
above ``max_skip_fraction`` (default 0.1; ``null`` disables) raises :class:`DataSkipError`, which
stops the run with a message naming the fraction and the top reasons. ``seen`` counts every sample
that reached the decoder plus one per damaged shard read.

Train: shards drawn with replacement, weighted by their sample counts (so every *sample* is equally
likely however uneven the shards are; uniform over shards when the counts are unknown), by a
seeded stream per (seed, rank, worker, epoch), a seeded shuffle buffer, decoding and batching in
the workers (full batches only), then ``WebLoader.with_epoch(total // (batch_size *
world_size))`` batches, so that every rank runs the same number of steps whatever the shard sizes
(open_clip's recipe). ``world_size`` and the rank come from the attached trainer, else from an
initialised ``torch.distributed`` process group (1 and 0 without either); the epoch counter
starts at the trainer's ``current_epoch`` so that a resumed run does not replay epoch 0's stream.
Workers are persistent, which is what lets their epoch counters advance.

Modality / length grouping (``group_by_modality_length: true``, LLaVA's option of that name,
streaming form). After decoding, each sample goes to the pool of its modality (with image / text
only). When a pool holds ``W`` samples (``group_window``, default ``8 * batch_size``, rounded up to
a multiple of ``batch_size``), the pool is sorted by token count (``len(input_ids)``; ties keep
arrival order), cut into ``W / batch_size`` batches of consecutive samples, and those batches are
emitted in an order shuffled by a seeded rng (seed, rank, worker, epoch); the pool then starts
empty. So every batch holds one modality only, and samples whose lengths are neighbours among the
last ``W`` of that modality -- the same rule as LLaVA's ``get_modality_length_grouped_indices``
with its megabatch (``world_size * batch_size``) replaced by ``W`` per rank. The modality mix over
batches follows the data's. A finite stream's leftovers (only in tests: training is endless)
are sorted and cut the same way, dropping a partial last batch. Memory: up to ``2 W`` decoded
samples per worker (images at ``image_size``, float32).

Val / test: the shards in order, one process, every sample exactly once (``val_max_samples``
caps validation), last batch partial, with the generation keys. Under DDP every rank evaluates
the whole split (simple and exact; metrics synced with a mean stay correct). Without validation
shards ``val_dataloader`` returns ``[]`` (with a warning).

Importing this module does not import lightning: :class:`VTCDataModule` is created on first
attribute access (PEP 562 ``__getattr__``), so :func:`collate` and :class:`SampleDecoder` stay
cheap to import; ``from vtc.data.datamodule import VTCDataModule`` and Hydra's ``_target_`` work
as usual.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vtc.data.batch import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vtc.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor
from vtc.data.templates import encode_conversation
from vtc.errors import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("json", "txt")
_KEEP_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS)
_SPLITS = ("train", "val", "test")
SKIP_REASONS = ("tar", "image", "json", "record", "missing_image", "image_token_without_image",
                "no_text", "overlong", "no_supervision", "other")
OVERLONG = ("truncate", "skip")


# ----------------------------------------------------------------------------- collate


def _pad(rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
    return out, mask


def collate(samples: Sequence[dict], pad_id: int, image_size: int | Sequence[int] | None = None,
            generation: bool = False) -> dict:
    """Decoded samples -> one batch of the :mod:`vtc.data.batch` contract.

    A sample is a dict with ``id``, ``input_ids``, ``labels`` (lists or 1-D tensors),
    ``pixel_values`` (``[3, H, W]`` tensor or ``None``) and, for ``generation=True``,
    ``gen_input_ids``, ``answer`` and optionally ``question_type``. Everything is right-padded
    (``pad_id`` / ``IGNORE_INDEX`` / 0 in the masks). ``image_size`` (int or ``(H, W)``) only
    shapes ``pixel_values`` when no sample has an image; without it that case gives
    ``[0, 3, 0, 0]``.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    input_ids, attention_mask = _pad([list(map(int, s["input_ids"])) for s in samples], pad_id)
    labels, _ = _pad([list(map(int, s["labels"])) for s in samples], IGNORE_INDEX)
    if labels.shape != input_ids.shape or any(len(s["labels"]) != len(s["input_ids"]) for s in samples):
        raise ValueError("every sample needs as many labels as input_ids")
    images, image_index = [], torch.full((len(samples),), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        if s.get("pixel_values") is not None:
            image_index[i] = len(images)
            images.append(s["pixel_values"])
    if images:
        pixel_values = torch.stack(images).to(torch.float32)
    else:
        if image_size is None:
            h = w = 0
        elif isinstance(image_size, int):
            h = w = image_size
        else:
            h, w = image_size
        pixel_values = torch.zeros((0, 3, h, w), dtype=torch.float32)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "image_index": image_index,
        "ids": [str(s["id"]) for s in samples],
    }
    if generation:
        batch["gen_input_ids"], batch["gen_attention_mask"] = _pad(
            [list(map(int, s["gen_input_ids"])) for s in samples], pad_id
        )
        batch["answers"] = [str(s["answer"]) for s in samples]
        batch["question_types"] = [str(s.get("question_type") or "") for s in samples]
    return batch


# ----------------------------------------------------------------------------- counting skips


class SampleError(ValueError):
    """A sample that cannot be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class DataSkipError(RuntimeError):
    """Too large a fraction of a split's samples was skipped (``data.max_skip_fraction``)."""


class UnknownTokensError(DataSkipError):
    """Too many supervised tokens of the training data are ``<unk>``: the tokenizer does not know
    the data's words (``llm.tokenizer_path``). A :class:`DataSkipError`, so that the skip handler
    re-raises it and the run stops, rather than counting it as one bad sample."""


# A real LLM's tokenizer (SentencePiece with byte fallback, byte-level BPE) never emits <unk>; vtc's
# word-level one emits it for every word outside the synthetic set. The share is judged once a
# decoder (one per DataLoader worker) has seen UNK_CHECK_AFTER answer tokens: a few LLaVA samples,
# a few synthetic batches (more than the 2-step interop tests decode, whose tiny Llava lacks digits).
UNK_MAX_FRACTION = 0.05
UNK_CHECK_AFTER = 1000


def check_unknown_tokens(unk: int, total: int, tokenizer, max_fraction: float | None) -> None:
    """Raise :class:`UnknownTokensError` when ``unk`` of ``total`` answer tokens exceed the limit."""
    if max_fraction is None or total < UNK_CHECK_AFTER or unk <= max_fraction * total:
        return
    from vtc.data.tokenizer import is_word_level

    name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    what = " (a word-level tokenizer, such as llm=tiny's, built from the synthetic set's words)" if is_word_level(
        tokenizer) else ""
    raise UnknownTokensError(
        f"llm.tokenizer_path: {unk} of the first {total} supervised (answer) tokens of the training data are "
        f"<unk> ({unk / total:.1%} > data.max_unk_fraction={max_fraction:g}): {name}{what} does not know the "
        "data's words, and the model would learn to answer <unk>. Use the real LLM's tokenizer: "
        "llm.tokenizer_path=<its local dir> (llm=vicuna_7b llm.path=... sets it), or +data.max_unk_fraction=null "
        "if the <unk>s are intended.")


_SEEN, _SKIPPED, _TRUNCATED, _FIRST_REASON = 0, 1, 2, 3


class DataStats:
    """Seen / skipped-by-reason / truncated counts of one split, shared by the DataLoader's worker
    processes (a ``multiprocessing.Array``), with the skipped-fraction limit.

    ``handler(default_reason)`` gives webdataset's exception handler: it counts, warns (the first
    ``warn_first`` skips, then every ``warn_every``-th) and returns True so that the sample is
    dropped, unless the limit is passed, where it raises :class:`DataSkipError`.
    """

    def __init__(self, split: str = "train", max_fraction: float | None = 0.1, check_after: int = 100,
                 warn_first: int = 20, warn_every: int = 1000):
        self.split = split
        self.max_fraction = None if max_fraction is None else float(max_fraction)
        self.check_after = int(check_after)
        self.warn_first, self.warn_every = warn_first, warn_every
        self._arr = multiprocessing.get_context().Array("q", _FIRST_REASON + len(SKIP_REASONS))

    # -- reading -----------------------------------------------------------------------------------
    def values(self) -> list[int]:
        with self._arr.get_lock():
            return list(self._arr[:])

    @property
    def skipped(self) -> int:
        return int(self._arr[_SKIPPED])

    def counts(self) -> dict[str, int]:
        """``seen``, ``skipped``, ``truncated`` and ``skipped_<reason>`` for every reason (fixed keys)."""
        v = self.values()
        out = {"seen": v[_SEEN], "skipped": v[_SKIPPED], "truncated": v[_TRUNCATED]}
        out.update({f"skipped_{r}": v[_FIRST_REASON + i] for i, r in enumerate(SKIP_REASONS)})
        return out

    def load(self, values: Sequence[int]) -> None:
        with self._arr.get_lock():
            for i, x in enumerate(list(values)[: len(self._arr)]):
                self._arr[i] = int(x)

    # -- counting ----------------------------------------------------------------------------------
    def seen(self) -> None:
        with self._arr.get_lock():
            self._arr[_SEEN] += 1
            v = list(self._arr[:]) if self._arr[_SEEN] == self.check_after else None
        if v is not None:
            self._check(v)

    def truncated(self) -> None:
        with self._arr.get_lock():
            self._arr[_TRUNCATED] += 1

    def skip(self, reason: str, exn: BaseException | str, seen: bool = False) -> None:
        if reason not in SKIP_REASONS:
            reason = "other"
        with self._arr.get_lock():
            if seen:
                self._arr[_SEEN] += 1
            self._arr[_SKIPPED] += 1
            self._arr[_FIRST_REASON + SKIP_REASONS.index(reason)] += 1
            v = list(self._arr[:])
        n = v[_SKIPPED]
        if n <= self.warn_first or n % self.warn_every == 0:
            warnings.warn(f"vtc.data: skipped sample #{n} of {self.split} ({reason}): {exn}", stacklevel=3)
        self._check(v)

    def _check(self, v: list[int]) -> None:
        seen, skipped = v[_SEEN], v[_SKIPPED]
        if self.max_fraction is None or seen < self.check_after or skipped <= self.max_fraction * seen:
            return
        top = sorted(((v[_FIRST_REASON + i], r) for i, r in enumerate(SKIP_REASONS) if v[_FIRST_REASON + i]),
                     reverse=True)[:3]
        raise DataSkipError(
            f"vtc.data: {skipped} of {seen} {self.split} samples seen were skipped "
            f"({skipped / seen:.1%}), above data.max_skip_fraction={self.max_fraction:g}; top reasons: "
            + ", ".join(f"{r} {c}" for c, r in top)
            + ". The warnings above name the samples; fix or drop the bad shards "
            "(python -m vtc.data.convert re-encodes and validates LLaVA data), or raise "
            "data.max_skip_fraction (null disables the check)."
        )

    def handler(self, default_reason: str, seen: bool) -> Callable[[BaseException], bool]:
        """webdataset's handler for one stage; ``seen``: count the failed sample as seen (stages
        before the decoder, which counts what reaches it)."""
        return _Handler(self, default_reason, seen)

    # -- processes ---------------------------------------------------------------------------------
    def __getstate__(self):
        # Shared memory travels only to processes being started (DataLoader workers); any other
        # pickling (a deepcopy, a checkpoint) gets a detached copy holding the current values.
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:
            state["_arr"] = self.values()
        return state

    def __setstate__(self, state):
        arr = state["_arr"]
        self.__dict__.update(state)
        if isinstance(arr, list):
            self._arr = multiprocessing.get_context().Array("q", len(arr))
            self.load(arr)


class _Handler:
    """webdataset exception handler bound to a :class:`DataStats` (picklable, unlike a lambda)."""

    def __init__(self, stats: DataStats, default_reason: str, seen: bool):
        self.stats, self.default_reason, self.seen = stats, default_reason, seen

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, DataSkipError):  # the limit, raised while counting a seen sample
            raise exn
        self.stats.skip(getattr(exn, "reason", self.default_reason), exn, seen=self.seen)
        return True


# ----------------------------------------------------------------------------- decoding


def _keep_member(fname: str) -> bool:
    """Tar member filter: only image and text extensions are read into samples."""
    return fname.rsplit(".", 1)[-1].lower() in _KEEP_EXTS


class SampleDecoder:
    """Raw webdataset sample (bytes per extension) -> decoded, tokenised sample for :func:`collate`.

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
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
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
            conversations = [{"from": "human", "value": IMAGE_PLACEHOLDER if image_ext else ""},
                             {"from": "gpt", "value": caption.strip()}]
        else:
            raise SampleError("no_text", f"{key}: no json or txt member (has {sorted(k for k in sample if not k.startswith('__'))})")
        if record.get("image") and image_ext is None:
            raise SampleError("missing_image",
                              f"{key}: record names image {record['image']!r} but the sample has no image member")
        if image_ext is None and isinstance(conversations, list) and any(
                isinstance(t, dict) and IMAGE_PLACEHOLDER in str(t.get("value", "")) for t in conversations):
            raise SampleError("image_token_without_image", f"{key}: {IMAGE_PLACEHOLDER} in the text but no image")
        pixel_values = None
        if image_ext is not None:
            try:
                with Image.open(io.BytesIO(sample[image_ext])) as img:
                    img.load()
                    pixel_values = self.processor(img)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
                raise SampleError("image", f"{key}.{image_ext}: cannot decode the image ({e!r})") from None
        has_image = pixel_values is not None
        try:
            enc = encode_conversation(self.tokenizer, conversations, self.template, None, has_image=has_image,
                                      system=self.system_prompt)
        except ValueError as e:
            raise SampleError("record", f"{key}: {e}") from None
        if self.max_length is not None and len(enc["input_ids"]) > self.max_length:
            if self.overlong == "skip":
                raise SampleError("overlong", f"{key}: {len(enc['input_ids'])} tokens > max_length={self.max_length}")
            try:
                enc = encode_conversation(self.tokenizer, conversations, self.template, self.max_length,
                                          has_image=has_image, system=self.system_prompt)
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
            "pixel_values": pixel_values,
        }


# ----------------------------------------------------------------------------- streams


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class ResampledShards(torch.utils.data.IterableDataset):
    """Endless shard URLs drawn with replacement, seeded by (seed, rank, worker, epoch).

    ``weights`` (the shards' sample counts) make a shard's chance proportional to its size, so
    every sample is equally likely; uniform without them. Each ``iter()`` is one epoch: the epoch
    counter advances in whichever process iterates (a persistent worker keeps its own), starting
    from ``epoch``.
    """

    def __init__(self, urls: Sequence[str], seed: int, rank: int = 0, epoch: int = 0,
                 weights: Sequence[float] | None = None):
        super().__init__()
        if not urls:
            raise ConfigError("train_shards", "no training shards found")
        if weights is not None and (len(weights) != len(urls) or sum(weights) <= 0):
            weights = None
        self.urls, self.seed, self.rank, self.epoch = list(urls), int(seed), int(rank), int(epoch) - 1
        self.cum_weights = None
        if weights is not None:
            acc, self.cum_weights = 0.0, []
            for w in weights:
                acc += max(float(w), 0.0)
                self.cum_weights.append(acc)

    def __iter__(self):
        self.epoch += 1
        worker, _ = _worker()
        rng = random.Random(f"shards/{self.seed}/{self.rank}/{worker}/{self.epoch}")
        while True:
            if self.cum_weights is None:
                yield {"url": self.urls[rng.randrange(len(self.urls))]}
            else:
                yield {"url": rng.choices(self.urls, cum_weights=self.cum_weights)[0]}


class SeededShuffle(wds.PipelineStage):
    """A shuffle buffer seeded by (seed, rank, worker, epoch); its epoch advances per ``run``."""

    def __init__(self, bufsize: int, seed: int, rank: int = 0, epoch: int = 0):
        self.bufsize, self.seed, self.rank, self.epoch = int(bufsize), int(seed), int(rank), int(epoch) - 1

    def run(self, src):
        self.epoch += 1
        if self.bufsize <= 1:
            yield from src
            return
        worker, _ = _worker()
        rng = random.Random(f"shuffle/{self.seed}/{self.rank}/{worker}/{self.epoch}")
        buf: list = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class GroupByModalityLength(wds.PipelineStage):
    """Batches of one modality and neighbouring lengths (see the module docstring for the rule).

    Input: decoded samples (``pixel_values`` None or not, ``input_ids``); output: ``collate_fn``
    applied to each batch (a list of samples when ``collate_fn`` is None).
    """

    def __init__(self, batch_size: int, window: int, seed: int, rank: int = 0, epoch: int = 0,
                 collate_fn: Callable[[list], Any] | None = None, partial: bool = False):
        self.batch_size = int(batch_size)
        self.window = max(1, math.ceil(int(window) / self.batch_size)) * self.batch_size
        self.seed, self.rank, self.epoch = int(seed), int(rank), int(epoch) - 1
        self.collate_fn, self.partial = collate_fn, partial

    def _emit(self, pool: list, rng: random.Random) -> list:
        order = sorted(range(len(pool)), key=lambda i: (len(pool[i]["input_ids"]), i))
        batches = [[pool[i] for i in order[k:k + self.batch_size]] for k in range(0, len(order), self.batch_size)]
        if not self.partial:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        return batches

    def run(self, src):
        self.epoch += 1
        worker, _ = _worker()
        rng = random.Random(f"group/{self.seed}/{self.rank}/{worker}/{self.epoch}")
        pools: dict[bool, list] = {True: [], False: []}
        collate_fn = self.collate_fn or (lambda b: b)
        for sample in src:
            modality = sample["pixel_values"] is not None
            pools[modality].append(sample)
            if len(pools[modality]) == self.window:
                full, pools[modality] = pools[modality], []
                for batch in self._emit(full, rng):
                    yield collate_fn(batch)
        for modality in (True, False):  # a finite stream's leftovers
            for batch in self._emit(pools[modality], rng):
                yield collate_fn(batch)


def _shard_members(src: Iterable[dict], stats: DataStats) -> Iterator[dict]:
    """Shard URLs -> tar members (image / text extensions only, unread otherwise), with an
    end-of-shard marker ``{}`` after each shard so that no sample spans two shards.

    A shard that cannot be opened or read to its end (truncated, bad header) counts one ``tar``
    skip; the members read before the damage are kept, and the stream goes on with the next shard.
    """
    for source in src:
        url = source["url"]
        try:
            stream = wds.gopen(url, "rb")
            try:
                for member in tar_file_iterator(stream, handler=wds.reraise_exception, select_files=_keep_member):
                    member["__url__"] = url
                    yield member
            finally:
                stream.close()
        except Exception as exn:  # noqa: BLE001 -- any read failure of one shard
            stats.skip("tar", f"{url}: {exn!r}", seen=True)
        yield {}


def _samples(src: Iterable[dict], stats: DataStats) -> Iterator[dict]:
    """Shard URLs -> raw samples (dicts of bytes by extension), errors counted in ``stats``."""
    return group_by_keys(_shard_members(src, stats), handler=stats.handler("tar", seen=True))


def _local_path(url: str) -> Path | None:
    if url.startswith("file:"):
        url = url[5:]
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def _member_key(name: str) -> str:
    """webdataset's sample key of a tar member: its folder plus its name up to the first dot."""
    folder, _, base = name.rpartition("/")
    return f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]


def _scan(path: Path) -> int:
    """Samples in one local tar (keys with an image or text member); a damaged tar counts what
    can be read before the damage, with a warning."""
    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and _keep_member(m.name):
                    keys.add(_member_key(m.name))
    except (tarfile.TarError, OSError) as e:
        warnings.warn(f"vtc.data: {path} is damaged ({e}); counted the {len(keys)} samples before the damage")
    return len(keys)


def _shard_counts(urls: Sequence[str]) -> list[int] | None:
    """Samples per local shard: from ``index.json`` beside them when it lists them, else by scanning;
    None when a shard is remote."""
    paths = [_local_path(u) for u in urls]
    if any(p is None for p in paths):
        return None
    counts: dict[Path, int] = {}
    for index_file in {p.parent / "index.json" for p in paths}:
        if index_file.exists():
            for shard in json.loads(index_file.read_text()).get("shards", []):
                counts[(index_file.parent / shard["path"]).resolve()] = int(shard["count"])
    out = []
    for p in paths:
        rp = p.resolve()
        out.append(counts[rp] if rp in counts else _scan(p))
    return out


def _count_local(urls: Sequence[str]) -> int | None:
    counts = _shard_counts(urls)
    return None if counts is None else sum(counts)


# ----------------------------------------------------------------------------- datamodule


class _VTCData:
    """The whole of :class:`VTCDataModule` but its Lightning base (see the module docstring).

    All arguments are keywords (Hydra instantiates it).
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        train_shards: str | Sequence[str] | None = None,
        val_shards: str | Sequence[str] | None = None,
        test_shards: str | Sequence[str] | None = None,
        tokenizer_path: str | None = None,
        train_samples: int | None = None,
        val_samples: int | None = None,
        test_samples: int | None = None,
        template: str = "vicuna_v1",
        system_prompt: str | None = None,
        image_size: int = 336,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        pad_to_square: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_length: int | None = 2048,
        overlong: str = "truncate",
        max_skip_fraction: float | None = 0.1,
        skip_check_after: int = 100,
        group_by_modality_length: bool = False,
        group_window: int | None = None,
        val_max_samples: int | None = None,
        synthetic: dict | None = None,
        max_unk_fraction: float | None = UNK_MAX_FRACTION,
    ):
        super().__init__()
        if root is None and train_shards is None and val_shards is None and test_shards is None:
            raise ConfigError("data.root", "give root (a dataset folder) or train_shards/val_shards/test_shards")
        if root is None and tokenizer_path is None:
            raise ConfigError("data.tokenizer_path", "explicit shards need tokenizer_path")
        if synthetic is not None and root is None:
            raise ConfigError("data.synthetic", "synthetic generation needs data.root")
        if int(batch_size) < 1:
            raise ConfigError("data.batch_size", f"must be >= 1, got {batch_size}")
        if template not in ("plain", "vicuna_v1"):
            raise ConfigError("data.template", f"unknown template {template!r} (plain, vicuna_v1)")
        if overlong not in OVERLONG:
            raise ConfigError("data.overlong", f"{overlong!r}; use one of {', '.join(OVERLONG)}")
        if max_skip_fraction is not None and not 0 <= float(max_skip_fraction) <= 1:
            raise ConfigError("data.max_skip_fraction", f"must lie in [0, 1] (or null), got {max_skip_fraction}")
        if group_window is not None and int(group_window) < 1:
            raise ConfigError("data.group_window", f"must be >= 1 (or null), got {group_window}")
        self.root = Path(root) if root is not None else None
        self.shards = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.sample_counts = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.tokenizer_path = tokenizer_path if tokenizer_path is not None else str(self.root / "tokenizer")
        self.template = template
        self.system_prompt = None if system_prompt is None else str(system_prompt)
        self.image_size = int(image_size)
        self.processor = ImageProcessor(self.image_size, tuple(image_mean), tuple(image_std), bool(pad_to_square))
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else self.batch_size
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.max_length = int(max_length) if max_length else None
        self.overlong = overlong
        self.group_by_modality_length = bool(group_by_modality_length)
        self.group_window = int(group_window) if group_window else 8 * self.batch_size
        self.val_max_samples = int(val_max_samples) if val_max_samples else None
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self.max_unk_fraction = None if max_unk_fraction is None else float(max_unk_fraction)
        self._tokenizer = None
        self._stats = {s: DataStats(s, max_skip_fraction, skip_check_after) for s in _SPLITS}
        self._resolved: dict[str, tuple[list[str], list[int] | None, int | None]] = {}

    # -- tokenizer ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from vtc.data.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    @property
    def image_token_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    # -- counts --------------------------------------------------------------------------------
    @property
    def skipped(self) -> int:
        """Samples skipped so far (decode or read failures), all splits and workers together."""
        return sum(s.skipped for s in self._stats.values())

    @property
    def skip_counts(self) -> dict[str, int]:
        """The training stream's counts of this process (all its workers): ``seen``, ``skipped``,
        ``truncated``, ``skipped_<reason>`` for every reason in :data:`SKIP_REASONS` (fixed keys,
        so ranks can sum them)."""
        return self._stats["train"].counts()

    def split_counts(self, split: str) -> dict[str, int]:
        return self._stats[split].counts()

    # -- lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from vtc.data.synthetic import ensure_synthetic

            ensure_synthetic(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        for split in _SPLITS:
            self._resolve(split)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "stats": {s: st.values() for s, st in self._stats.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        for split, values in (state_dict.get("stats") or {}).items():
            if split in self._stats:
                self._stats[split].load(values)

    # -- shards --------------------------------------------------------------------------------
    def _resolve(self, split: str) -> tuple[list[str], list[int] | None, int | None]:
        """Shard URLs, samples per shard (None if unknown) and sample count of a split
        (``([], [], 0)`` when the split is absent)."""
        if split in self._resolved:
            return self._resolved[split]
        spec, count = self.shards[split], self.sample_counts[split]
        per_shard = None
        if spec is not None:
            specs = [spec] if isinstance(spec, str) else list(spec)
            urls = [u for s in specs for u in wds.shardlists.expand_urls(str(s))]
            per_shard = _shard_counts(urls)
            if count is None and per_shard is not None:
                count = sum(per_shard)
        elif self.root is not None and (self.root / split / "index.json").exists():
            index = json.loads((self.root / split / "index.json").read_text())
            urls = [str(self.root / split / s["path"]) for s in index["shards"]]
            per_shard = [int(s["count"]) for s in index["shards"]]
            count = int(index["total"]) if count is None else count
        else:
            urls, per_shard, count = [], [], 0
        self._resolved[split] = (urls, per_shard, None if count is None else int(count))
        return self._resolved[split]

    def _world(self) -> tuple[int, int, int]:
        """(world size, rank, epoch): from the trainer, else an initialised torch.distributed."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank), int(trainer.current_epoch)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank(), 0
        return 1, 0, 0

    def _decoder(self, split: str) -> SampleDecoder:
        return SampleDecoder(self.tokenizer, self.template, self.max_length, self.processor,
                             require_supervision=split == "train", overlong=self.overlong, stats=self._stats[split],
                             system_prompt=self.system_prompt,
                             max_unk_fraction=self.max_unk_fraction if split == "train" else None)

    # -- loaders -------------------------------------------------------------------------------
    def train_batches_per_rank(self, world_size: int = 1) -> int:
        """Batches every rank runs per epoch: ``total // (batch_size * world_size)`` (at least 1)."""
        total = self._resolve("train")[2]
        if total is None:
            raise ConfigError("data.train_samples", "cannot count samples in remote shards; set train_samples")
        return max(1, total // (self.batch_size * world_size))

    def train_dataloader(self):
        urls, per_shard, total = self._resolve("train")
        if not urls:
            raise ConfigError("data.train_shards", f"no training shards (root={self.root})")
        world, rank, epoch = self._world()
        n_batches = self.train_batches_per_rank(world)
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        stats = self._stats["train"]
        collate_fn = partial(collate, pad_id=self.pad_token_id, image_size=self.image_size)
        if self.group_by_modality_length:
            batcher = GroupByModalityLength(self.batch_size, self.group_window, self.seed, rank, epoch,
                                            collate_fn=collate_fn)
        else:
            batcher = wds.batched(self.batch_size, partial=False, collation_fn=collate_fn)
        pipeline = wds.DataPipeline(
            ResampledShards(urls, self.seed, rank, epoch, weights=per_shard),
            partial(_samples, stats=stats),
            SeededShuffle(self.shuffle_buffer, self.seed, rank, epoch),
            wds.map(self._decoder("train"), handler=stats.handler("other", seen=False)),
            batcher,
        )
        loader = wds.WebLoader(
            pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, worker_init_fn=_worker_init,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        return loader.with_epoch(n_batches).with_length(n_batches, silent=True)

    def _eval_dataloader(self, split: str, limit: int | None):
        urls, _, total = self._resolve(split)
        if not urls:
            raise ConfigError(f"data.{split}_shards", f"no {split} shards (root={self.root})")
        stats = self._stats[split]
        stages = [
            wds.SimpleShardList(urls),
            partial(_samples, stats=stats),
            wds.map(self._decoder(split), handler=stats.handler("other", seen=False)),
        ]
        if limit is not None:
            stages.append(wds.slice(limit))
            total = limit if total is None else min(total, limit)
        stages.append(wds.batched(self.eval_batch_size, partial=True, collation_fn=partial(
            collate, pad_id=self.pad_token_id, image_size=self.image_size, generation=True)))
        loader = wds.WebLoader(wds.DataPipeline(*stages), batch_size=None, shuffle=False, num_workers=0)
        if total is not None:
            loader = loader.with_length(math.ceil(total / self.eval_batch_size), silent=True)
        return loader

    def val_dataloader(self):
        if not self._resolve("val")[0]:  # no validation split: train without validation
            warnings.warn(f"vtc.data: no validation shards (root={self.root}); validation is skipped")
            return []
        return self._eval_dataloader("val", self.val_max_samples)

    def test_dataloader(self):
        return self._eval_dataloader("test", None)


# ----------------------------------------------------------------------------- lazy class

if TYPE_CHECKING:
    import lightning as L

    class VTCDataModule(_VTCData, L.LightningDataModule): ...


def __getattr__(name: str):
    # PEP 562: ``VTCDataModule`` is made on first access, so that importing this module (for
    # ``collate``, ``SampleDecoder``) does not import lightning (~8 s on the 2-core machines).
    if name == "VTCDataModule":
        import lightning as L

        cls = type("VTCDataModule", (_VTCData, L.LightningDataModule),
                   {"__module__": __name__, "__qualname__": "VTCDataModule", "__doc__": _VTCData.__doc__})
        globals()["VTCDataModule"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
