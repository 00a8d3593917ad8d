"""``python -m vtc.eval.export --ckpt CKPT --out DIR [--format auto|hf|vtc] [--dtype D] [--check]``.

Writes a trained vtc model (a Lightning checkpoint of train.py) as a directory; weights are
safetensors only (sharded above 5 GB, with an index), never pickles, and weights only (no
optimizer state).

``hf``: a transformers ``LlavaForConditionalGeneration`` directory: ``config.json`` (LlavaConfig:
    vision_config, text_config, image_token_index = the tokenizer's ``<image>``,
    image_seq_length = patches, vision_feature_layer = encoder.select_layer,
    vision_feature_select_strategy ``default`` for CLIP / ``full`` for SigLIP,
    projector_hidden_act ``gelu``), the weights in the Hub layout (``vision_tower.vision_model.*``,
    ``multi_modal_projector.linear_{1,2}.*``, ``language_model.model.*``,
    ``language_model.lm_head.*``), ``generation_config.json`` (greedy, ``<image>`` suppressed as vtc
    does), the tokenizer, ``preprocessor_config.json`` + ``processor_config.json``
    (LlavaImageProcessor with ``do_pad`` = vtc's pad-to-square, bicubic, the training mean/std;
    LlavaProcessor expanding ``<image>`` to the patch count) and ``vtc_export.json`` (provenance).
    Possible when the model is encoder -> mlp2x_gelu projector -> LLM, i.e. trained with a
    compressor without parameters (none, pool, vcc, fastv, dart, tome, ...). Llava has no place
    for the compression itself: the exported model runs uncompressed (what vcc's final,
    uncompressed stage trained for); reload it with ``model.init_from=DIR compressor=pool`` to
    compress again. When ``<image>`` lies beyond the LLM's vocabulary (a tokenizer that gained it,
    as for original LLaVA), the embedding and LM head gain zero rows up to ``len(tokenizer)``.
``vtc``: for models a Llava class cannot hold (a compressor with trained parameters: stf,
    stf_mbtf; a ``linear`` projector): ``config.json`` = ``{"format": "vtc-lmm",
    "format_version": 1, "vision_kind", "vision_config", "select_layer", "text_config",
    "projector" (null when the compressor is the projector), "compressor" (its Hydra config,
    ``_target_`` and arguments), "compressor_has_params", "image_token", "image_token_id",
    "dtype"}``, ``model.safetensors`` = the LMM's own state dict (``encoder.model.*``,
    ``projector.*``, ``compressor.*``, ``llm.model.*``; a tied LM head stored once), the tokenizer
    and ``preprocessor_config.json``. ``model.init_from=DIR`` / ``load_llava(DIR)`` read it back.
``auto`` (default): ``hf`` when possible, else ``vtc``.

A run trained with LoRA (``llm.lora.r``) is written merged: the adapters are folded into the base
weights (W + B A alpha/r, :func:`vtc.model.lora.merge_lora`), so either format holds the plain
LLM and loads without peft; ``vtc_export.json`` records the merged adapters' settings.

``--check`` reloads what was written (transformers for hf, :func:`load_llava` for vtc) and prints
the largest logit difference from the checkpoint's model on a random two-sample batch.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys

import torch

from vtc.assembly import checkpoint
from vtc.compressors.base import NoCompression
from vtc.interop.formats import IMAGE_TOKEN, VTC_FORMAT, VTC_FORMAT_VERSION, config_dict
from vtc.interop.images import ImageSettings
from vtc.interop.load import load_llava
from vtc.interop.parity import max_logit_diff, vtc_logits
from vtc.lmm import LMM
from vtc.model.lora import merge_lora

log = logging.getLogger(__name__)


def hf_blockers(model: LMM) -> list[str]:
    """Why ``model`` cannot be a LlavaForConditionalGeneration (empty: it can)."""
    why = []
    comp = model.compressor
    n_params = sum(p.numel() for p in comp.parameters())
    if comp.owns_projection:
        why.append(f"the compressor {type(comp).__name__} is the projector (its fusion MLP takes "
                   f"{comp.output_dim(model.encoder.info.hidden_size)}-wide fused tokens)")
    elif n_params:
        why.append(f"the compressor {type(comp).__name__} has {n_params} trained parameters")
    if model.frame_embedding is not None:
        why.append("a frame embedding (projector.frame_embeddings): Llava has none")
    if not comp.owns_projection and model.projector_kind != "mlp2x_gelu":
        why.append(f"projector {model.projector_kind!r}: Llava's projector is Linear-GELU-Linear (mlp2x_gelu)")
    return why


def _uncompressed_note(model: LMM) -> str | None:
    comp = model.compressor
    if isinstance(comp, NoCompression):
        return None
    return (f"{comp.describe()} has no place in LlavaForConditionalGeneration: the exported model runs "
            f"uncompressed ({model.encoder.info.num_patches} visual tokens); model.init_from=DIR with the same "
            "compressor compresses again")


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def _save_weights(state: dict[str, torch.Tensor], out: str) -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(state, out, max_shard_size="5GB", metadata={"format": "pt"}, safe_serialization=True)


def _image_processor(model: LMM, image: ImageSettings):
    try:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import LlavaImageProcessor as cls
    size = model.encoder.info.image_size
    if image.size != size:
        raise ValueError(f"images of {image.size} px cannot feed a {size} px vision tower")
    return cls(do_pad=image.pad_to_square, do_resize=True, size={"shortest_edge": size},
               crop_size={"height": size, "width": size}, do_center_crop=True, resample=3, do_rescale=True,
               rescale_factor=1 / 255, do_normalize=True, image_mean=list(image.mean), image_std=list(image.std),
               do_convert_rgb=True)


def _tied(model: LMM) -> bool:
    lm = model.llm.model
    return lm.lm_head.weight is lm.get_input_embeddings().weight


def export_hf(model: LMM, tokenizer, out: str, image: ImageSettings, dtype: torch.dtype | None = None,
              provenance: dict | None = None) -> dict:
    """Write ``model`` as a transformers Llava directory into ``out`` (created); LoRA adapters are
    merged into ``model`` first (in place)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaProcessor

    _merge(model)
    blockers = hf_blockers(model)
    if blockers:
        raise ValueError("cannot export as a transformers Llava directory: " + "; ".join(blockers)
                         + "; use --format vtc")
    os.makedirs(out, exist_ok=True)
    info = model.encoder.info
    image_id = int(model.image_token_id)
    vocab = model.llm.config.vocab_size
    new_vocab = max(vocab, len(tokenizer), image_id + 1)
    notes = [n for n in [_uncompressed_note(model)] if n]
    tied = _tied(model)

    state: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.startswith("encoder.model."):
            rest = k[len("encoder.model."):]
            rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
            name = "vision_tower.vision_model." + rest
        elif k.startswith("projector."):
            layer, _, rest = k[len("projector."):].partition(".")
            name = f"multi_modal_projector.linear_{ {'0': 1, '2': 2}[layer] }.{rest}"
        elif k.startswith("llm.model.model."):
            name = "language_model.model." + k[len("llm.model.model."):]
        elif k.startswith("llm.model.lm_head."):
            if tied:
                continue
            name = "language_model.lm_head." + k[len("llm.model.lm_head."):]
        else:
            raise ValueError(f"no Llava place for {k}")
        v = _cast(v, dtype)
        if new_vocab > vocab and name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            v = torch.cat([v, v.new_zeros(new_vocab - vocab, v.shape[1])])
        state[name] = v
    if new_vocab > vocab:
        notes.append(f"vocabulary grown from {vocab} to {new_vocab} for {IMAGE_TOKEN} (id {image_id}): zero rows in "
                     "the embedding and LM head; generation_config suppresses the token")

    weight_dtype = next(iter(state.values())).dtype
    tcfg = copy.deepcopy(model.llm.config)
    tcfg.vocab_size = new_vocab
    vcfg = copy.deepcopy(model.encoder.model.config)
    clip = model.encoder.family == "clip"
    cfg = LlavaConfig(
        vision_config=config_dict(vcfg), text_config=config_dict(tcfg),
        image_token_index=image_id, image_seq_length=info.num_patches, projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if clip else "full", vision_feature_layer=info.select_layer,
        multimodal_projector_bias=True, tie_word_embeddings=bool(tcfg.tie_word_embeddings),
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.dtype = str(weight_dtype).replace("torch.", "")
    cfg.save_pretrained(out)
    _save_weights(state, out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, suppress_tokens=[image_id], do_sample=False).save_pretrained(out)
    ip = _image_processor(model, image)
    ip.save_pretrained(out)
    LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=info.patch_size,
                   vision_feature_select_strategy="default" if clip else "full",
                   num_additional_image_tokens=1 if clip else 0, image_token=IMAGE_TOKEN).save_pretrained(out)
    meta = {"exported_by": "vtc", "format": "hf", **(provenance or {}), "notes": notes}
    with open(os.path.join(out, "vtc_export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    for n in notes:
        log.warning("export: %s", n)
    return meta


def export_vtc(model: LMM, tokenizer, out: str, image: ImageSettings, compressor_cfg: dict,
               dtype: torch.dtype | None = None, provenance: dict | None = None) -> dict:
    """Write ``model`` in vtc's own directory format (see the module docstring); LoRA adapters are
    merged into ``model`` first (in place)."""
    _merge(model)
    os.makedirs(out, exist_ok=True)
    comp = model.compressor
    has_params = comp.owns_projection or any(True for _ in comp.parameters())
    tied = _tied(model)
    state = {k: _cast(v, dtype) for k, v in model.state_dict().items()
             if not (tied and k.startswith("llm.model.lm_head."))}
    weight_dtype = next(iter(state.values())).dtype
    config = {
        "format": VTC_FORMAT,
        "format_version": VTC_FORMAT_VERSION,
        "vision_kind": model.encoder.family,
        "vision_config": config_dict(model.encoder.model.config),
        "select_layer": model.encoder.info.select_layer,
        "text_config": config_dict(model.llm.config),
        "projector": None if comp.owns_projection else model.projector_kind,
        "compressor": compressor_cfg,
        "compressor_has_params": has_params,
        "frame_embeddings": model.frame_embedding.num_embeddings if model.frame_embedding is not None else 0,
        "image_token": IMAGE_TOKEN,
        "image_token_id": int(model.image_token_id),
        "dtype": str(weight_dtype).replace("torch.", ""),
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    _save_weights(state, out)
    tokenizer.save_pretrained(out)
    _image_processor(model, image).save_pretrained(out)
    meta = {"exported_by": "vtc", "format": "vtc", **(provenance or {})}
    with open(os.path.join(out, "vtc_export.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def _merge(model: LMM) -> None:
    n = merge_lora(model.llm)
    if n:
        log.info("export: LoRA adapters of %d layers merged into the LLM's weights", n)


# -- from a checkpoint ------------------------------------------------------------------------------
def load_trained(ckpt_path: str):
    """(model, tokenizer, image settings, run config) of a train.py checkpoint, as eval.py builds it;
    a LoRA run's adapters merged into the LLM (what is exported, and what ``--check`` compares)."""
    model, tokenizer, cfg = checkpoint.load_trained(ckpt_path)
    _merge(model)
    data = cfg.get("data") or {}
    image = ImageSettings(
        size=int(data.get("image_size") or cfg.encoder.image_size),
        mean=tuple(data.get("image_mean") or ImageSettings(0).mean),
        std=tuple(data.get("image_std") or ImageSettings(0).std),
        pad_to_square=bool(data.get("pad_to_square", True)),
        source=ckpt_path,
    )
    return model, tokenizer, image, cfg


def random_batch(model: LMM, seed: int = 0) -> dict:
    """Two samples with an image at different places, padded, plus one text-only sample."""
    g = torch.Generator().manual_seed(seed)
    img, pad = model.image_token_id, model.pad_token_id
    V = model.llm.config.vocab_size
    special = {img, pad, model.eos_token_id}
    words = [i for i in range(V) if i not in special][:64]
    pick = lambda n: [words[int(i)] for i in torch.randint(len(words), (n,), generator=g)]  # noqa: E731
    rows = [pick(2) + [img] + pick(5), [img] + pick(3), pick(4)]
    T = max(map(len, rows))
    ids = torch.full((3, T), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        mask[b, :len(r)] = 1
    size = model.encoder.info.image_size
    return dict(input_ids=ids, attention_mask=mask, image_index=torch.tensor([0, 1, -1]),
                pixel_values=torch.randn(2, 3, size, size, generator=g))


def check_export(out: str, fmt: str, model: LMM, tokenizer) -> float:
    """Largest logit difference between ``model`` and what ``out`` loads back into."""
    b = random_batch(model)
    if fmt == "hf":
        from transformers import LlavaForConditionalGeneration

        hf, info = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True, output_loading_info=True,
                                                                 dtype=model.llm.model.dtype)
        bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
        if bad:
            raise RuntimeError(f"transformers loads {out} with {bad}")
        saved = model.compressor
        model.compressor = NoCompression()  # Llava runs uncompressed
        try:
            return max_logit_diff(model, hf.eval(), b["input_ids"], b["attention_mask"], b["pixel_values"],
                                  b["image_index"], model.encoder.info.num_patches, tokenizer.pad_token_id)
        finally:
            model.compressor = saved
    back = load_llava(out, compressor=copy.deepcopy(model.compressor), tokenizer=tokenizer,
                      dtype=model.llm.model.dtype).model
    a, la = vtc_logits(model, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    c, _ = vtc_logits(back, b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_index"])
    return float(max((a[i, :n] - c[i, :n]).abs().max() for i, n in enumerate(la.tolist())))


def main(argv: list[str] | None = None) -> int:
    from omegaconf import OmegaConf

    import vtc.config  # noqa: F401  (resolvers, for stored configs that use them)

    p = argparse.ArgumentParser(prog="python -m vtc.eval.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    p.add_argument("--format", choices=("auto", "hf", "vtc"), default="auto")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="cast floating weights (default: as trained)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--check", action="store_true", help="reload the export and compare logits")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if os.path.exists(args.out) and os.listdir(args.out) and not args.force:
        p.error(f"--out {args.out} exists and is not empty (use --force to replace it)")
    model, tokenizer, image, cfg = load_trained(args.ckpt)
    fmt = args.format
    blockers = hf_blockers(model)
    if fmt == "auto":
        fmt = "vtc" if blockers else "hf"
        if blockers:
            log.info("export: --format vtc, because %s", "; ".join(blockers))
    elif fmt == "hf" and blockers:
        p.error("cannot export as a transformers Llava directory: " + "; ".join(blockers) + "; use --format vtc")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    provenance = {"source_ckpt": os.path.abspath(args.ckpt),
                  "compressor": OmegaConf.to_container(cfg.compressor, resolve=True)}
    lora = OmegaConf.select(cfg, "llm.lora", default=None)
    if lora is not None and lora.get("r") is not None:
        provenance["lora_merged"] = OmegaConf.to_container(lora, resolve=True)
    tmp = f"{args.out.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if fmt == "hf":
            export_hf(model, tokenizer, tmp, image, dtype, provenance)
        else:
            export_vtc(model, tokenizer, tmp, image, provenance["compressor"], dtype, provenance)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)  # a killed export never leaves a half-written directory at --out
    print(f"exported {args.ckpt} -> {args.out} ({fmt})")
    if args.check:
        diff = check_export(args.out, fmt, model if dtype is None else model.to(dtype), tokenizer)
        print(f"check: max |logit difference| = {diff:.3g}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
