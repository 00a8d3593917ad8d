"""Make what a run needs exist before it starts: the synthetic data set, the tiny encoder.

Both are cached under ``data/`` and built under a file lock, so concurrent jobs (a sweep with a
parallel launcher, several ranks) build them once and never read a half-written copy.

``data.generate.kind`` picks the set: ``image`` (the default when absent: the digit-grid images,
:mod:`vtc.synthetic.shards`) or ``video`` (the digit-board clips, :mod:`vtc.synthetic.video_shards`).
For a video set the tiny encoder pre-trains on single frames of its own clips (the set's
``frames/`` folder, same renderer and geometry as its videos) unless ``encoder.pretrain.data_root``
was pointed elsewhere; its cache name ends in the video set's folder name, so it never collides
with an image set's encoder.
"""
from __future__ import annotations

import logging
import os

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from vtc.synthetic.encoder_pretrain import pretrain_encoder
from vtc.synthetic.shards import ensure_synthetic
from vtc.synthetic.video_shards import ensure_video, frames_root

log = logging.getLogger(__name__)


def _is_video(cfg: DictConfig) -> bool:
    gen = OmegaConf.select(cfg, "data.generate")
    return bool(gen) and gen.get("kind", "image") == "video"


def _ensure_video_data(root: str, gen: DictConfig) -> None:
    if not os.path.exists(os.path.join(root, "DONE")):
        log.warning("no synthetic video set for these data.generate settings yet: building %s (~1 min per 8000 "
                    "clips of 8 frames on 2 cores; the tiny encoder is pre-trained on its frames next)", root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with FileLock(root + ".lock"):
        ensure_video(root, seed=gen.seed, n_train=gen.n_train, n_val=gen.n_val, n_test=gen.n_test,
                     image_size=gen.image_size, grid=gen.grid, frames=gen.frames,
                     train_turns=gen.get("train_turns", 1), train_readout=gen.get("train_readout", 0),
                     encoder_frames=gen.get("encoder_frames", 6000))


def ensure_data(cfg: DictConfig) -> None:
    gen = OmegaConf.select(cfg, "data.generate")
    if not gen:
        return
    if _is_video(cfg):
        _ensure_video_data(cfg.data.root, gen)
        return

    root = cfg.data.root
    if not os.path.exists(os.path.join(root, "DONE")):
        # Every data.generate.* setting names its own cached set: a changed one builds anew, and
        # (its encoder being cached by data root) pre-trains a new tiny encoder too. Say so.
        log.warning("no synthetic set for these data.generate settings yet: building %s (~15-30 s; the tiny encoder "
                    "is pre-trained for it next, ~70-95 s)", root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with FileLock(root + ".lock"):
        ensure_synthetic(
            root,
            seed=gen.seed,
            n_train=gen.n_train,
            n_val=gen.n_val,
            n_test=gen.n_test,
            image_size=gen.image_size,
            grid=gen.grid,
            train_turns=gen.get("train_turns", 1),
            train_readout=gen.get("train_readout", 0),
        )


def ensure_encoder(cfg: DictConfig) -> None:
    pre = OmegaConf.select(cfg, "encoder.pretrain")
    path = cfg.encoder.path
    if not pre or os.path.isdir(path):
        return

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):
        if not os.path.isdir(path):
            log.warning("no pre-trained tiny encoder for these encoder.* / data settings yet: pre-training %s "
                        "(~70-95 s on 2 cores, once; later runs find it cached)", path)
            kwargs = OmegaConf.to_container(pre, resolve=True)
            if _is_video(cfg) and kwargs.get("data_root") == cfg.data.root:
                kwargs["data_root"] = frames_root(cfg.data.root)  # the video set's single frames
            pretrain_encoder(
                out_dir=path,
                encoder_config=OmegaConf.to_container(cfg.encoder.config, resolve=True),
                kind=cfg.encoder.kind,
                select_layer=cfg.encoder.select_layer,
                image_mean=list(cfg.data.image_mean),
                image_std=list(cfg.data.image_std),
                **kwargs,
            )


def prepare(cfg: DictConfig) -> None:
    ensure_data(cfg)
    ensure_encoder(cfg)
