"""What generation costs at evaluation: measured prefill latency, decode throughput, KV-cache
bytes, next to analytic prefill FLOPs.

:class:`CostMeter` wraps ``LMM.generate`` of one model without changing ``LMM``: inside ``with
CostMeter(model):`` every ``model.generate(...)`` call (from ``LMMModule.test_step`` or from the
benchmark loop of :mod:`vtc.eval.bench`) is timed through two instance-level hooks that are
removed on exit:

- ``model.llm.run_layers``: its first call in a ``generate`` is the prefill (no ``past_mask``);
  it records the spliced prompt (length and visual tokens per sample) and, after it returns, the
  bytes of the key and value tensors the KV cache holds, summed over layers. An in-LLM compressor
  (vcc, FastV, DART) shrinks the sequence before its layer K, so layers from K on hold fewer
  tokens, and the bytes say so. Padding is included: it is what the cache really holds.
- ``model.next_token``: called once per generated token step (the first right after prefill).

Per ``generate`` call (one batch):

- prefill (time to first token) = from the call until the first token is chosen: vision encoder,
  compressor, projector, splice, every LLM layer over the prompt, the LM head at the last position,
  argmax;
- decode = from the first token to the last; ``B x (steps - 1)`` tokens (every row of the batch
  computes a token at every step, finished or not: the work the hardware does). Short answers
  ("yes", a letter) leave few or no decode steps, so with ``decode_probe=N`` the first batch is
  decoded once more for exactly N tokens after the first, end-of-sequence ignored (outputs
  discarded), and the decode rate comes from that probe;
- prefill FLOPs = ``vtc.cost.accounting.batch_flops(..., trainable=None)`` from the token counts that
  batch actually had (the LM head at one position per sample), plus the compressor's own FLOPs;
  ``BatchCost.sample_flops`` holds each sample's share (batch order), what one answer cost
  (``vtc.eval.predict``), and ``prefill_flops`` is their sum.

On CUDA the device is synchronised at each time stamp. ``warmup`` untimed ``generate`` calls are
made on the first batch before its timed call (greedy decoding: the same tokens come out).

:meth:`CostMeter.summary` -> the ``cost/*`` metrics (``prefix`` changes the namespace):

=========================  ========================================================================
``cost/prefill_ms``        median over batches of the prefill time (ms) per batch
``cost/decode_tok_s``      decode tokens / decode seconds: the probe's, else over all batches
                           (NaN when no batch decoded past its first token)
``cost/kv_bytes``          median over batches of the KV-cache bytes held after prefill per batch
``cost/kv_bytes_per_sample``  all KV bytes / all samples
``cost/prefill_tflops``    analytic prefill TFLOPs per sample (mean)
``cost/visual_tokens``     mean visual tokens entering the LLM per sample with an image
``cost/equiv_visual_tokens``  their mean over LLM layers (what prefill FLOPs scale with)
``cost/batch_size``        the largest batch (the chosen ``eval_batch_size``)
``cost/batches``           batches timed
``cost/decode_probe_tokens``  tokens the decode probe generated after the first (B x N)
=========================  ========================================================================

Medians are taken over the batches of the largest size only (a last, partial batch would mix
another batch size into them), unless there is no other batch.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from vtc.cost.accounting import batch_flops, model_shape
from vtc.data.collate import frames_per_sample, items_from_image_index

__all__ = ["BatchCost", "CostMeter", "kv_cache_bytes"]


def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers cache holds, summed over layers."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: cache.layers[i].keys / .values
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for name in ("key_cache", "value_cache"):  # older DynamicCache
        for t in getattr(cache, name, None) or []:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class BatchCost:
    batch_size: int
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0
    kv_bytes: int = 0
    prefill_flops: float = 0.0
    sample_flops: list[float] = field(default_factory=list)  # per sample, in batch order
    visual_in: list[int] = field(default_factory=list)
    equiv_visual: list[float] = field(default_factory=list)


def _sync(t: torch.Tensor | None = None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        if t is None or t.is_cuda:
            torch.cuda.synchronize(t.device if t is not None else None)


class CostMeter:
    """Times ``model.generate`` (an ``LMM``) while active; see the module docstring."""

    def __init__(self, model, warmup: int = 1, flops: bool = True, decode_probe: int = 0):
        self.model = model
        self.warmup = int(warmup)
        self.flops = bool(flops)
        self.decode_probe = int(decode_probe)
        self.batches: list[BatchCost] = []
        self.probe: BatchCost | None = None
        self._orig_generate = None
        self._shape = None

    # -- installing / removing the hooks ---------------------------------------------------------
    def __enter__(self) -> "CostMeter":
        if "generate" in vars(self.model):
            raise RuntimeError("model.generate is already wrapped (nested CostMeter?)")
        self._orig_generate = self.model.generate
        self.model.generate = self._generate
        return self

    def __exit__(self, *exc) -> None:
        vars(self.model).pop("generate", None)
        self._orig_generate = None

    @property
    def shape(self):
        if self._shape is None:
            self._shape = model_shape(self.model)
        return self._shape

    # -- one generate call -------------------------------------------------------------------------
    def _generate(self, *args, **kwargs):
        while self.warmup > 0:
            self.warmup -= 1
            self._orig_generate(*args, **kwargs)
        (tokens, seen), rec = self._timed(args, kwargs)
        self.batches.append(rec)
        if self.decode_probe > 0 and self.probe is None:
            # Fixed-length decoding on this batch, end-of-sequence ignored: answers of a word or two
            # leave too few decode steps to time. Outputs discarded.
            probe_kwargs = {**kwargs, "max_new_tokens": self.decode_probe + 1, "eos_token_id": -1}
            _, self.probe = self._timed(args[:4], probe_kwargs)  # the 4 tensors; the rest by name
        return tokens, seen

    def _timed(self, args, kwargs):
        model, llm = self.model, self.model.llm
        orig_run, orig_next = llm.run_layers, model.next_token
        stamps: list[float] = []
        prompt: dict = {}

        def run_layers(state, compressor=None, cache=None, past_mask=None):
            first = past_mask is None and not prompt
            if first:
                prompt["lengths"] = state.lengths.detach().cpu()
                prompt["visual_in"] = state.visual_counts().detach().cpu()
            out = orig_run(state, compressor, cache=cache, past_mask=past_mask)
            if first and cache is not None:
                prompt["cache"] = cache
            return out

        def next_token(logits):
            if "cache" in prompt and "kv_bytes" not in prompt:  # after prefill and any drop (VoCo's)
                prompt["kv_bytes"] = kv_cache_bytes(prompt.pop("cache"))
            token = orig_next(logits)
            _sync(token)
            stamps.append(time.perf_counter())
            return token

        llm.run_layers, model.next_token = run_layers, next_token
        try:
            _sync()
            t0 = time.perf_counter()
            tokens, seen = self._orig_generate(*args, **kwargs)
        finally:
            vars(llm).pop("run_layers", None)
            vars(model).pop("next_token", None)

        B = len(tokens)
        rec = BatchCost(batch_size=B, kv_bytes=int(prompt.get("kv_bytes", 0)))
        if stamps:
            rec.prefill_s = stamps[0] - t0
            rec.decode_s = stamps[-1] - stamps[0]
            rec.decode_tokens = B * (len(stamps) - 1)
        if "lengths" in prompt:
            seen_cpu = seen.detach().cpu()
            vis = prompt["visual_in"]
            has = vis > 0
            rec.visual_in = [int(v) for v in vis[has]]
            rec.equiv_visual = [float(x) for x in seen_cpu[:, has].float().mean(0)] if bool(has.any()) else []
            if self.flops:
                info = model.encoder.info
                items = args[3] if len(args) > 3 else kwargs["items"]  # generate(ids, mask, pixels, items, ...)
                items = items if items.dim() == 2 else items_from_image_index(items)
                lengths, frames = prompt["lengths"], frames_per_sample(items.cpu(), B)
                extra = model.pipeline.own_flops(info.num_patches)
                tower = model.pipeline.encoder_tokens(info.num_patches)
                # batch_flops sums independent per-sample terms: one sample at a time gives each answer's.
                rec.sample_flops = [batch_flops(self.shape, lengths[b:b + 1], vis[b:b + 1], seen_cpu[:, b:b + 1], None,
                                                trainable=None, extra_per_image=extra, vision_tokens_per_layer=tower,
                                                frames_per_sample=frames[b:b + 1]) for b in range(B)]
                rec.prefill_flops = sum(rec.sample_flops)
        return (tokens, seen), rec

    # -- results -------------------------------------------------------------------------------------
    def summary(self, prefix: str = "cost") -> dict[str, float]:
        if not self.batches:
            return {}
        full = max(b.batch_size for b in self.batches)
        main = [b for b in self.batches if b.batch_size == full]
        samples = sum(b.batch_size for b in self.batches)
        timed = [self.probe] if self.probe is not None else self.batches
        decode_s = sum(b.decode_s for b in timed)
        decode_tokens = sum(b.decode_tokens for b in timed)
        visual = [v for b in self.batches for v in b.visual_in]
        equiv = [v for b in self.batches for v in b.equiv_visual]
        out = {
            "prefill_ms": 1e3 * statistics.median(b.prefill_s for b in main),
            "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
            "kv_bytes": float(statistics.median(b.kv_bytes for b in main)),
            "kv_bytes_per_sample": sum(b.kv_bytes for b in self.batches) / samples,
            "prefill_tflops": sum(b.prefill_flops for b in self.batches) / samples / 1e12,
            "visual_tokens": statistics.fmean(visual) if visual else 0.0,
            "equiv_visual_tokens": statistics.fmean(equiv) if equiv else 0.0,
            "batch_size": float(full),
            "batches": float(len(self.batches)),
        }
        if self.probe is not None:
            out["decode_probe_tokens"] = float(self.probe.decode_tokens)
        return {f"{prefix}/{k}": float(v) for k, v in out.items()}
