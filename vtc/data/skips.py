"""Skipping bad samples: why a sample was dropped, the shared per-split counts, and the limits.

Separate from the datamodule so that the decoder, the stream stages and the tests can raise and
count skips without importing lightning.

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
:attr:`vtc.data.datamodule.VTCDataModule.skip_counts` (training: ``seen``, ``skipped``,
``truncated``, ``skipped_<reason>``), which :class:`vtc.train.module.LMMModule` logs as ``data/*``
metrics (summed over ranks), and :attr:`~vtc.data.datamodule.VTCDataModule.skipped` (all splits).
They are saved in the datamodule's checkpoint state. Once ``skip_check_after`` samples of a split
have been seen, a skipped fraction above ``max_skip_fraction`` (default 0.1; ``null`` disables)
raises :class:`DataSkipError`, which stops the run with a message naming the fraction and the top
reasons. ``seen`` counts every sample that reached the decoder plus one per damaged shard read.

The training decoder also stops a run whose answer tokens are mostly ``<unk>``
(:func:`check_unknown_tokens`, :class:`UnknownTokensError`).
"""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable, Sequence

from vtc.data.tokenizer import is_word_level

SKIP_REASONS = ("tar", "image", "json", "record", "missing_image", "image_token_without_image",
                "no_text", "overlong", "no_supervision", "other")


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
