"""Where a trained model's LLM looks when it answers a synthetic cell question:
``python -m vtc.synthetic.attention_analysis CKPT [--split val] [--samples 256] [--json OUT]``.

CKPT is a ``train.py`` checkpoint trained on the synthetic benchmark; its cell questions ("What
digit is in row r, column c?") are read from the split's shards under the checkpoint's
``data.root``. Each prompt runs once through the model with eager attention (same weights, same
outputs as SDPA; only the attention probabilities become visible), and for every layer and head
the attention a text position pays to the visual tokens is split over four regions of the patch
grid: the asked **cell**, the rest of its **row**, the rest of its **column**, and everything
**else** (a patch belongs to the cell under its centre, as in the tiny tower's pre-training).
Each share is relative to the position's total visual attention, so uniform attention over the
patches gives each region its share of the patches (printed as ``uniform``).

Printed: the answer position (the last prompt token, which predicts the answer) per layer and
head, then every question token where some head attends to a region at least ``--lift`` times
its uniform share. Why it exists: val/acc of the default model was held back by its cell
questions; this showed that the answer position reads the image uniformly at every layer and
that the only localised read is the row number token's, at layer 0 -- rows found, columns not.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from omegaconf import OmegaConf

from vtc.assembly.build import build_datamodule
from vtc.assembly.checkpoint import load_trained
from vtc.data.collate import visual_items
from vtc.synthetic.encoder_pretrain import patch_cells
from vtc.synthetic.error_analysis import _CELL, load_boards

REGIONS = ("cell", "row", "column", "else")


def region_masks(grid: int, n_patch: int, r: int, c: int) -> np.ndarray:
    """``[4, n_patch**2]`` bools (raster order) for the regions of asked cell ``(r, c)`` on a
    ``grid`` x ``grid`` board covered by ``n_patch`` x ``n_patch`` patches."""

    cell = patch_cells(n_patch, grid)
    in_row = np.repeat((cell == r)[:, None], n_patch, 1)
    in_col = np.repeat((cell == c)[None, :], n_patch, 0)
    masks = np.stack([in_row & in_col, in_row & ~in_col, ~in_row & in_col, ~in_row & ~in_col])
    return masks.reshape(4, -1)


def region_shares(attn: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``attn`` [H, V] (one query row over the visual keys) -> [H, 5]: the visual mass, then each
    region's share of it."""
    mass = attn.sum(1, keepdims=True)
    return np.concatenate([mass, (attn @ masks.T.astype(attn.dtype)) / np.maximum(mass, 1e-12)], 1)


