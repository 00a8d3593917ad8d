"""projector.frame_embeddings: a learned embedding of the frame index added to each video frame's
tokens (Video-LLaMA's frame position embedding), against an independent computation; trained with
the projector; refused where it cannot work."""
from __future__ import annotations

import pytest
import torch

from vtc.compressors.temporal import TemporalPool
from vtc.errors import ConfigError
from vtc.lmm import LMM

from tests.tiny import tiny_lmm, toy_video_batch


def with_frames(model: LMM, n: int) -> LMM:
    model.frame_embedding = torch.nn.Embedding(n, model.llm.hidden_size)
    torch.nn.init.normal_(model.frame_embedding.weight, std=1.0)
    return model


def test_each_frame_gets_its_index_embedding_and_images_none():
    plain, model = tiny_lmm(), with_frames(tiny_lmm(), 6)  # same seed: the same weights
    b = toy_video_batch(frames=4)
    with torch.no_grad():
        got = model.item_tokens(b["pixel_values"], b["visual_items"])
        ref = plain.item_tokens(b["pixel_values"], b["visual_items"])
        V = ref[0].shape[0] // 4
        emb = model.frame_embedding.weight
        want = torch.cat([ref[0][t * V:(t + 1) * V] + emb[t] for t in range(4)])
        assert torch.allclose(got[0], want, atol=1e-6)
        assert torch.equal(got[1], ref[1])  # the image: no frame embedding


def test_added_before_temporal_pooling():
    model = with_frames(tiny_lmm(TemporalPool(2)), 4)
    plain = tiny_lmm(TemporalPool(2))
    b = toy_video_batch(frames=4)
    with torch.no_grad():
        got = model.item_tokens(b["pixel_values"], b["visual_items"])[0]
        frames = plain.encode_images(b["pixel_values"][:4])  # [4, V, d]
        emb = model.frame_embedding.weight
        want = torch.stack([(frames[0] + emb[0] + frames[1] + emb[1]) / 2, (frames[2] + emb[2] + frames[3] + emb[3]) / 2])
        assert torch.allclose(got, want.reshape(-1, want.shape[-1]), atol=1e-5)


def test_trained_with_the_projector_and_a_longer_video_is_refused():
    from vtc.train.module import LMMModule

    model = with_frames(tiny_lmm(), 2)
    LMMModule(model, train_parts=("llm",))
    assert not model.frame_embedding.weight.requires_grad
    LMMModule(model, train_parts=("projector",))
    assert model.frame_embedding.weight.requires_grad
    out = model(toy_video_batch(frames=2))
    out.loss.backward()
    assert model.frame_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError) as e:
        model(toy_video_batch(frames=3))
    assert e.value.key == "projector.frame_embeddings" and "3 frames" in e.value.message


def test_config_refusals_name_the_key():
    from vtc.assembly.checks import check_config
    from vtc.config import compose_conf

    cfg = compose_conf("train", ["data=synthetic_video", "projector.frame_embeddings=4"])
    with pytest.raises(ConfigError) as e:
        check_config(cfg)
    assert e.value.key == "projector.frame_embeddings" and "data.generate.frames=8" in e.value.message
    with pytest.raises(ConfigError) as e:
        check_config(compose_conf("train", ["projector.frame_embeddings=-1"]))
    assert e.value.key == "projector.frame_embeddings"
    check_config(compose_conf("train", ["data=synthetic_video", "projector.frame_embeddings=8"]))


def test_export_refuses_the_llava_layout_and_keeps_it_in_vtc_s(tmp_path):
    from vtc.eval.export import hf_blockers

    model = with_frames(tiny_lmm(), 4)
    assert any("frame embedding" in w for w in hf_blockers(model))
    assert not any("frame embedding" in w for w in hf_blockers(tiny_lmm()))
