"""``vtc.load(path).generate(images, prompts)`` and ``vtc predict``: answers from a train.py
checkpoint or a released LLaVA directory, the model built, prompted and decoded as ``eval.py``
builds, prompts and decodes it, with the visual tokens and prefill FLOPs of every answer.

    import vtc
    model = vtc.load("outputs/runs/<run>/checkpoints/last.ckpt")   # or a LLaVA directory
    [a] = model.generate(["board.jpg"], ["What digit is in row 1, column 2?"],
                         compressor={"name": "pool", "stride": 2})
    a.text, a.visual_tokens, a.prefill_flops

What is reused from eval.py, so the answers are eval.py's: the run config (a checkpoint's stored
one, or for a directory :func:`vtc.eval.init_from.init_from_config`, with eval's choices applied by
:func:`vtc.eval.init_from.apply_eval_choices`), ``check_config(training=False)``, the model builder
and checkpoint loader (:mod:`vtc.assembly`), the prompt (:func:`vtc.data.templates.encode_conversation`
with the run's template and system prompt, as the benchmark path of :mod:`vtc.eval.bench`), the
image preprocessing (the run's ``data`` settings, :func:`vtc.eval.init_from.prompt_settings`),
right-padded batches of ``data.eval_batch_size`` (:func:`vtc.data.collate.collate`), greedy
``LMM.generate`` and the answer decoding (special tokens skipped, stripped). The prompt is sent as
given: a benchmark's answer-format suffix ("Answer the question using a single word or phrase.")
is the caller's to add. The cost is :class:`vtc.cost.meter.CostMeter`'s, per sample.

Test-time compression (``compressor=``): a config name of ``conf/compressor`` with its defaults,
``"pool"``, or a dict of the name and knobs, ``{"name": "pool", "stride": 2}`` (a chain's members
nested: ``{"name": "stf_vcc", "llm": {"stride": 4}}``) -- what ``eval.py compressor=pool
compressor.stride=2`` composes. A knob is a key of the config or a parameter of its class; its value
goes through the config check, so a bad one raises the ``ConfigError`` train/eval raise, naming the
key. The compressed model shares the vision tower and the LLM with the loaded one (only the
projector, and the compressor, are its own), and is kept for the next call with the same setting.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from vtc.assembly.build import build_lmm
from vtc.assembly.checkpoint import lmm_state, load_checkpoint, load_weights
from vtc.assembly.checks import check_config
from vtc.assembly.compressors import build_compressors
from vtc.config import CONF_DIR, compose_conf
from vtc.cost.meter import CostMeter
from vtc.data.batch import IGNORE_INDEX
from vtc.data.collate import collate, visual_items
from vtc.data.templates import encode_conversation
from vtc.data.tokenizer import load_tokenizer
from vtc.distributed.checkpoints import is_sharded_checkpoint
from vtc.errors import ConfigError
from vtc.eval.bench import placement
from vtc.eval.init_from import apply_eval_choices, fresh_compressor_params, init_from_config, prompt_settings
from vtc.lmm import LMM

COMPRESSORS = sorted(p.stem for p in (CONF_DIR / "compressor").glob("*.yaml"))


@dataclass(frozen=True)
class Answer:
    """One generated answer and what producing it cost (prefill: the prompt through the model)."""

    text: str
    visual_tokens: int  # visual tokens entering the LLM (0 without an image)
    equiv_visual_tokens: float  # their mean over the LLM's layers (an in-LLM compressor lowers it)
    prefill_flops: float  # analytic FLOPs of the prefill, FLOPs = 2 MACs (docs/cost.md)

    def __str__(self) -> str:
        return self.text


# -- the compressor argument -> a compressor config node -------------------------------------------
def _class_params(node: DictConfig) -> set[str]:
    from hydra.utils import get_class

    target = node.get("_target_")
    if not target:
        return set()
    params = inspect.signature(get_class(str(target)).__init__).parameters.values()
    return {p.name for p in params if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _set_knobs(node: DictConfig, knobs: Mapping, key: str, name: str) -> None:
    for k, v in knobs.items():
        full = f"{key}.{k}"
        allowed = (set(node.keys()) | _class_params(node)) - {"_target_"}
        if not isinstance(k, str) or k not in allowed:
            raise ConfigError(full, f"not a knob of compressor {name!r}; its knobs here: {sorted(allowed)}")
        if isinstance(v, Mapping) and isinstance(node.get(k), DictConfig):
            _set_knobs(node[k], v, full, name)  # a chain's member
            continue
        try:
            with open_dict(node):
                node[k] = v
        except Exception as e:  # noqa: BLE001 - omegaconf refuses values it cannot hold (objects, tensors)
            raise ConfigError(full, f"{v!r} is not a config value ({e})") from None


def compressor_node(compressor) -> DictConfig | None:
    """``None`` (the model's own), a config name, or ``{"name": NAME, **knobs}`` -> the node
    ``eval.py compressor=NAME compressor.KNOB=VALUE`` would compose; refused naming the key. A
    composed compressor node (a ``DictConfig`` with ``_target_``) is taken as it is."""
    if compressor is None:
        return None
    if isinstance(compressor, DictConfig) and "_target_" in compressor:  # composed already (an ablation's node)
        return OmegaConf.create(OmegaConf.to_container(compressor, resolve=True))
    if isinstance(compressor, str):
        name, knobs = compressor, {}
    elif isinstance(compressor, Mapping) and "name" in compressor:
        name, knobs = compressor["name"], {k: v for k, v in compressor.items() if k != "name"}
    else:
        raise ConfigError("compressor", f"{compressor!r}: give a config name ('pool') or a dict of the name and "
                          "its knobs ({'name': 'pool', 'stride': 2}); None keeps the model's own")
    if name not in COMPRESSORS:
        raise ConfigError("compressor", f"{name!r} is not a compressor config (conf/compressor); one of {COMPRESSORS}")
    node = compose_conf("eval", [f"compressor={name}"]).compressor
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))  # detached from the eval config
    _set_knobs(node, knobs, "compressor", name)
    return node


# -- images and prompts -> a batch, as eval.py's benchmark path makes it ---------------------------
def _pixels(image, processor, i: int) -> torch.Tensor | None:
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return processor(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"images[{i}]: a PIL image, a path or None, got {type(image).__name__}")
    if not os.path.isfile(image):
        raise FileNotFoundError(f"images[{i}]: {os.fspath(image)!r} is not a file")
    with Image.open(image) as img:
        img.load()
        return processor(img)


class Predictor:
    """A loaded model (see the module docstring); made by :func:`load`."""

    def __init__(self, source: str, kind: str, eval_cfg: DictConfig, device: torch.device, precision: str):
        self.source, self.kind, self.precision = source, kind, precision
        self.device = device
        self._eval_cfg = eval_cfg
        self._ckpt_cfg = None
        weights = None
        if kind == "ckpt":
            ckpt = load_checkpoint(source)
            self._ckpt_cfg = ckpt["vtc"]["config"]
            weights = lmm_state(ckpt["state_dict"])
        self.config = self._run_config(None)
        self.tokenizer = load_tokenizer(self.config.llm.tokenizer_path)
        model = build_lmm(self.config, self.tokenizer, training=False)  # init_from: reads the directory's weights
        if weights is not None:
            load_weights(model, weights, compressor_changed=False, prefix="")
        self.settings = prompt_settings(self.config)
        self.model = self._place(model)
        self._variants: dict[str, tuple[LMM, DictConfig]] = {}

    def _place(self, model: LMM) -> LMM:
        trainer = {"accelerator": self.device.type, "precision": self.precision}
        _, self._ctx = placement(trainer, model)
        return model.eval()

    def _run_config(self, compressor: DictConfig | None) -> DictConfig:
        """What eval.py runs for this source and compressor, checked as eval.py checks it."""
        cfg = self._eval_cfg.copy()
        OmegaConf.set_struct(cfg, False)
        cfg.compressor = compressor
        if self.kind == "ckpt":
            run_cfg = apply_eval_choices(cfg, OmegaConf.create(self._ckpt_cfg))
        else:
            run_cfg = init_from_config(cfg)
        OmegaConf.set_struct(run_cfg, False)
        run_cfg.paths = cfg.paths
        # One process, here: the attention-kernel check sees this device, no training strategy.
        OmegaConf.update(run_cfg, "trainer", {"accelerator": self.device.type, "devices": 1, "strategy": "auto"},
                         merge=True)
        info, _ = check_config(run_cfg, training=False)
        if self.kind == "init_from" and compressor is not None:
            fresh = fresh_compressor_params(run_cfg, info)
            if fresh:
                raise ConfigError("compressor", f"{compressor._target_} has parameters ({', '.join(fresh[:3])}, ...) "
                                  f"that {self.source} does not hold; a released model takes parameter-free "
                                  "compressors only (train it first: train.py model.init_from=... compressor=...)")
        return run_cfg

    def model_for(self, compressor=None) -> tuple[LMM, DictConfig]:
        """(model, run config) for ``compressor`` (the ``generate`` argument): the loaded model for
        None, else the loaded model's tower and LLM under that compressor."""
        node = compressor_node(compressor)
        if node is None:
            return self.model, self.config
        key = OmegaConf.to_yaml(node)
        if key not in self._variants:
            run_cfg = self._run_config(node)
            comp, _ = build_compressors(run_cfg, training=False)
            base = self.model
            fe = base.frame_embedding
            variant = LMM(base.encoder, base.llm, comp, projector=base.projector_kind,
                          image_token_id=base.image_token_id, pad_token_id=base.pad_token_id,
                          eos_token_id=base.eos_token_id, frame_embeddings=fe.num_embeddings if fe is not None else 0)
            try:  # the projector (and the compressor's own parameters, if it keeps the trained class)
                load_weights(variant, base.state_dict(), compressor_changed=True, prefix="")
            except RuntimeError as e:
                raise ConfigError("compressor", f"{node._target_} cannot replace {type(base.compressor).__name__} "
                                  f"without training: {e}") from None
            self._variants[key] = (self._place(variant), run_cfg)
        return self._variants[key]

    def _batch(self, images: Sequence, prompts: Sequence[str]) -> dict:
        s, samples = self.settings, []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            pixels = _pixels(image, s.processor, i)
            conv = [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]
            try:
                enc = encode_conversation(self.tokenizer, conv, s.template, s.max_length,
                                          has_image=pixels is not None, system=s.system_prompt)
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
            ids = enc["gen_input_ids"]
            samples.append({"id": str(i), "input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "gen_input_ids": ids,
                            "answer": "", "pixel_values": pixels})
        return collate(samples, pad_id=int(self.tokenizer.pad_token_id), image_size=s.image_size, generation=True)

    @torch.no_grad()
    def generate(self, images: Sequence, prompts: Sequence[str], compressor=None, max_new_tokens: int | None = None,
                 batch_size: int | None = None) -> list[Answer]:
        """One :class:`Answer` per prompt, in order. ``images``: one per prompt (a PIL image, a
        path, or None for a text-only prompt); ``compressor``: see the module docstring;
        ``max_new_tokens`` / ``batch_size``: the run's ``generation.max_new_tokens`` /
        ``data.eval_batch_size`` unless given (answers do not depend on the batch size)."""
        if isinstance(prompts, str) or isinstance(images, (str, os.PathLike, Image.Image)):
            raise TypeError("images and prompts are lists, one image per prompt: generate([image], [prompt])")
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"images and prompts: one image per prompt, got {len(images)} images and "
                             f"{len(prompts)} prompts")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts[{bad[0]}]: a string, got {type(prompts[bad[0]]).__name__}")
        model, run_cfg = self.model_for(compressor)
        steps = int(run_cfg.generation.max_new_tokens) if max_new_tokens is None else max_new_tokens
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"max_new_tokens: a positive integer, got {max_new_tokens!r}")
        size = self.settings.eval_batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size: a positive integer, got {batch_size!r}")
        dtype = next(model.encoder.parameters()).dtype
        out: list[Answer] = []
        for start in range(0, len(prompts), size):
            batch = self._batch(images[start:start + size], prompts[start:start + size])
            with CostMeter(model, warmup=0) as meter, self._ctx:
                tokens, _ = model.generate(batch["gen_input_ids"].to(self.device),
                                           batch["gen_attention_mask"].to(self.device),
                                           batch["pixel_values"].to(self.device, dtype), visual_items(batch),
                                           max_new_tokens=steps)
            cost = meter.batches[-1]
            # The meter lists visual tokens for the samples with an image only, in batch order.
            with_image = iter(zip(cost.visual_in, cost.equiv_visual))
            has = torch.zeros(len(tokens), dtype=torch.bool)
            has[visual_items(batch)[:, 0]] = True
            for b, ids in enumerate(tokens):
                vis, equiv = next(with_image) if has[b] else (0, 0.0)
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                out.append(Answer(text, int(vis), float(equiv), float(cost.sample_flops[b])))
        return out


