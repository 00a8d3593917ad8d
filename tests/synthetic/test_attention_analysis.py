"""vtc.synthetic.attention_analysis: board regions against pixel-space cell edges, shares by hand, the
recorded attention against an independent computation of layer 0, and the CLI on a trained run."""
import json
import math

import numpy as np
import pytest
import torch

from vtc.synthetic.attention_analysis import AttentionRecorder, main, region_masks, region_shares
from vtc.synthetic.world import cell_edges
from tests.tiny import single, tiny_lmm, toy_batch


@pytest.mark.parametrize("image_size,patch,grid", [(112, 14, 3), (112, 14, 4), (336, 14, 3), (56, 14, 2)])
def test_regions_follow_the_cell_under_each_patch_centre(image_size, patch, grid):
    n = image_size // patch
    edges = cell_edges(image_size, grid)
    cell_of = [max(k for k in range(grid) if edges[k] <= i * patch + patch / 2) for i in range(n)]
    for r in range(grid):
        for c in range(grid):
            m = region_masks(grid, n, r, c).reshape(4, n, n)
            assert (m.sum(0) == 1).all()  # every patch in exactly one region
            for i in range(n):
                for j in range(n):
                    want = (cell_of[i] == r, cell_of[j] == c)
                    region = {(True, True): 0, (True, False): 1, (False, True): 2, (False, False): 3}[want]
                    assert m[region, i, j], (r, c, i, j)


def test_shares_by_hand():
    masks = region_masks(2, 2, 0, 1)  # 2x2 patches on a 2x2 board: cell (0,1) is patch 1
    assert masks.astype(int).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    attn = np.array([[0.1, 0.3, 0.05, 0.05], [0.2, 0.2, 0.2, 0.2]])  # head 0 puts 0.5 on the image
    got = region_shares(attn, masks)
    assert got[0] == pytest.approx([0.5, 0.6, 0.2, 0.1, 0.1])
    assert got[1] == pytest.approx([0.8, 0.25, 0.25, 0.25, 0.25])


def test_recorder_sees_what_the_model_computes():
    lmm = tiny_lmm(seed=1)
    batch = single(toy_batch(), 0)  # one unpadded sample with an image in the middle
    with torch.no_grad():
        ref = lmm(batch).loss
        with AttentionRecorder(lmm.llm) as rec:
            assert float(lmm(batch).loss) == pytest.approx(float(ref), abs=1e-5)  # eager == sdpa
            state = lmm.build_sequence(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       batch["pixel_values"], batch["image_index"])
            rec.maps.clear()
            lmm.llm.run_layers(state, None)
        assert lmm.llm.config._attn_implementation == "sdpa"  # restored
        assert len(rec.maps) == lmm.llm.config.num_hidden_layers
        # layer 0 recomputed from its projections: softmax(q k^T / sqrt(d) + causal mask)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cfg = lmm.llm.config
        layer = lmm.llm.layers[0]
        x = layer.input_layernorm(state.hidden)
        B, T, _ = x.shape
        d = cfg.hidden_size // cfg.num_attention_heads
        q = layer.self_attn.q_proj(x).view(B, T, -1, d).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(B, T, -1, d).transpose(1, 2)
        cos, sin = lmm.llm.decoder.rotary_emb(x, position_ids=state.position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(rec.maps[0], scores.softmax(-1), atol=1e-5, rtol=1e-4)
        for m in rec.maps:
            torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=1e-5, rtol=0)


def test_cli_on_a_trained_checkpoint(workspace, tmp_path, capsys):
    run_dir = tmp_path / "run"
    workspace.run("train.py", "trainer.max_steps=2", "test=false", f"hydra.run.dir={run_dir}")
    out = tmp_path / "attn.json"
    res = main([str(run_dir / "checkpoints" / "last.ckpt"), "--samples", "6", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "cell questions; uniform shares" in printed and "answer position" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res)) and 0 < saved["n"] <= 6
    answer = np.array(saved["answer"])
    assert answer.shape[2] == 5 and answer.shape[0] == 4  # layers x heads x (mass + 4 regions)
    assert np.allclose(answer[..., 1:].sum(-1), 1) and ((answer[..., 0] > 0) & (answer[..., 0] <= 1 + 1e-6)).all()
    assert sum(saved["uniform"]) == pytest.approx(1)
    question = np.array(saved["question"])
    assert question.shape[1:] == answer.shape and len(saved["tokens"]) == question.shape[0]
    assert saved["tokens"][-1] == ":"  # the last question position is the answer position...
    assert np.allclose(question[-1], answer)  # ...and reads the same shares
