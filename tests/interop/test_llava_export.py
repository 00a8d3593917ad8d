"""Exporting to LLaVA directories and ``model.init_from`` (vtc.interop), against transformers.

The tiny checkpoints and the reference are tests/interop/llava_dirs.py's; exports are read back by
transformers' ``LlavaForConditionalGeneration`` (logits max |diff| < 1e-4) and by vtc itself.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.interop.llava_dirs import (
    my_images, SIZE, PATCH, N, TOL, ROOT, MEAN, STD, make_tokenizer, write_json, save_hf, prompt_batch, diff
)
from tests.interop.llava_dirs import dirs, reference  # noqa: F401  (fixtures)
from vtc.compressors import AvgPool2d, NoCompression
from vtc.errors import ConfigError
from vtc.interop import LlavaLoadError, load_llava
from vtc.interop.parity import vtc_logits


# -- export ----------------------------------------------------------------------------------------
def image_settings():
    from vtc.interop.images import ImageSettings

    return ImageSettings(SIZE, tuple(MEAN), tuple(STD), True)


@pytest.mark.parametrize("compressor", ["none", "pool"])
def test_export_hf_loads_in_transformers_with_equal_logits(dirs, tmp_path, compressor):
    """A model trained with a parameter-free compressor exports to Llava; Llava runs it
    uncompressed; reading the export back with the same compressor gives the trained model."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vtc.eval.export import export_hf

    comp = AvgPool2d(2) if compressor == "pool" else NoCompression()
    L = load_llava(dirs["orig"], vision_tower_path=dirs["vision"], compressor=comp)
    m, tok = L.model, L.tokenizer
    with torch.no_grad():  # "training": move the weights away from the source checkpoint
        for p in m.projector.parameters():
            p.add_(0.05)
    out = str(tmp_path / "export")
    meta = export_hf(m, tok, out, image_settings())
    assert any("grown" in n for n in meta["notes"])  # <image> was past the 24-word vocabulary
    assert ("uncompressed" in " ".join(meta["notes"])) == (compressor == "pool")
    assert all(f.endswith(".safetensors") or not f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(out))
    hf, info = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    saved = m.compressor
    m.compressor = NoCompression()
    try:
        assert diff(m, hf.eval(), tok) < TOL
    finally:
        m.compressor = saved
    # Round trip through vtc with the training compressor.
    back = load_llava(out, compressor=AvgPool2d(2) if compressor == "pool" else None)
    b = prompt_batch(tok)
    a, la = vtc_logits(m, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, lc = vtc_logits(back.model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert torch.equal(la, lc)
    V = a.shape[-1]
    assert max(float((a[i, :n] - c[i, :n, :V]).abs().max()) for i, n in enumerate(la.tolist())) < TOL
    # transformers' own processor from the export: <image> -> N tokens, the same pixels as vtc.
    proc = AutoProcessor.from_pretrained(out, local_files_only=True)
    img = my_images()[0]
    enc = proc(text="USER : <image> what is in the picture ? ASSISTANT :", images=img, return_tensors="pt")
    assert int((enc["input_ids"] == m.image_token_id).sum()) == N
    assert float((enc["pixel_values"][0] - back.image_processor(img)).abs().max()) < 1e-5
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["suppress_tokens"] == [m.image_token_id]


@pytest.mark.parametrize("name", ["stf", "stf_mbtf"])
def test_export_vtc_round_trip_for_compressors_with_parameters(dirs, tmp_path, name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vtc.config import CONF_DIR
    from vtc.eval.export import export_hf, export_vtc, hf_blockers

    comp_cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "compressor" / f"{name}.yaml"))
    L = load_llava(dirs["hf"], compressor=instantiate(comp_cfg))
    assert L.report.new and any("is the projector" in r for r in L.report.ignored)
    m, tok = L.model, L.tokenizer
    assert hf_blockers(m)
    with pytest.raises(ValueError, match="use --format vtc"):
        export_hf(m, tok, str(tmp_path / "no"), image_settings())
    out = str(tmp_path / "vtc")
    export_vtc(m, tok, out, image_settings(), comp_cfg)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["format"] == "vtc-lmm" and cfg["compressor"]["_target_"] == comp_cfg["_target_"]
    assert cfg["projector"] is None and cfg["compressor_has_params"]
    assert sorted(f for f in os.listdir(out) if "model" in f) == ["model.safetensors"]
    back = load_llava(out)  # the compressor comes from the directory
    assert type(back.model.compressor) is type(m.compressor) and not back.report.new
    b = prompt_batch(tok)
    a, la = vtc_logits(m, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(back.model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert all(torch.equal(a[i, :n], c[i, :n]) for i, n in enumerate(la.tolist()))
    with pytest.raises(LlavaLoadError, match="cannot replace"):
        load_llava(out, compressor=AvgPool2d(2))


def test_export_vtc_round_trip_keeps_a_frame_embedding(dirs, tmp_path):
    """projector.frame_embeddings: the Llava layout has no place for it (refused); vtc's keeps it."""
    from omegaconf import OmegaConf

    from vtc.config import CONF_DIR
    from vtc.data.batch import ITEM_VIDEO
    from vtc.data.collate import collate
    from vtc.eval.export import export_hf, export_vtc

    L = load_llava(dirs["hf"])
    m, tok = L.model, L.tokenizer
    m.frame_embedding = torch.nn.Embedding(4, m.llm.hidden_size)
    torch.nn.init.normal_(m.frame_embedding.weight)
    with pytest.raises(ValueError, match="frame embedding"):
        export_hf(m, tok, str(tmp_path / "no"), image_settings())
    out = str(tmp_path / "vtc")
    export_vtc(m, tok, out, image_settings(), OmegaConf.to_container(OmegaConf.load(CONF_DIR / "compressor/none.yaml")))
    back = load_llava(out)
    assert torch.equal(back.model.frame_embedding.weight, m.frame_embedding.weight) and not back.report.new
    ids = tok("USER : <image> what is in the picture ? ASSISTANT :")["input_ids"]
    g = torch.Generator().manual_seed(0)
    size = m.encoder.info.image_size
    b = collate([{"id": "v", "input_ids": ids, "labels": ids, "visual": [(ITEM_VIDEO, torch.randn(3, 3, size, size, generator=g))]}],
                pad_id=tok.pad_token_id, image_size=size)
    with torch.no_grad():
        assert torch.equal(m(b).loss, back.model(b).loss)


# -- the Hydra wiring: model.init_from -------------------------------------------------------------
def compose(*overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vtc.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def test_init_from_rewrites_the_config_and_builds_the_same_model(dirs):
    from vtc.assembly.build import build_lmm
    from vtc.assembly.checks import check_config
    from vtc.data.tokenizer import load_tokenizer
    from vtc.interop.init_from import resolve_init_from

    cfg = compose(f"model.init_from={dirs['orig']}", f"model.vision_tower_path={dirs['vision']}",
                  "compressor=pool", "compressor.stride=2")
    resolve_init_from(cfg)
    assert cfg.encoder.path is None and cfg.encoder.pretrain is None and cfg.encoder.image_size == SIZE
    assert cfg.data.image_size == SIZE and list(cfg.data.image_mean) == MEAN and cfg.data.pad_to_square
    assert cfg.llm.tokenizer_path == dirs["orig"] == cfg.data.tokenizer_path
    assert cfg.projector.kind == "mlp2x_gelu" and cfg.llm.config.num_hidden_layers == 2
    info, depth = check_config(cfg)  # the checks see the real geometry
    assert (info.num_patches, depth) == (N, 2)
    tok = load_tokenizer(cfg.llm.tokenizer_path)
    model = build_lmm(cfg, tok).eval()
    ref = load_llava(dirs["orig"], vision_tower_path=dirs["vision"], compressor=AvgPool2d(2)).model
    b = prompt_batch(tok)
    a, la = vtc_logits(model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(ref, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert la.tolist()[:2] == [12 - 1 + 4, 7 - 1 + 4]  # pooled 4x4 -> 2x2 visual tokens
    assert torch.equal(a, c)
    # projector.frame_embeddings on a released LLaVA: a new table of that size, trained with the projector
    fe = compose(f"model.init_from={dirs['hf']}", "projector.frame_embeddings=4")
    resolve_init_from(fe)
    assert build_lmm(fe, load_tokenizer(fe.llm.tokenizer_path)).frame_embedding.num_embeddings == 4
    with pytest.raises(ConfigError, match="compressor.stride"):  # compressor checks use the loaded geometry
        check_config(resolve_init_from(compose(f"model.init_from={dirs['hf']}", "compressor=pool",
                                               "compressor.stride=3")))


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_train_eval_export_through_the_clis(workspace, dirs, tmp_path):
    """train.py from a Llava directory with pool, then python -m vtc.eval.export (auto -> hf, --check)
    that transformers loads with equal logits, and eval.py of the checkpoint and of the export
    (model.init_from=EXPORT) on the same test shards: the same answer to every sample, the same
    test/acc and test/loss."""
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlavaForConditionalGeneration

    from vtc.eval.export import load_trained
    from vtc.metrics.exact_match import ExactMatchAccuracy

    run_dir = tmp_path / "run"
    workspace.run("train.py", f"model.init_from={dirs['hf']}", "compressor=pool", "compressor.stride=2",
                  "trainer.max_steps=2", "test=false", f"hydra.run.dir={run_dir}")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "vtc.eval.export", "--ckpt", str(ckpt), "--out", str(out), "--check"],
                          cwd=ROOT,
                          env=workspace.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(hf)" in proc.stdout and "max |logit difference|" in proc.stdout
    model, tok, image, cfg = load_trained(str(ckpt))
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), local_files_only=True).eval()
    model.compressor = NoCompression()
    assert diff(model, hf, tok) < TOL
    assert json.load(open(out / "vtc_export.json"))["compressor"]["_target_"].endswith("AvgPool2d")

    # eval.py of the checkpoint and of the export agree sample by sample. A real check: the two share
    # no loading code (a Lightning checkpoint's state dict + its stored run config, vs the transformers
    # Llava directory read by vtc.interop with the tokenizer and image settings written by the export),
    # and each builds its own run config (the checkpoint's stored one vs train.yaml + data=llava +
    # the directory's geometry). Like with like: the hf export dropped the compressor (Llava runs
    # uncompressed), so the export is evaluated with the pool 2 the checkpoint was trained and is
    # evaluated with; both read the synthetic test split's shards, given by the same override.
    # The tiny Llava's 24-word vocabulary has no digits, so test/acc is 0 in both (measured); the
    # generated texts (several distinct ones) and the teacher-forced test/loss carry the comparison.
    root = Path(cfg.data.root)
    shards = sorted(str(p) for p in (root / "test").glob("*.tar"))
    n = json.load(open(root / "test" / "index.json"))["total"]
    assert shards and n == 32  # TINY's data.generate.n_test
    same = [f"+override.data.test_shards=[{','.join(shards)}]", "eval_batch_size=16", "cost.measure=false"]
    evals = {"ckpt": tmp_path / "eval_ckpt", "export": tmp_path / "eval_export"}
    workspace.run("eval.py", f"ckpt_path={ckpt}", *same, f"hydra.run.dir={evals['ckpt']}", tiny=False)
    workspace.run("eval.py", f"model.init_from={out}", "compressor=pool", "compressor.stride=2", *same,
                  f"hydra.run.dir={evals['export']}", tiny=False)
    preds = {k: read_jsonl(d / "predictions.jsonl") for k, d in evals.items()}
    assert len(preds["ckpt"]) == n and [p["question_id"] for p in preds["ckpt"]] == sorted(
        p["question_id"] for p in preds["ckpt"])
    assert preds["export"] == preds["ckpt"]  # question id, type, generated text and reference answer
    assert len({p["text"] for p in preds["ckpt"]}) > 1  # not one constant answer: the comparison sees the inputs
    runs = {k: [r for r in workspace.runs("eval") if r.data.tags.get("vtc.source") == os.path.abspath(src)]
            for k, src in (("ckpt", ckpt), ("export", out))}
    assert all(len(r) == 1 for r in runs.values()), {k: len(r) for k, r in runs.items()}
    ckpt_run, export_run = runs["ckpt"][0], runs["export"][0]
    assert export_run.data.tags["vtc.init_from"] == os.path.abspath(out) and "vtc.ckpt_path" in ckpt_run.data.tags
    for key in ("compressor._target_", "compressor.stride"):
        assert export_run.data.params[key] == ckpt_run.data.params[key], key
    m1, m2 = ckpt_run.data.metrics, export_run.data.metrics
    metric = ExactMatchAccuracy()  # the normalised exact match that test/acc logs
    metric.update([p["text"] for p in preds["ckpt"]], [p["answer"] for p in preds["ckpt"]])
    assert m1["test/acc"] == m2["test/acc"] == pytest.approx(float(metric.compute()))
    assert m1["test/visual_tokens"] == m2["test/visual_tokens"] == N // 4  # pooled 4x4 -> 2x2 in both
    assert m2["test/loss"] == pytest.approx(m1["test/loss"], abs=TOL)  # teacher-forced, all 32 answers


def test_export_cli_writes_vtc_for_stf_and_init_from_reads_it_back(dirs, tmp_path):
    """A checkpoint trained with STF (its fusion MLP is the projector): --format auto picks vtc,
    --format hf refuses, and model.init_from=EXPORT rebuilds the same model with STF."""
    from omegaconf import OmegaConf

    from vtc.assembly.build import build_lmm
    from vtc.data.tokenizer import load_tokenizer
    from vtc.eval.export import main
    from vtc.interop.init_from import resolve_init_from
    from vtc.train.task import build_module

    cfg = resolve_init_from(compose(f"model.init_from={dirs['hf']}", "compressor=stf", f"paths.output_dir={tmp_path}"))
    tok = load_tokenizer(cfg.llm.tokenizer_path)
    module = build_module(cfg, tok)
    ckpt = tmp_path / "stf.ckpt"  # what on_save_checkpoint stores, weights and config
    torch.save({"state_dict": module.state_dict(), "vtc": {"config": OmegaConf.to_yaml(cfg, resolve=True)}}, ckpt)
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--out", str(tmp_path / "hf"), "--format", "hf"])
    out = tmp_path / "export"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--check"]) == 0
    assert json.load(open(out / "config.json"))["format"] == "vtc-lmm"
    with pytest.raises(SystemExit):  # never overwrites silently
        main(["--ckpt", str(ckpt), "--out", str(out)])
    cfg2 = resolve_init_from(compose(f"model.init_from={out}", f"paths.output_dir={tmp_path}"))
    assert cfg2.compressor._target_ == cfg.compressor._target_  # the run asked for none: the export's STF
    model2 = build_lmm(cfg2, load_tokenizer(cfg2.llm.tokenizer_path)).eval()
    b = prompt_batch(tok)
    a, la = vtc_logits(module.model.eval(), b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(model2, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    assert all(torch.equal(a[i, :n], c[i, :n]) for i, n in enumerate(la.tolist()))
    with pytest.raises(ConfigError, match="cannot replace"):
        resolve_init_from(compose(f"model.init_from={out}", "compressor=pool"))


def test_siglip_tower_uses_the_full_strategy_and_exports_back(tmp_path):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from vtc.eval.export import export_hf

    src, out = str(tmp_path / "siglip"), str(tmp_path / "export")
    os.makedirs(src)
    V = make_tokenizer(src)
    torch.manual_seed(1)
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(image_size=SIZE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=V + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, bos_token_id=2, eos_token_id=3),
        image_token_index=V, image_seq_length=N, vision_feature_select_strategy="full", vision_feature_layer=-1)
    hf = LlavaForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0, 1.0 if name.startswith("lm_head") else 0.2)
    save_hf(hf, src, src)
    L = load_llava(src)
    assert L.model.encoder.family == "siglip" and L.model.encoder.info.num_patches == N
    assert diff(L.model, hf.eval(), L.tokenizer) < TOL
    export_hf(L.model, L.tokenizer, out, image_settings())
    assert json.load(open(os.path.join(out, "config.json")))["vision_feature_select_strategy"] == "full"
    back = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert diff(L.model, back, L.tokenizer) < TOL
    cfg_json = json.load(open(os.path.join(src, "config.json")))
    cfg_json["vision_feature_select_strategy"] = "default"
    write_json(os.path.join(src, "config.json"), cfg_json)
    with pytest.raises(LlavaLoadError, match="drops SigLIP's first patch"):
        load_llava(src)
