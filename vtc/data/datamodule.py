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
(``json``, ``txt``) are ever decoded -- never webdataset's default decoders, which unpickle some
extensions; members with any other extension are dropped unread. A ``json`` member holds a
LLaVA record (``conversations``, optional ``question_type``); a lone ``txt`` member is a caption
(``<image>`` -> caption, for ``plain`` pretraining). A sample whose record says ``"image"`` but
carries no image fails. Any sample that fails (unreadable tar member, bad image, malformed
conversation, placeholder beyond ``max_length``, and in training no supervised token left after
truncation; an unreadable shard counts once) is skipped with a warning and counted:
:attr:`VTCDataModule.skipped` (shared by the loader's worker processes; also saved in the
datamodule's checkpoint state).

Train: shards drawn with replacement by a seeded stream per (seed, rank, worker, epoch), a
seeded shuffle buffer, decoding and batching in the workers (full batches only), then
``WebLoader.with_epoch(total // (batch_size * world_size))`` batches, so that every rank runs
the same number of steps whatever the shard sizes (open_clip's recipe). ``world_size`` and the
rank come from the attached trainer (1 and 0 without one); the epoch counter starts at the
trainer's ``current_epoch`` so that a resumed run does not replay epoch 0's stream. Workers are
persistent, which is what lets their epoch counters advance.

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
import tarfile
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from PIL import Image

from vtc.data.batch import IGNORE_INDEX, IMAGE_PLACEHOLDER
from vtc.data.image import CLIP_MEAN, CLIP_STD, ImageProcessor
from vtc.data.templates import encode_conversation
from vtc.errors import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("json", "txt")
_KEEP_EXTS = frozenset(IMAGE_EXTS + TEXT_EXTS)
_SPLITS = ("train", "val", "test")


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


# ----------------------------------------------------------------------------- decoding


def _keep_member(fname: str) -> bool:
    """Tar member filter: only image and text extensions are read into samples."""
    return fname.rsplit(".", 1)[-1].lower() in _KEEP_EXTS


class SampleDecoder:
    """Raw webdataset sample (bytes per extension) -> decoded, tokenised sample for :func:`collate`.

    Raises on anything malformed; the pipeline's handler skips and counts the sample.
    """

    def __init__(self, tokenizer, template: str, max_length: int | None, processor: ImageProcessor,
                 require_supervision: bool):
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.processor = processor
        self.require_supervision = require_supervision

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        image_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if "json" in sample:
            record = json.loads(sample["json"])
            if not isinstance(record, dict) or "conversations" not in record:
                raise ValueError(f"{key}: json has no 'conversations'")
            conversations = record["conversations"]
        elif "txt" in sample:
            record = {}
            caption = sample["txt"].decode("utf-8") if isinstance(sample["txt"], bytes) else str(sample["txt"])
            conversations = [{"from": "human", "value": IMAGE_PLACEHOLDER if image_ext else ""},
                             {"from": "gpt", "value": caption.strip()}]
        else:
            raise ValueError(f"{key}: no json or txt member")
        if record.get("image") and image_ext is None:
            raise ValueError(f"{key}: record names image {record['image']!r} but the sample has no image member")
        pixel_values = None
        if image_ext is not None:
            with Image.open(io.BytesIO(sample[image_ext])) as img:
                img.load()
                pixel_values = self.processor(img)
        try:
            enc = encode_conversation(self.tokenizer, conversations, self.template, self.max_length,
                                      has_image=pixel_values is not None)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from e
        if self.require_supervision and all(t == IGNORE_INDEX for t in enc["labels"]):
            raise ValueError(f"{key}: no assistant token left after truncation to max_length={self.max_length}")
        return {
            "id": key,
            "input_ids": enc["input_ids"],
            "labels": enc["labels"],
            "gen_input_ids": enc["gen_input_ids"],
            "answer": enc["answer"],
            "question_type": str(record.get("question_type") or ""),
            "pixel_values": pixel_values,
        }


class SkipCounter:
    """Counts skipped samples across the DataLoader's worker processes; the pipeline's handler.

    ``__call__(exn)`` warns (the first ``warn_first`` times, then every ``warn_every``-th) and
    returns True: webdataset then drops the sample and continues.
    """

    def __init__(self, warn_first: int = 20, warn_every: int = 1000):
        self._value = multiprocessing.get_context().Value("q", 0)
        self.warn_first, self.warn_every = warn_first, warn_every

    @property
    def value(self) -> int:
        return int(self._value.value)

    def reset(self, value: int = 0) -> None:
        with self._value.get_lock():
            self._value.value = int(value)

    def __call__(self, exn: BaseException) -> bool:
        with self._value.get_lock():
            self._value.value += 1
            n = self._value.value
        if n <= self.warn_first or n % self.warn_every == 0:
            warnings.warn(f"vtc.data: skipped sample #{n}: {exn!r}", stacklevel=2)
        return True

    def __getstate__(self):
        # Shared memory travels only to processes being started (DataLoader workers); any other
        # pickling (a deepcopy, a checkpoint) gets a detached counter holding the current value.
        state = dict(self.__dict__)
        if multiprocessing.context.get_spawning_popen() is None:
            state["_value"] = self.value
        return state

    def __setstate__(self, state):
        value = state["_value"]
        self.__dict__.update(state)
        if isinstance(value, int):
            self._value = multiprocessing.get_context().Value("q", value)


# ----------------------------------------------------------------------------- streams


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


class ResampledShards(torch.utils.data.IterableDataset):
    """Endless shard URLs drawn with replacement, seeded by (seed, rank, worker, epoch).

    Each ``iter()`` is one epoch: the epoch counter advances in whichever process iterates (a
    persistent worker keeps its own), starting from ``epoch``.
    """

    def __init__(self, urls: Sequence[str], seed: int, rank: int = 0, epoch: int = 0):
        super().__init__()
        if not urls:
            raise ConfigError("train_shards", "no training shards found")
        self.urls, self.seed, self.rank, self.epoch = list(urls), int(seed), int(rank), int(epoch) - 1

    def __iter__(self):
        import random

        self.epoch += 1
        worker, _ = _worker()
        rng = random.Random(f"shards/{self.seed}/{self.rank}/{worker}/{self.epoch}")
        while True:
            yield {"url": self.urls[rng.randrange(len(self.urls))]}


class SeededShuffle(wds.PipelineStage):
    """A shuffle buffer seeded by (seed, rank, worker, epoch); its epoch advances per ``run``."""

    def __init__(self, bufsize: int, seed: int, rank: int = 0, epoch: int = 0):
        self.bufsize, self.seed, self.rank, self.epoch = int(bufsize), int(seed), int(rank), int(epoch) - 1

    def run(self, src):
        import random

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


def _count_local(urls: Sequence[str]) -> int | None:
    """Samples in local shards: from ``index.json`` beside them when it lists them, else by scanning."""
    paths = [_local_path(u) for u in urls]
    if any(p is None for p in paths):
        return None
    counts: dict[Path, int] = {}
    for index_file in {p.parent / "index.json" for p in paths}:
        if index_file.exists():
            for shard in json.loads(index_file.read_text()).get("shards", []):
                counts[(index_file.parent / shard["path"]).resolve()] = int(shard["count"])
    total = 0
    for p in paths:
        rp = p.resolve()
        if rp in counts:
            total += counts[rp]
            continue
        with tarfile.open(p) as tar:
            total += len({_member_key(m.name) for m in tar if m.isfile() and _keep_member(m.name)})
    return total


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
        val_max_samples: int | None = None,
        synthetic: dict | None = None,
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
        self.root = Path(root) if root is not None else None
        self.shards = {"train": train_shards, "val": val_shards, "test": test_shards}
        self.sample_counts = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.tokenizer_path = tokenizer_path if tokenizer_path is not None else str(self.root / "tokenizer")
        self.template = template
        self.image_size = int(image_size)
        self.processor = ImageProcessor(self.image_size, tuple(image_mean), tuple(image_std), bool(pad_to_square))
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else self.batch_size
        self.num_workers = int(num_workers)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.max_length = int(max_length) if max_length else None
        self.val_max_samples = int(val_max_samples) if val_max_samples else None
        self.synthetic = dict(synthetic) if synthetic is not None else None
        self._tokenizer = None
        self._counter = SkipCounter()
        self._resolved: dict[str, tuple[list[str], int | None]] = {}

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

    @property
    def skipped(self) -> int:
        """Samples skipped so far (decode or encode failures), all workers together."""
        return self._counter.value

    # -- lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from vtc.data.synthetic import ensure_synthetic

            ensure_synthetic(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        for split in _SPLITS:
            self._resolve(split)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self._counter.reset(int(state_dict.get("skipped", 0)))

    # -- shards --------------------------------------------------------------------------------
    def _resolve(self, split: str) -> tuple[list[str], int | None]:
        """Shard URLs and sample count of a split (``([], 0)`` when the split is absent)."""
        if split in self._resolved:
            return self._resolved[split]
        spec, count = self.shards[split], self.sample_counts[split]
        if spec is not None:
            specs = [spec] if isinstance(spec, str) else list(spec)
            urls = [u for s in specs for u in wds.shardlists.expand_urls(str(s))]
            if count is None:
                count = _count_local(urls)
        elif self.root is not None and (self.root / split / "index.json").exists():
            index = json.loads((self.root / split / "index.json").read_text())
            urls = [str(self.root / split / s["path"]) for s in index["shards"]]
            count = int(index["total"]) if count is None else count
        else:
            urls, count = [], 0
        self._resolved[split] = (urls, None if count is None else int(count))
        return self._resolved[split]

    def _world(self) -> tuple[int, int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0, 0
        return int(trainer.world_size), int(trainer.global_rank), int(trainer.current_epoch)

    def _decoder(self, train: bool) -> SampleDecoder:
        return SampleDecoder(self.tokenizer, self.template, self.max_length, self.processor, require_supervision=train)

    # -- loaders -------------------------------------------------------------------------------
    def train_dataloader(self):
        urls, total = self._resolve("train")
        if not urls:
            raise ConfigError("data.train_shards", f"no training shards (root={self.root})")
        if total is None:
            raise ConfigError("data.train_samples", "cannot count samples in remote shards; set train_samples")
        world, rank, epoch = self._world()
        n_batches = max(1, total // (self.batch_size * world))
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pipeline = wds.DataPipeline(
            ResampledShards(urls, self.seed, rank, epoch),
            wds.tarfile_to_samples(handler=self._counter, select_files=_keep_member),
            SeededShuffle(self.shuffle_buffer, self.seed, rank, epoch),
            wds.map(self._decoder(train=True), handler=self._counter),
            wds.batched(self.batch_size, partial=False,
                        collation_fn=partial(collate, pad_id=self.pad_token_id, image_size=self.image_size)),
        )
        loader = wds.WebLoader(
            pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, worker_init_fn=_worker_init,
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        return loader.with_epoch(n_batches).with_length(n_batches, silent=True)

    def _eval_dataloader(self, split: str, limit: int | None):
        urls, total = self._resolve(split)
        if not urls:
            raise ConfigError(f"data.{split}_shards", f"no {split} shards (root={self.root})")
        stages = [
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=self._counter, select_files=_keep_member),
            wds.map(self._decoder(train=False), handler=self._counter),
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
