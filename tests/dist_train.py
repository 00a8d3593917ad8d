"""One Lightning training run of the tiny LMM on a fixed list of global batches, for
tests/distributed/test_distributed.py. The trainer comes from the real config group (conf/trainer/NAME.yaml,
composed by Hydra, moved to CPU), so the test exercises the shipped ddp / fsdp2 configs.

    python tests/dist_train.py --trainer cpu --out DIR                                   # reference
    torchrun --standalone --nproc-per-node 2 tests/dist_train.py --trainer fsdp2 --out DIR --stop-at 3
    torchrun --standalone --nproc-per-node 2 tests/dist_train.py --trainer fsdp2 --out DIR2 --resume DIR/ckpt/last.ckpt

Identical global batches whatever the world size: the data set is a fixed list of samples, global
batch k is samples [k*G, (k+1)*G); rank r reads samples r, r+W, r+2W, ... in order, G/W at a time,
so the W ranks together read exactly global batch k (Lightning's own sampler would shuffle). Every
sample has the same number of answer tokens, so the mean of the ranks' token-mean losses is the
global token-mean loss and DDP's / FSDP2's averaged gradients equal the single-process gradient.
One epoch is exactly ``--epoch-steps`` steps, so a run stopped at that step resumes at an epoch
boundary (a plain DataLoader restarts its epoch on resume). Runs always plan ``--steps`` steps (the
LR schedule depends on it); ``--stop-at`` ends one early, after its checkpoint is written.

Writes (rank 0) OUT/losses.json: {step: global mean loss}; every rank OUT/shards_rank{r}.json: the
parameter elements it holds per FSDP unit (fsdp2), to check vtc.distributed.fsdp2's arithmetic.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402

from vtc.data.batch import IGNORE_INDEX  # noqa: E402
from tests.tiny import IMG, tiny_lmm  # noqa: E402

SEQ = 12
ANSWER = 3  # answer tokens per sample (equal for every sample: see the module docstring)


def make_samples(n: int, image_size: int = 56, seed: int = 0) -> list[dict]:
    """``n`` samples: ``1 q q <image> q q q q : a a a 2``, the answer a function of the question
    (learnable, so the loss moves), a random image each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        q = torch.randint(3, 40, (6,), generator=g)
        ans = (q[:ANSWER] * 7 + q[3:]) % 37 + 3
        ids = torch.cat([torch.tensor([1]), q[:2], torch.tensor([IMG]), q[2:], torch.tensor([44]), ans,
                         torch.tensor([2])])[:SEQ]
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-ANSWER - 1:] = ids[-ANSWER - 1:]  # the answer and eos
        out.append({"input_ids": ids, "labels": labels,
                    "pixel_values": torch.randn(3, image_size, image_size, generator=g), "id": f"s{i}"})
    return out


def collate(samples: list[dict]) -> dict:
    return {
        "input_ids": torch.stack([s["input_ids"] for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "attention_mask": torch.ones(len(samples), SEQ, dtype=torch.long),
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "image_index": torch.arange(len(samples)),
        "ids": [s["id"] for s in samples],
    }


class Record(Callback):
    """The global mean loss of each step (mean over ranks of the local token-mean losses)."""

    def __init__(self, out: Path, stop_at: int | None):
        self.out, self.stop_at, self.losses = out, stop_at, {}

    def on_train_start(self, trainer, pl_module):
        from vtc.distributed.fsdp2 import is_fsdp2, unit_params

        if not is_fsdp2(pl_module.model):
            return
        held = {}
        for name, params in unit_params(pl_module.model):
            held[name] = sum(p.to_local().numel() for _, p in params)
        (self.out / f"shards_rank{trainer.global_rank}.json").write_text(json.dumps(held))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if os.environ.get("DIST_TRAIN_DEBUG"):
            print("rank", trainer.global_rank, "step", trainer.global_step, batch["ids"], float(outputs["loss"]), flush=True)
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
        self.losses[trainer.global_step] = float(loss)
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            (self.out / "losses.json").write_text(json.dumps(self.losses))


def build_trainer(name: str, devices: int, steps: int, out: Path, callbacks: list):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from vtc.config import CONF_DIR

    overrides = [f"trainer={name}", "trainer.accelerator=cpu", f"trainer.devices={devices}",
                 "trainer.precision=32-true", f"trainer.max_steps={steps}", "trainer.gradient_clip_val=1.0"]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return instantiate(cfg.trainer, default_root_dir=str(out), logger=False, callbacks=callbacks,
                       enable_progress_bar=False, limit_val_batches=0, use_distributed_sampler=False,
                       log_every_n_steps=1)


def fit(args, out: Path, stop_at: int | None, resume: str | None) -> None:
    from vtc.train.module import LMMModule

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    compressor = None
    if args.compressor:  # e.g. "vtc.compressors.fastv.FastV:layer=1,ratio=0.5"
        from hydra.utils import get_class

        target, _, kw = args.compressor.partition(":")
        kwargs = {k: float(v) if "." in v else int(v) for k, v in (x.split("=") for x in kw.split(",") if x)}
        compressor = get_class(target)(**kwargs)
    module = LMMModule(tiny_lmm(compressor, seed=0), train_parts=("projector", "compressor", "llm"), lr=3e-3,
                       warmup_ratio=0.0)
    samples = make_samples(args.epoch_steps * args.global_batch)
    # Lightning's own DistributedSampler always shuffles training data: ours reads every W-th sample.
    rank = int(os.environ.get("RANK", "0"))
    loader = torch.utils.data.DataLoader(samples, batch_size=args.global_batch // world, collate_fn=collate,
                                         sampler=list(range(rank, len(samples), world)))
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0,
                           every_n_train_steps=stop_at or args.steps)
    trainer = build_trainer(args.trainer, world, args.steps, out, [ckpt, Record(out, stop_at)])
    trainer.fit(module, train_dataloaders=loader, ckpt_path=resume)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trainer", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--epoch-steps", type=int, default=3)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--compressor", default=None, help="CLASS[:k=v,...], e.g. vtc.compressors.fastv.FastV:layer=1")
    ap.add_argument("--then-resume", default=None,
                    help="after a --stop-at run, resume from its last.ckpt in the same processes with a fresh "
                         "model, optimizer and trainer, writing to this folder")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fit(args, out, args.stop_at, args.resume)
    if args.then_resume:
        out2 = Path(args.then_resume)
        out2.mkdir(parents=True, exist_ok=True)
        fit(args, out2, None, str(out / "ckpt" / "last.ckpt"))


if __name__ == "__main__":
    main()
