"""webdataset shards -> batches of the :mod:`vtc.data.batch` contract, as a LightningDataModule.

Where the data is (one of):

- ``root``: a folder with ``train/ val/ test/`` (shards + ``index.json`` each, as written by
  :mod:`vtc.synthetic.shards`, which train.py runs first under a file lock when the config asks
  for the synthetic set: ``vtc.synthetic.prepare``) and ``tokenizer/``.
- ``train_shards`` / ``val_shards`` / ``test_shards``: webdataset brace patterns, URLs or lists,
  with ``tokenizer_path``. Sample counts come from ``{split}_samples`` when given, else from an
  ``index.json`` beside local shards, else by scanning local tar files
  (:mod:`vtc.data.shard_counts`); remote training shards need ``train_samples`` (the epoch length
  depends on it).

This module only wires the pipelines together; each stage lives in its own module, importable
without lightning: decoding a sample (:mod:`vtc.data.decode`), skipping and counting bad ones
(:mod:`vtc.data.skips`: the skip reasons, :attr:`VTCDataModule.skip_counts`, the
``max_skip_fraction`` limit), the stream stages (:mod:`vtc.data.streams`) and batching
(:mod:`vtc.data.collate`).

Train: resampled shards, a seeded shuffle buffer, decoding and batching in the workers (full
batches only; grouped by modality and length with ``group_by_modality_length: true``), then
``WebLoader.with_epoch(total // (batch_size * world_size))`` batches, so that every rank runs the
same number of steps whatever the shard sizes (open_clip's recipe). ``world_size`` and the rank
come from the attached trainer, else from an initialised ``torch.distributed`` process group (1
and 0 without either); the epoch counter starts at the trainer's ``current_epoch`` so that a
resumed run does not replay epoch 0's stream. Workers are persistent, which is what lets their
epoch counters advance.

Val / test: the shards in order, one process, every sample exactly once (``val_max_samples``
caps validation), last batch partial, with the generation keys. Under DDP every rank evaluates
the whole split (simple and exact; metrics synced with a mean stay correct). Without validation
shards ``val_dataloader`` returns ``[]`` (with a warning).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
import webdataset as wds

from vtc.data.batch import IMAGE_PLACEHOLDER
from vtc.data.collate import collate
from vtc.data.decode import OVERLONG, SampleDecoder
from vtc.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor
from vtc.data.shard_counts import shard_counts
from vtc.data.skips import UNK_MAX_FRACTION, DataStats
from vtc.data.streams import GroupByModalityLength, ResampledShards, SeededShuffle, shard_samples, worker_init
from vtc.data.tokenizer import load_tokenizer
from vtc.errors import ConfigError

_SPLITS = ("train", "val", "test")


class VTCDataModule(L.LightningDataModule):
    """The train / val / test loaders of one dataset (see the module docstring).

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
        max_unk_fraction: float | None = UNK_MAX_FRACTION,
    ):
        super().__init__()
        if root is None and train_shards is None and val_shards is None and test_shards is None:
            raise ConfigError("data.root", "give root (a dataset folder) or train_shards/val_shards/test_shards")
        if root is None and tokenizer_path is None:
            raise ConfigError("data.tokenizer_path", "explicit shards need tokenizer_path")
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
        self.max_unk_fraction = None if max_unk_fraction is None else float(max_unk_fraction)
        self._tokenizer = None
        self._stats = {s: DataStats(s, max_skip_fraction, skip_check_after) for s in _SPLITS}
        self._resolved: dict[str, tuple[list[str], list[int] | None, int | None]] = {}

    # -- tokenizer ---------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
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
        ``truncated``, ``skipped_<reason>`` for every reason in :data:`vtc.data.skips.SKIP_REASONS`
        (fixed keys, so ranks can sum them)."""
        return self._stats["train"].counts()

    def split_counts(self, split: str) -> dict[str, int]:
        return self._stats[split].counts()

    # -- lightning hooks -----------------------------------------------------------------------
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
            per_shard = shard_counts(urls)
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
            partial(shard_samples, stats=stats),
            SeededShuffle(self.shuffle_buffer, self.seed, rank, epoch),
            wds.map(self._decoder("train"), handler=stats.handler("other", seen=False)),
            batcher,
        )
        loader = wds.WebLoader(
            pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, worker_init_fn=worker_init,
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
            partial(shard_samples, stats=stats),
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
