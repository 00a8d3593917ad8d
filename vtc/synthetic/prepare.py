"""Make what a run needs exist before it starts: the synthetic data set, the tiny encoder.

Both are cached under ``data/`` and built under a file lock, so concurrent jobs (a sweep with a
parallel launcher, several ranks) build them once and never read a half-written copy.
"""
from __future__ import annotations

import logging
import os

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from vtc.synthetic.encoder_pretrain import pretrain_encoder
from vtc.synthetic.shards import ensure_synthetic

log = logging.getLogger(__name__)


def ensure_data(cfg: DictConfig) -> None:
    gen = OmegaConf.select(cfg, "data.generate")
    if not gen:
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
            pretrain_encoder(
                out_dir=path,
                encoder_config=OmegaConf.to_container(cfg.encoder.config, resolve=True),
                kind=cfg.encoder.kind,
                select_layer=cfg.encoder.select_layer,
                image_mean=list(cfg.data.image_mean),
                image_std=list(cfg.data.image_std),
                **OmegaConf.to_container(pre, resolve=True),
            )


def prepare(cfg: DictConfig) -> None:
    ensure_data(cfg)
    ensure_encoder(cfg)
