"""compile_llm: when it applies, that compiled training forwards match the eager ones, that
evaluation stays eager, and that a failed compilation falls back with a warning."""
from __future__ import annotations

import pytest
import torch

from vtc.errors import ConfigError
from vtc.model.compile import AUTO_MIN_STEPS, should_compile
from tests.tiny import tiny_lmm, toy_batch


def test_the_decision():
    assert should_compile("auto", "cpu", AUTO_MIN_STEPS) and should_compile("auto", "cpu", 2000)
    assert not should_compile("auto", "cpu", AUTO_MIN_STEPS - 1)  # tests and smoke runs
    assert not should_compile("auto", "cpu", None) and not should_compile("auto", "gpu", 2000)
    assert should_compile(True, "gpu", 5) and should_compile("true", "cpu", 1)
    assert not should_compile(False, "cpu", 2000) and not should_compile("False", "cpu", 2000)
    with pytest.raises(ConfigError, match="compile_llm"):
        should_compile("maybe", "cpu", 2000)


def test_check_config_names_a_bad_compile_llm():
    from vtc.assembly.checks import check_config
    from vtc.config import compose_conf

    with pytest.raises(ConfigError, match="compile_llm"):
        check_config(compose_conf("train", ["compile_llm=sometimes"]))


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
def test_compiled_training_forward_matches_eager_and_eval_stays_eager():
    batch = toy_batch()
    eager, compiled = tiny_lmm(seed=3).train(), tiny_lmm(seed=3).train()
    keys = list(compiled.state_dict())
    compiled.llm.compile_layers()
    assert list(compiled.state_dict()) == keys  # checkpoints do not see the compiled callables
    ref_loss, ref_grads = _loss_and_grads(eager, batch)
    loss, grads = _loss_and_grads(compiled, batch)
    assert compiled.llm._compiled.proven and not compiled.llm._compiled.failed
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    # a batch of another padded length runs through the same (dynamic) compiled layers
    longer = {k: v for k, v in batch.items()}
    pad = torch.zeros(3, 2, dtype=torch.long)
    longer["input_ids"] = torch.cat([batch["input_ids"], pad], 1)
    longer["attention_mask"] = torch.cat([batch["attention_mask"], pad], 1)
    longer["labels"] = torch.cat([batch["labels"], pad - 100], 1)
    torch.testing.assert_close(_loss_and_grads(compiled, longer)[0], _loss_and_grads(eager, longer)[0],
                               rtol=1e-5, atol=1e-6)
    # evaluation and generation never enter the compiled layers
    calls = []
    for f in compiled.llm._compiled.layers:
        f.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        compiled.eval()
        out = compiled.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                batch["image_index"], max_new_tokens=3, eos_token_id=-1)
        ref = eager.eval().generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                    batch["image_index"], max_new_tokens=3, eos_token_id=-1)
    assert calls == [] and torch.equal(out[1], ref[1])


def test_a_failed_compilation_warns_and_trains_eagerly(monkeypatch):
    batch = toy_batch()
    eager, model = tiny_lmm(seed=4).train(), tiny_lmm(seed=4).train()
    model.llm.compile_layers()
    compiled = model.llm._compiled

    def broken(*args, **kwargs):
        raise RuntimeError("InductorError: no working C++ compiler found")

    compiled.layers = [broken] * len(compiled.layers)
    with pytest.warns(RuntimeWarning, match="compile_llm: compiling the decoder layers failed"):
        loss, grads = _loss_and_grads(model, batch)
    assert compiled.failed and not compiled.proven
    ref_loss, ref_grads = _loss_and_grads(eager, batch)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)
    # later steps go straight to the eager layers, without warning again
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert torch.equal(_loss_and_grads(model, batch)[0], _loss_and_grads(eager, batch)[0])
    assert not [w for w in seen if "compile_llm" in str(w.message)]