class AttentionRecorder:
    """Switches an LLM to eager attention and keeps each layer's probabilities [B, H, T, T]."""

    def __init__(self, llm):
        self.llm, self.maps = llm, []
        self._previous = llm.config._attn_implementation
        self._hooks = []

    def __enter__(self):
        self._set("eager")
        for layer in self.llm.layers:
            self._hooks.append(layer.self_attn.register_forward_hook(self._keep))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._set(self._previous)

    def _set(self, impl: str) -> None:
        model = self.llm.model
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(impl)
        else:
            model.config._attn_implementation = impl

    def _keep(self, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention layer returned no probabilities; this LLM cannot be analysed")
        self.maps.append(weights.detach().float())


def analyse(lmm, tokenizer, batches, boards: dict[str, dict], grid: int, max_samples: int = 256) -> dict:
    """Region shares for the cell questions in ``batches`` (generation batches of the eval
    loader); returns ``{"answer": [L, H, 5], "question": [K, L, H, 5], "tokens": [...], "n": ...,
    "uniform": [4]}``, ``question`` indexed by offset from the question's first token."""
    n_patch = None
    answer, question, tokens, n = None, None, None, 0
    uniform = np.zeros(4)
    with torch.no_grad(), AttentionRecorder(lmm.llm) as rec:
        for batch in batches:
            rec.maps.clear()
            state = lmm.build_sequence(batch["gen_input_ids"], batch["gen_attention_mask"], None,
                                       batch["pixel_values"], visual_items(batch))
            lmm.llm.run_layers(state, None)
            maps = [m.numpy() for m in rec.maps]
            for b, sid in enumerate(batch["ids"]):
                m = _CELL.search(boards.get(sid, {}).get("question", ""))
                if m is None or n >= max_samples:
                    continue
                vis = state.visual_mask[b].nonzero().squeeze(1).numpy()
                if n_patch is None:
                    n_patch = int(round(len(vis) ** 0.5))
                    if n_patch * n_patch != len(vis):
                        raise SystemExit(f"{len(vis)} visual tokens are not a square patch grid; analyse an uncompressed model")
                masks = region_masks(grid, n_patch, int(m.group(1)) - 1, int(m.group(2)) - 1)
                uniform += masks.sum(1) / masks.shape[1]
                qi = int(state.query_index[b])
                first = int(vis.max()) + 1
                qs = np.stack([np.stack([region_shares(w[b, :, p][:, vis], masks) for w in maps])
                               for p in range(first, qi + 1)])
                ans = qs[-1]  # the last question token is the answer position
                if answer is None:
                    answer, question = ans, qs
                    ids = batch["gen_input_ids"][b][batch["gen_attention_mask"][b].bool()].tolist()
                    tokens = tokenizer.convert_ids_to_tokens(ids)[-len(qs):]
                else:
                    k = min(len(question), len(qs))
                    answer, question = answer + ans, question[:k] + qs[:k]
                n += 1
            if n >= max_samples:
                break
    if not n:
        raise SystemExit("no cell questions found; is this a synthetic-benchmark checkpoint and split?")
    return {"n": n, "uniform": (uniform / n).tolist(), "answer": (answer / n).tolist(),
            "question": (question / n).tolist(), "tokens": tokens[: len(question)]}


def report(res: dict, lift: float = 1.5) -> str:
    u = res["uniform"]
    lines = [f"{res['n']} cell questions; uniform shares: " + ", ".join(f"{k} {v:.3f}" for k, v in zip(REGIONS, u)),
             "answer position (predicts the answer): layer head  visual_mass  " + "  ".join(REGIONS)]
    for li, layer in enumerate(res["answer"]):
        for h, v in enumerate(layer):
            lines.append(f"  {li} {h}  {v[0]:.3f}  " + "  ".join(f"{x:.3f}" for x in v[1:]))
    lines.append(f"question tokens (as in the first question) with a head that attends to a region >= {lift}x "
                 "its uniform share:")
    for k, tok in enumerate(res["tokens"]):
        for li, layer in enumerate(res["question"][k]):
            for h, v in enumerate(layer):
                hot = [f"{name} {x:.2f} ({x / u[j]:.1f}x)" for j, (name, x) in enumerate(zip(REGIONS, v[1:]))
                       if name != "else" and u[j] > 0 and x >= lift * u[j]]
                if hot:
                    lines.append(f"  token {k} {tok!r}: layer {li} head {h}: " + ", ".join(hot))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vtc.synthetic.attention_analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a train.py checkpoint trained on the synthetic benchmark")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--samples", type=int, default=256, help="cell questions to read (at most)")
    p.add_argument("--lift", type=float, default=1.5)
    p.add_argument("--json", help="also write the shares here")
    a = p.parse_args(argv)

    lmm, tokenizer, cfg = load_trained(a.ckpt)
    grid = OmegaConf.select(cfg, "data.generate.grid")
    if grid is None:
        raise SystemExit(f"{a.ckpt} was not trained on the synthetic benchmark (no data.generate)")
    boards = load_boards(f"{cfg.data.root}/{a.split}")
    dm = build_datamodule(cfg)
    dm.setup("validate" if a.split == "val" else "test")
    loader = dm.val_dataloader() if a.split == "val" else dm.test_dataloader()
    res = analyse(lmm, tokenizer, loader, boards, int(grid), a.samples)
    print(report(res, a.lift))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
