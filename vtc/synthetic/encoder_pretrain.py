"""A vision tower for the synthetic world, pre-trained once and cached: CLIP's part in miniature.

LLaVA never trains CLIP: it arrives already able to describe image patches. Trained from scratch
together with the LLM on the synthetic questions, a tiny encoder does not learn in a demo's time
(17% after 9 minutes, see design.md), so the platform gives it a short supervised stage first:
each patch token of the selected layer classifies the digit in the board cell under the patch's
centre (10 digits + empty). With ``position=True`` a second linear head also reads each patch's
row and column on the patch grid from the same features: the tower's position embeddings are
already linearly decodable from them, and this asks the tower to keep them as plain as the digit,
as the LLM has to find the asked cell among 64 tokens. The result is saved with
``save_pretrained`` and then loaded and frozen like any real encoder; ``pretrain.json`` beside the
weights records the stage's statistics (held-out patch accuracy, and position accuracy).
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tarfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vtc.data.image import ImageProcessor
from vtc.model.encoder import VisionEncoder

log = logging.getLogger(__name__)
EMPTY = 10


def patch_cells(n_patch: int, grid: int):
    """Board row (= column) index under each patch centre along one axis, as a numpy array."""
    return np.minimum(((np.arange(n_patch) + 0.5) * grid / n_patch).astype(np.int64), grid - 1)


def patch_targets(grid_digits: list[list[int]], image_size: int, patch_size: int) -> torch.Tensor:
    """Digit under each patch centre, raster order; cells tile the square board uniformly."""
    g = len(grid_digits)
    cell = torch.from_numpy(patch_cells(image_size // patch_size, g))
    table = torch.tensor(grid_digits)
    table = torch.where(table < 0, torch.full_like(table, EMPTY), table)
    return table[cell[:, None], cell[None, :]].flatten()


def position_targets(image_size: int, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch on the patch grid, raster order (two ``n*n`` long tensors)."""
    n = image_size // patch_size
    idx = torch.arange(n * n)
    return idx // n, idx % n


def read_samples(split_dir: str, limit: int):
    """(jpeg bytes, record) pairs from a split's shards, in index order, without webdataset."""
    with open(os.path.join(split_dir, "index.json")) as f:
        index = json.load(f)
    out = []
    for shard in index["shards"]:
        pending: dict[str, dict] = {}
        with tarfile.open(os.path.join(split_dir, shard["path"])) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                pending.setdefault(key, {})[ext] = data
                item = pending[key]
                if "jpg" in item and "json" in item:
                    out.append((item["jpg"], json.loads(item["json"])))
                    del pending[key]
                    if len(out) >= limit:
                        return out
    return out


@torch.random.fork_rng(devices=[])  # it seeds and draws; the caller's random state is left as it was
def pretrain_encoder(
    out_dir: str,
    encoder_config: dict,
    data_root: str,
    kind: str = "clip",
    select_layer: int = -2,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 1e-3,
    samples: int = 4000,
    seed: int = 0,
    position: bool = False,
) -> dict:
    t0 = time.time()
    torch.manual_seed(seed)
    encoder = VisionEncoder.build(kind=kind, config=encoder_config, select_layer=select_layer)
    info = encoder.info
    proc = ImageProcessor(info.image_size, image_mean, image_std)
    raw = read_samples(os.path.join(data_root, "train"), samples)
    if not raw:
        raise RuntimeError(f"no training samples under {data_root}/train for the encoder pre-training stage")
    pixels = torch.stack([proc(Image.open(io.BytesIO(jpg))) for jpg, _ in raw])
    targets = torch.stack([patch_targets(rec["grid"], info.image_size, info.patch_size) for _, rec in raw])
    head = torch.nn.Linear(info.hidden_size, EMPTY + 1)
    params = list(encoder.parameters()) + list(head.parameters())
    if position:  # one linear head reads the patch's row and column (n + n logits)
        n = info.image_size // info.patch_size
        rows, cols = position_targets(info.image_size, info.patch_size)
        pos_head = torch.nn.Linear(info.hidden_size, 2 * n)
        params += list(pos_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(s: int) -> float:  # linear warmup, cosine decay: a ViT from scratch needs both
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min((s - warmup) / max(steps - warmup, 1), 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    loss_val = float("nan")
    for step in range(steps):
        idx = torch.randint(len(raw), (batch_size,), generator=gen)
        feats = encoder(pixels[idx]).features
        logits = head(feats)
        loss = F.cross_entropy(logits.reshape(-1, EMPTY + 1), targets[idx].reshape(-1))
        if position:
            pos = pos_head(feats)
            loss = loss + F.cross_entropy(pos[..., :n].reshape(-1, n), rows.repeat(len(idx))) \
                + F.cross_entropy(pos[..., n:].reshape(-1, n), cols.repeat(len(idx)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_val = loss.item()
        if step % 100 == 0 or step == steps - 1:
            log.info("encoder pre-training step %d/%d loss %.4f", step, steps, loss_val)
    encoder.eval()
    with torch.no_grad():  # patch accuracy on held-out digits (the val split's source pool)
        val = read_samples(os.path.join(data_root, "val"), 256)
        vpx = torch.stack([proc(Image.open(io.BytesIO(jpg))) for jpg, _ in val])
        vtg = torch.stack([patch_targets(rec["grid"], info.image_size, info.patch_size) for _, rec in val])
        vfeats = encoder(vpx).features
        patch_acc = float((head(vfeats).argmax(-1) == vtg).float().mean())
    stats = {"loss": loss_val, "val_patch_acc": patch_acc, "seconds": round(time.time() - t0, 1),
             "steps": steps, "samples": len(raw), "position": bool(position)}
    if position:
        with torch.no_grad():
            pos = pos_head(vfeats)
            hit = (pos[..., :n].argmax(-1) == rows) & (pos[..., n:].argmax(-1) == cols)
        stats["val_position_acc"] = float(hit.float().mean())
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.model.save_pretrained(tmp)
    with open(os.path.join(tmp, "pretrain.json"), "w") as f:
        json.dump(stats, f, indent=2)
    os.replace(tmp, out_dir)  # atomic: a killed run never leaves a complete-looking encoder
    log.info("encoder pre-trained in %.0fs: %s", stats["seconds"], stats)
    return stats
