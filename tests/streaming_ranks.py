"""A real multi-process launch for tests/data/test_streaming.py (not collected by pytest).

``python -m tests.streaming_ranks OUT.json SHARDS TOKENIZER [--world 2] [--workers 2]`` starts
``world`` processes with ``torch.multiprocessing.spawn``, joins them in a gloo process group and,
in each, builds ``VTCDataModule(train_shards=SHARDS)`` (rank and world size come from
``torch.distributed``) and iterates its training loader in lock-step, as DDP does: before every
step all ranks ``all_reduce`` whether they still have a batch. A rank that runs out earlier than
another would, under DDP, leave the others waiting in their gradient all-reduce at the epoch's
end; here the step is recorded as broken instead of hanging. Three runs: seed 0 for two epochs,
seed 0 again for two epochs (fresh datamodule, fresh workers), seed 1 for one epoch. Rank 0
writes every rank's batch ids, batch counts, ``len()`` and skip counts to OUT.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RUNS = (("a", 0, 2), ("b", 0, 2), ("c", 1, 1))  # name, seed, epochs


def _epoch(loader, world: int) -> dict:
    ids, steps, broken = [], 0, 0
    it = iter(loader)
    while True:
        batch = next(it, None)
        have = torch.tensor([0 if batch is None else 1])
        dist.all_reduce(have)  # the lock-step every DDP training step has (its gradient all-reduce)
        if int(have) == 0:
            break
        steps += 1
        broken += int(have) != world
        if batch is not None:
            ids.append(batch["ids"])
    return {"batches": len(ids), "steps": steps, "broken_steps": broken, "ids": ids}


def _rank(rank: int, world: int, args: argparse.Namespace) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(args.port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # Children of mp.spawn'd processes are spawned too (each re-imports torch, transformers,
    # lightning: ~15 s per DataLoader worker here); a torchrun / Lightning launch forks them.
    mp.set_start_method("fork", force=True)
    from vtc.data.datamodule import VTCDataModule

    out = {"rank": rank}
    for name, seed, epochs in RUNS:
        dm = VTCDataModule(train_shards=args.shards, tokenizer_path=args.tokenizer, batch_size=args.batch_size,
                           num_workers=args.workers, shuffle_buffer=16, seed=seed, image_size=28, max_length=256)
        dm.setup("fit")
        loader = dm.train_dataloader()
        out[name] = [{"len": len(loader), **_epoch(loader, world)} for _ in range(epochs)]
        out[name + "_counts"] = dm.skip_counts
        del loader  # stops this run's persistent workers
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("shards")
    p.add_argument("tokenizer")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    mp.spawn(_rank, args=(args.world, args), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
