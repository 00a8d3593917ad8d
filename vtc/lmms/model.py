"""``--model vtc`` for lmms-eval: generation tasks answered by a vtc model, batched.

Model args (``--model_args k=v,...``): ``ckpt_path`` (a train.py checkpoint) or ``pretrained`` (a
LLaVA directory; ``vision_tower`` for an original-LLaVA one), ``compressor`` (a conf/compressor
name) and its knobs as further keys (``stride=2``), ``device``, ``precision`` (eval.py's
``trainer.precision``), ``max_new_tokens`` (a cap when a task sets none). ``--batch_size N`` is
the generation batch; the answers do not depend on it (right-padded batches, per-sample positions:
tests/lmms/test_lmms_eval_plugin.py checks 8 against 1, which lmms-eval's own LLaVA does not give,
its issue #236).

What lmms-eval sends and what vtc makes of it:
- the context is the question as the task words it (its pre/post prompts included); vtc adds the
  image and the conversation template the model was trained with, as eval.py does. An
  ``<image>`` the task wrote into the context is removed (vtc places the image itself).
- one image per question (``doc_to_visual``); none for a text-only question. More than one, or a
  video, is refused: vtc's image models take one image per prompt.
- greedy decoding: a task asking to sample (``do_sample``, ``temperature`` > 0, ``num_beams`` > 1)
  is refused rather than answered greedily under its name. ``until`` cuts the answer at the
  first stop string; ``max_new_tokens`` is the task's.
- ``loglikelihood`` (multiple-choice by likelihood) is not offered: such tasks are refused with
  the reason.
The visual tokens and prefill FLOPs of the answers are logged at the end of each request batch.
"""
from __future__ import annotations

import json
import logging

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

import vtc

log = logging.getLogger(__name__)
# Model args that are not the compressor's knobs.
OWN_ARGS = ("ckpt_path", "pretrained", "vision_tower", "compressor", "device", "precision", "max_new_tokens",
            "batch_size")


class VtcLMM(lmms):
    chat_template = None  # vtc applies the model's own conversation template

    def __init__(self, ckpt_path: str | None = None, pretrained: str | None = None, vision_tower: str | None = None,
                 compressor: str | None = None, device: str | None = None, precision: str = "32-true",
                 max_new_tokens: int = 32, batch_size: int | str = 1, **knobs) -> None:
        super().__init__()
        if (ckpt_path is None) == (pretrained is None):
            raise ValueError("--model_args: give exactly one of ckpt_path=<train.py checkpoint> or "
                             "pretrained=<LLaVA directory>")
        if knobs and compressor is None:
            raise ValueError(f"--model_args: {sorted(knobs)} are compressor knobs, but no compressor=<name> is given "
                             f"(the other args are {list(OWN_ARGS)})")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except ValueError:
            raise ValueError(f"--batch_size {batch_size!r}: an integer (vtc has no automatic batch size)") from None
        self.model = vtc.load(ckpt_path or pretrained, vision_tower=vision_tower, device=device, precision=precision)
        self.compressor = {"name": compressor, **knobs} if compressor else None
        if self.compressor:
            self.model.model_for(self.compressor)  # a bad name or knob fails now, naming the key
        self.max_new_tokens = int(max_new_tokens)
        self.device = self.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Requests with the same generation settings are answered together, in batches of
        # --batch_size; answers go back in request order.
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for key, idx in groups.items():
            steps, until = self._settings(json.loads(key), requests[idx[0]].args[4])
            images = [self._image(requests[i]) for i in idx]
            prompts = [requests[i].args[0].replace("<image>", "").strip() for i in idx]
            answers = self.model.generate(images, prompts, compressor=self.compressor, max_new_tokens=steps,
                                          batch_size=self.batch_size)
            for i, a in zip(idx, answers):
                text = a.text
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                out[i] = text
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
            with_image = [a for a in answers if a.visual_tokens]
            if with_image:
                log.info("vtc: %d answers; visual tokens entering the LLM %.1f, prefill GFLOPs %.3f per answer",
                         len(answers), sum(a.visual_tokens for a in with_image) / len(with_image),
                         sum(a.prefill_flops for a in answers) / len(answers) / 1e9)
        return out

    def _settings(self, gen: dict, task: str) -> tuple[int, list[str]]:
        sampling = {k: gen[k] for k in ("do_sample", "temperature", "num_beams") if gen.get(k)}
        if sampling.get("do_sample") or float(sampling.get("temperature") or 0) > 0 or int(sampling.get("num_beams") or 1) > 1:
            raise ValueError(f"task {task}: generation_kwargs {sampling} ask for sampling or beam search; vtc decodes "
                             "greedily (set do_sample: false, temperature: 0, num_beams: 1 in the task)")
        until = gen.get("until") or []
        return int(gen.get("max_new_tokens") or self.max_new_tokens), [until] if isinstance(until, str) else list(until)

    def _image(self, req: Instance):
        context, _, doc_to_visual, doc_id, task, split = req.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = [v for v in visuals if v is not None]
        if len(visuals) > 1 or any(not isinstance(v, Image.Image) for v in visuals):
            raise ValueError(f"task {task}, doc {doc_id}: {len(visuals)} visual(s) of type "
                             f"{sorted({type(v).__name__ for v in visuals})}; vtc's models take one image per question")
        return visuals[0] if visuals else None

    def loglikelihood(self, requests):
        raise NotImplementedError("vtc answers generation tasks (output_type: generate_until); "
                                  "loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtc answers one question per image (generate_until); multi-round is not supported")
