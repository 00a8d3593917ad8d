"""The stages of the webdataset pipelines: shards -> tar members -> raw samples, and the seeded
resampling, shuffling and modality / length grouping of the training stream.

Separate from the datamodule, which only chains these stages, so that each stage reads (and is
tested) on its own, without lightning.

Training stream: shards drawn with replacement, weighted by their sample counts (so every
*sample* is equally likely however uneven the shards are; uniform over shards when the counts are
unknown), by a seeded stream per (seed, rank, worker, epoch) (:class:`ResampledShards`), then a
seeded shuffle buffer (:class:`SeededShuffle`). Each stage's epoch counter advances in whichever
process iterates it, which is why the datamodule keeps its DataLoader workers persistent.

Modality / length grouping (:class:`GroupByModalityLength`; ``group_by_modality_length: true``,
LLaVA's option of that name, streaming form). After decoding, each sample goes to the pool of its
modality (with image / text only). When a pool holds ``W`` samples (``group_window``, default
``8 * batch_size``, rounded up to a multiple of ``batch_size``), the pool is sorted by token count
(``len(input_ids)``; ties keep arrival order), cut into ``W / batch_size`` batches of consecutive
samples, and those batches are emitted in an order shuffled by a seeded rng (seed, rank, worker,
epoch); the pool then starts empty. So every batch holds one modality only, and samples whose
lengths are neighbours among the last ``W`` of that modality -- the same rule as LLaVA's
``get_modality_length_grouped_indices`` with its megabatch (``world_size * batch_size``) replaced
by ``W`` per rank. The modality mix over batches follows the data's. A finite stream's leftovers
(only in tests: training is endless) are sorted and cut the same way, dropping a partial last
batch. Memory: up to ``2 W`` decoded samples per worker (images at ``image_size``, float32).

Reading (:func:`shard_samples`): only image and text members are read
(:func:`vtc.data.decode.keep_member`); a damaged shard counts one ``tar`` skip
(:mod:`vtc.data.skips`) and the stream goes on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vtc.data.collate import sample_items
from vtc.data.decode import keep_member
from vtc.data.skips import DataStats
from vtc.errors import ConfigError


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def worker_init(_: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker (the workers are the parallelism)."""
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

    Input: decoded samples (with visual items or text-only, ``input_ids``); output: ``collate_fn``
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
            modality = bool(sample_items(sample))
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
                for member in tar_file_iterator(stream, handler=wds.reraise_exception, select_files=keep_member):
                    member["__url__"] = url
                    yield member
            finally:
                stream.close()
        except Exception as exn:  # noqa: BLE001 -- any read failure of one shard
            stats.skip("tar", f"{url}: {exn!r}", seen=True)
        yield {}


def shard_samples(src: Iterable[dict], stats: DataStats) -> Iterator[dict]:
    """Shard URLs -> raw samples (dicts of bytes by extension), errors counted in ``stats``."""
    return group_by_keys(_shard_members(src, stats), handler=stats.handler("tar", seen=True))