def load(path: str | os.PathLike, *, vision_tower: str | os.PathLike | None = None, device: str | None = None,
         precision: str = "32-true") -> Predictor:
    """A :class:`Predictor` for ``path``: a train.py checkpoint file (``checkpoints/last.ckpt``) or a
    LLaVA directory (transformers Llava, original LLaVA with ``vision_tower``, or a ``vtc export``).
    ``device``: ``cpu`` / ``cuda`` (default: cuda when available); ``precision``: as eval.py's
    ``trainer.precision`` (``32-true``, ``bf16-true``, ``bf16-mixed``, ``16-mixed``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: a checkpoint file or a LLaVA directory, got {type(path).__name__}")
    source = os.path.abspath(os.fspath(path))
    if not os.path.exists(source):
        raise ConfigError("path", f"{source!r} does not exist; give a train.py checkpoint (outputs/runs/<run>/"
                          "checkpoints/last.ckpt) or a LLaVA model directory")
    kind = "ckpt" if os.path.isfile(source) or is_sharded_checkpoint(source) else "init_from"
    if vision_tower is not None and kind == "ckpt":
        raise ConfigError("vision_tower", "only for an original-LLaVA directory; a checkpoint carries its tower")
    if vision_tower is not None and not os.path.isdir(vision_tower):
        raise ConfigError("vision_tower", f"{os.fspath(vision_tower)!r} is not a directory (a local CLIP model)")
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError("device", f"{device!r}: use cpu or cuda")
    if precision not in ("32-true", "32", "bf16-true", "bf16-mixed", "16-true", "16-mixed"):
        raise ConfigError("precision", f"{precision!r}: one of 32-true, bf16-true, bf16-mixed, 16-true, 16-mixed")
    cfg = compose_conf("eval")
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = os.getcwd()  # nothing is written; ${hydra:...} cannot resolve outside an app
    if kind == "ckpt":
        cfg.ckpt_path = source
    else:
        cfg.model.init_from = source
        cfg.model.vision_tower_path = os.path.abspath(os.fspath(vision_tower)) if vision_tower else None
    return Predictor(source, kind, cfg, dev, precision)


# -- vtc predict --------------------------------------------------------------------------------------
def _knobs(pairs: list[str], parser: argparse.ArgumentParser) -> dict:
    """``--set KEY=VALUE`` as a nested dict, each value parsed as eval.py's Hydra overrides are."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict = {}
    p = OverridesParser.create()
    for pair in pairs:
        try:
            o = p.parse_override(pair)
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
            parser.error(f"--set {pair}: not KEY=VALUE ({e})")
        *path, last = o.key_or_group.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = o.value()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vtc predict", description="Answer a question about an image with a vtc "
                                "checkpoint or a LLaVA directory: the answer, the visual tokens, the prefill FLOPs.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (.ckpt) or a LLaVA model directory")
    p.add_argument("--vision-tower", help="the local CLIP directory of an original-LLaVA directory")
    p.add_argument("--image", action="append", required=True, help="an image file (repeat with --question)")
    p.add_argument("--question", action="append", required=True, help="the question, sent as given")
    p.add_argument("--compressor", help=f"test-time compression, a config name: {', '.join(COMPRESSORS)}")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                   help="a knob of --compressor, e.g. --set stride=2 (a chain's member: --set llm.stride=4)")
    p.add_argument("--max-new-tokens", type=int, help="default: the run's generation.max_new_tokens")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--precision", default="32-true", help="as eval.py's trainer.precision (default 32-true)")
    args = p.parse_args(argv)
    if len(args.image) != len(args.question):
        p.error(f"one --image per --question: got {len(args.image)} images and {len(args.question)} questions")
    if not os.path.exists(args.ckpt):
        p.error(f"--ckpt {args.ckpt}: no such file or directory (a checkpoint, e.g. outputs/runs/<run>/checkpoints/"
                "last.ckpt, or a LLaVA model directory)")
    for image in args.image:
        if not os.path.isfile(image):
            p.error(f"--image {image}: no such file")
    if args.set and not args.compressor:
        p.error("--set needs --compressor (the config whose knobs it sets)")
    compressor = {"name": args.compressor, **_knobs(args.set, p)} if args.compressor else None
    try:
        model = load(args.ckpt, vision_tower=args.vision_tower, device=args.device, precision=args.precision)
        answers = model.generate(args.image, args.question, compressor=compressor, max_new_tokens=args.max_new_tokens)
    except (ConfigError, ValueError) as e:  # ConfigError is a ValueError: a key, or an argument, to change
        print(f"vtc predict: {e}", file=sys.stderr)
        return 2
    for i, a in enumerate(answers):
        print(("\n" if i else "") + f"answer: {a.text}\nvisual tokens: {a.visual_tokens}\n"
              f"prefill FLOPs: {a.prefill_flops:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
