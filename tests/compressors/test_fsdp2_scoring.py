"""In-LLM methods that score with a decoder layer's weights outside its forward (FastV, DART,
PyramidDrop, SparseVLM, ...) under FSDP2, where those weights are sharded until gathered: the
method unshards what it reads (and reshards layer K-1, whose forward already ran). One gloo
process: the loss equals the unsharded model's and backward runs."""
from __future__ import annotations

import socket

import pytest

from tests.test_gpu import _compressors
from tests.tiny import tiny_lmm, toy_batch

SCORERS = sorted(name for name, (factory, _) in _compressors().items()
                 if (c := factory()) is not None and c.site == "llm" and c.reads_layer_weights)


def test_the_scoring_methods_are_all_here():
    assert {"fastv", "dart", "pyramid_drop", "sparsevlm"} <= set(SCORERS)


@pytest.mark.parametrize("name", SCORERS)
def test_scores_work_with_fsdp2_sharded_layers(name, monkeypatch):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if dist.is_initialized():
        pytest.skip("a process group already exists in this session")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    factory, kw = _compressors()[name]
    batch = toy_batch(image_size=kw.get("image_size", 56))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_lmm(factory(), **kw).train()
        ref = model(batch).loss.item()
        for layer in model.llm.layers:
            fully_shard(layer)
        fully_shard(model)
        out = model(batch)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(ref, abs=1e-5)
    finally:
        dist.destroy_process_group()
