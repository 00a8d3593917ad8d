"""``python -m vtc.distributed.consolidate --ckpt DIR_OR_FILE --out FILE``: one torch file from a checkpoint.

A sharded checkpoint (trainer=fsdp2: ModelParallelStrategy; trainer=fsdp: FSDPStrategy with
``state_dict_type: sharded``) is a folder of torch.distributed.checkpoint shards plus Lightning's
``meta.pt`` (epoch, step, loops, callbacks, LR schedulers and vtc's own ``vtc`` entry: the run
config, the MLflow run id, cumulative FLOPs). This command gathers the shards with
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` (one process, no process group)
and writes the layout a single-process run writes:

  state_dict        full tensors, the same keys as a single-process checkpoint (``model.…``)
  optimizer_states  [torch.optim state dict], parameters renumbered 0..n-1 in param-group order
                    (a single-process optimizer's layout; the shards key them by name)
  everything else   from meta.pt, unchanged (``vtc`` included, so eval.py and vtc.eval.export accept it)

The result loads with ``torch.load(weights_only=True)``, is written to ``FILE.tmp`` and renamed.
A single-file checkpoint is checked and copied (the same atomic write).
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile

import torch

from vtc.distributed.checkpoints import META_FILE, is_sharded_checkpoint


def _renumber_optimizer(state: dict) -> dict:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint.state_dict) as torch.optim
    keys it: parameter ids 0..n-1 in the order of the param groups."""
    groups = state.get("param_groups", [])
    if not groups or all(isinstance(p, int) for g in groups for p in g["params"]):
        return state
    ids: dict[str, int] = {}
    new_groups = []
    for g in groups:
        params = []
        for name in g["params"]:
            ids.setdefault(name, len(ids))
            params.append(ids[name])
        new_groups.append({**g, "params": params})
    new_state = {ids[name]: s for name, s in state.get("state", {}).items() if name in ids}
    return {"state": new_state, "param_groups": new_groups}


def load_sharded(path: str) -> dict:
    """The checkpoint folder ``path`` as one dict in the single-process layout."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        flat = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(path, flat)
        tensors = torch.load(flat, map_location="cpu", weights_only=True)
    meta_path = os.path.join(path, META_FILE)
    meta = torch.load(meta_path, map_location="cpu", weights_only=True) if os.path.isfile(meta_path) else {}
    # ModelParallelStrategy stores the weights under "state_dict", FSDPStrategy under "model".
    weights = tensors.pop("state_dict", None)
    if weights is None:
        weights = tensors.pop("model", None)
    if weights is None:
        raise ValueError(f"{path}: no 'state_dict' or 'model' entry among {sorted(tensors)}")
    optim_keys = sorted((k for k in tensors if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    out = dict(meta)
    out["state_dict"] = weights
    if optim_keys:
        out["optimizer_states"] = [_renumber_optimizer(tensors.pop(k)) for k in optim_keys]
    for k, v in tensors.items():  # anything else saved through the shards
        out.setdefault(k, v)
    return out


def consolidate(ckpt: str, out: str) -> dict:
    """Write ``ckpt`` (a sharded folder or a file) to ``out`` as one weights-only torch file."""
    ckpt = os.fspath(ckpt)
    if is_sharded_checkpoint(ckpt):
        state = load_sharded(ckpt)
    elif os.path.isfile(ckpt):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{ckpt}: neither a checkpoint file nor a sharded checkpoint folder (.metadata)")
    if "state_dict" not in state:
        raise ValueError(f"{ckpt}: no state_dict")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return state


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vtc.distributed.consolidate", description=__doc__.split("\n\n")[0].split("``: ", 1)[-1])
    ap.add_argument("--ckpt", required=True, help="a sharded checkpoint folder (or a checkpoint file)")
    ap.add_argument("--out", required=True, help="the single torch file to write")
    args = ap.parse_args(argv)
    state = consolidate(args.ckpt, args.out)
    n = sum(t.numel() for t in state["state_dict"].values() if isinstance(t, torch.Tensor))
    print(f"{args.out}: {len(state['state_dict'])} tensors, {n:,} parameters, global step {state.get('global_step')}, "
          f"vtc config {'present' if (state.get('vtc') or {}).get('config') else 'absent'}")


if __name__ == "__main__":
    main()
