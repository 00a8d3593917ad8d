"""The tiny tower's pre-training stage: its per-patch targets and the optional position head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vtc.synthetic.shards import generate
from vtc.synthetic.world import cell_edges
from vtc.synthetic.encoder_pretrain import EMPTY, patch_targets, position_targets, pretrain_encoder


@pytest.mark.parametrize("image_size,patch_size,grid", [(112, 14, 3), (56, 14, 2), (84, 14, 4)])
def test_patch_targets_are_the_digit_under_each_patch_centre(image_size, patch_size, grid):
    board = torch.arange(grid * grid).reshape(grid, grid) % 11 - 1  # -1 = empty, 0..9 digits
    got = patch_targets(board.tolist(), image_size, patch_size)
    edges = cell_edges(image_size, grid)
    n = image_size // patch_size
    want = []
    for py in range(n):
        for px in range(n):
            cy, cx = (py + 0.5) * patch_size, (px + 0.5) * patch_size  # the centre pixel
            r = max(i for i in range(grid) if edges[i] <= cy)
            c = max(i for i in range(grid) if edges[i] <= cx)
            v = int(board[r, c])
            want.append(EMPTY if v < 0 else v)
    assert got.tolist() == want


def test_position_targets_are_raster_row_and_column():
    rows, cols = position_targets(56, 14)
    assert rows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert cols.tolist() == [0, 1, 2, 3] * 4


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre") / "d"
    generate(root, seed=1, n_train=64, n_val=16, n_test=4, image_size=56, grid=2, shard_size=64, workers=1,
             verbose=False)
    return root


TINY = dict(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2)


def test_position_head_learns_where_each_patch_is(boards, tmp_path):
    stats = pretrain_encoder(str(tmp_path / "pos"), TINY, str(boards), steps=60, batch_size=16, lr=3e-3,
                             samples=64, seed=0, position=True)
    # 16 positions: chance is 1/16; the head reads them off the tower's features after 60 steps
    assert stats["position"] is True and stats["val_position_acc"] > 4 / 16
    saved = json.loads((tmp_path / "pos" / "pretrain.json").read_text())
    assert saved["val_position_acc"] == stats["val_position_acc"]
    torch.manual_seed(123)
    plain = pretrain_encoder(str(tmp_path / "plain"), TINY, str(boards), steps=2, batch_size=16, samples=64)
    assert plain["position"] is False and "val_position_acc" not in plain
    after = torch.rand(3)  # the stage seeds and draws inside a forked RNG: the caller's stream goes on
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))


def test_config_switch_reaches_the_stage_and_names_the_cache(boards, tmp_path):
    """`encoder.pretrain.position=true` from the command line: its own cached tower, built with the head."""
    from vtc.config import compose_conf
    from vtc.synthetic.prepare import ensure_encoder

    common = [f"paths.data_dir={tmp_path}", f"data.root={boards}", "encoder.image_size=56",
              "encoder.config.hidden_size=32", "encoder.config.intermediate_size=64",
              "encoder.pretrain.steps=2", "encoder.pretrain.samples=16", "encoder.pretrain.batch_size=4"]
    on = compose_conf("train", [*common, "encoder.pretrain.position=true"])
    off = compose_conf("train", common)
    assert on.encoder.path != off.encoder.path and "posTrue" in on.encoder.path
    ensure_encoder(on)
    assert json.loads((Path(on.encoder.path) / "pretrain.json").read_text())["position"] is True
