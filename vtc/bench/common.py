"""Shared pieces of the benchmarks: model sizes, the fixed batch, one training step, timing,
allocator peaks, analytic FLOPs of what a step ran, and the markdown / JSON output.

Everything is random-init and built in-process (no files, no network). Models of one benchmark
share one seed, so every compressor sees the same encoder, the same LLM weights and the same
batch; only the compressor (and the parameters it owns) differ.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vtc.config import CONF_DIR, ROOT
from vtc.cost.accounting import batch_flops, model_shape
from vtc.data.batch import IGNORE_INDEX
from vtc.lmm import LMM
from vtc.model.encoder import VisionEncoder
from vtc.model.llm import LanguageModel

TRAIN_PARTS = ("projector", "compressor", "llm")  # the encoder is frozen, as LLaVA keeps CLIP


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes. Defaults: CLIP geometry 336 px / 14 px (24x24 = 576 patches + CLS),
    a small frozen ViT, a Llama LLM that dominates the step."""

    image_size: int = 336
    patch_size: int = 14
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    llm_width: int = 512
    llm_layers: int = 8
    llm_heads: int = 8
    llm_kv_heads: int = 8
    llm_ffn: int = 1376  # LLaMA's 2.6875 x d (11008 / 4096)
    vocab: int = 2048
    text_tokens: int = 64  # mean text tokens per sample (lengths vary by +-4 around it)
    answer_tokens: int = 8  # tokens with a loss at the end of each sample
    batch: int = 4
    lr: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def image_token_id(self) -> int:
        return self.vocab - 1  # inside the vocabulary (transformers' Llava embeds it)

    def describe(self) -> str:
        return (f"CLIP {self.image_size}px/{self.patch_size}px ({self.num_patches} patches + CLS), "
                f"vision {self.vision_width}x{self.vision_layers} layers (MLP {self.vision_mlp}, frozen); "
                f"Llama {self.llm_width}x{self.llm_layers} layers (FFN {self.llm_ffn}, {self.llm_heads} heads, "
                f"vocab {self.vocab}); batch {self.batch}, ~{self.text_tokens} text tokens per sample "
                f"({self.answer_tokens} with a loss); AdamW lr {self.lr}; fp32, SDPA")


QUICK = Sizes(image_size=112, vision_width=32, vision_layers=3, vision_heads=4, vision_mlp=64, llm_width=64,
              llm_layers=4, llm_heads=4, llm_kv_heads=4, llm_ffn=128, vocab=128, text_tokens=16, answer_tokens=4,
              batch=2)


# -- models ------------------------------------------------------------------------------------

def vision_config(s: Sizes) -> dict:
    return dict(image_size=s.image_size, patch_size=s.patch_size, hidden_size=s.vision_width,
                intermediate_size=s.vision_mlp, num_hidden_layers=s.vision_layers,
                num_attention_heads=s.vision_heads)


def text_config(s: Sizes) -> dict:
    return dict(model_type="llama", vocab_size=s.vocab, hidden_size=s.llm_width, intermediate_size=s.llm_ffn,
                num_hidden_layers=s.llm_layers, num_attention_heads=s.llm_heads,
                num_key_value_heads=s.llm_kv_heads, max_position_embeddings=4096, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def load_compressor(name: str, **overrides):
    """``hydra.utils.instantiate`` of ``conf/compressor/<name>.yaml`` with field overrides."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONF_DIR / "compressor" / f"{name}.yaml")
    for k, v in overrides.items():
        node[k] = v
    return instantiate(node)


def compressor_names() -> list[str]:
    """Every single-method compressor config file that acts on images, ``none`` first. Chains
    (``_target_`` Chain, e.g. stf_vcc) are compositions of methods measured here one by one, and
    are left out; so are video-only methods (site ``temporal``), which leave an image batch as it is."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    names = []
    for p in sorted((CONF_DIR / "compressor").glob("*.yaml")):
        target = str(OmegaConf.load(p).get("_target_", ""))
        if not target.endswith(".Chain") and get_class(target).site != "temporal":
            names.append(p.stem)
    return ["none"] + [n for n in names if n != "none"]


def build_lmm(s: Sizes, compressor, seed: int = 0):
    """The LMM with the benchmark's encoder and LLM (identical weights for a given seed), the
    encoder frozen (``requires_grad=False``, eval mode), the rest in train mode."""

    torch.manual_seed(seed)
    enc = VisionEncoder.build(kind="clip", config=vision_config(s), select_layer=-2, attn_implementation="sdpa")
    llm = LanguageModel.build(config=text_config(s), attn_implementation="sdpa")
    torch.manual_seed(seed + 1)  # projector / compressor parameters
    model = LMM(enc, llm, compressor, "mlp2x_gelu", image_token_id=s.image_token_id, pad_token_id=0,
                eos_token_id=2)
    freeze_encoder(model)
    return model


def freeze_encoder(model) -> None:
    for part in ("encoder", "compressor", "projector", "llm"):
        for p in getattr(model, part).parameters():
            p.requires_grad_(part in TRAIN_PARTS)
    model.train()
    model.encoder.eval()  # as LMMModule keeps frozen parts


def optimizer(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


# -- the batch ---------------------------------------------------------------------------------

def text_lengths(s: Sizes) -> list[int]:
    return [s.text_tokens + ((b % 3) - 1) * 4 for b in range(s.batch)]


def make_batch(s: Sizes, seed: int = 0) -> dict:
    """B samples, each ``[BOS, 2 prompt tokens, <image>, ...text..., answer]``, text lengths
    ``text_tokens + {-4, 0, +4}`` (right-padded), loss on the last ``answer_tokens`` tokens."""
    g = torch.Generator().manual_seed(seed)
    lens = text_lengths(s)
    T = max(lens)
    ids = torch.zeros(s.batch, T, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for b, n in enumerate(lens):
        ids[b, :n] = torch.randint(3, s.vocab - 1, (n,), generator=g)
        ids[b, 0] = 1
        ids[b, 3] = s.image_token_id
        labels[b, n - s.answer_tokens:n] = ids[b, n - s.answer_tokens:n]
    mask = (torch.arange(T)[None] < torch.tensor(lens)[:, None]).long()
    pixels = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g)
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels,
                image_index=torch.arange(s.batch))


def expand_for_hf(batch: dict, n_patches: int, image_token_id: int) -> dict:
    """The same batch as transformers' Llava expects it: the placeholder repeated once per
    visual token (576), labels IGNORE there, right-padded."""
    rows_ids, rows_lab = [], []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        ids, lab = batch["input_ids"][b, :n], batch["labels"][b, :n]
        p = int((ids == image_token_id).nonzero()[0])
        rows_ids.append(torch.cat([ids[:p], torch.full((n_patches,), image_token_id), ids[p + 1:]]))
        rows_lab.append(torch.cat([lab[:p], torch.full((n_patches,), IGNORE_INDEX), lab[p + 1:]]))
    T = max(len(r) for r in rows_ids)
    ids = torch.zeros(len(rows_ids), T, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, (i, l) in enumerate(zip(rows_ids, rows_lab)):
        ids[b, :len(i)], labels[b, :len(l)], mask[b, :len(i)] = i, l, 1
    return dict(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=batch["pixel_values"])


# -- one step ----------------------------------------------------------------------------------

def train_step(model, batch: dict, opt: torch.optim.Optimizer):
    """Forward + backward + optimizer step of a vtc LMM. Returns the loss (a float)."""
    opt.zero_grad(set_to_none=True)
    out = model(batch)
    out.loss.backward()
    opt.step()
    return float(out.loss.detach())


def train_step_phased(model, batch: dict, opt: torch.optim.Optimizer) -> dict:
    """``train_step`` with its phases timed: {'fwd', 'bwd', 'opt', 'total'} in seconds (``fwd``
    includes ``zero_grad``)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    out = model(batch)
    t1 = time.perf_counter()
    out.loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return {"fwd": t1 - t0, "bwd": t2 - t1, "opt": t3 - t2, "total": t3 - t0}


@contextlib.contextmanager
def recording_forwards(model):
    """Collect the ``LMMOutput`` of every ``_forward_once`` the model runs (M3 runs one per scale)."""
    outs = []
    orig = model._forward_once

    def wrapped(batch):
        o = orig(batch)
        outs.append(o)
        return o

    model._forward_once = wrapped
    try:
        yield outs
    finally:
        del model._forward_once  # back to the class method


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with ``n`` torch intra-op threads, restoring the previous count afterwards."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs) -> float:
    return float(statistics.median(xs))


def allocator_peak_bytes(fn) -> int:
    """Peak of the bytes the CPU allocator holds during ``fn()`` above what it held at the start,
    from ``torch.profiler`` memory events (every allocation and free, in time order). Tensors alive
    before the call (weights, optimizer state of earlier steps) are the baseline, not counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


# -- FLOPs -------------------------------------------------------------------------------------

def step_flops(model, outs, trainable=TRAIN_PARTS) -> float:
    """Analytic training-step FLOPs of what the step ran: ``vtc.cost.accounting.batch_flops`` of each
    recorded forward (measured token counts per sample and per LLM layer), plus the compressor's
    ``own_flops`` and an in-encoder method's smaller tower (ToMe), summed over the forwards (M3:
    one per scale). The tower and a per-image method's cost count once per frame of a video
    (``LMMOutput.frames``), as ``LMMModule`` counts them."""

    shape = model_shape(model)
    n = model.encoder.info.num_patches
    pipeline = model.pipeline
    return sum(batch_flops(shape, o.lengths, o.visual_in, o.seen, o.targets_per_sample, trainable=tuple(trainable),
                           extra_per_image=pipeline.own_flops(n), vision_tokens_per_layer=pipeline.encoder_tokens(n),
                           frames_per_sample=o.frames) for o in outs)


def attention_flops(model, outs, train_multiplier: int = 3) -> float:
    """The LLM attention-product FLOPs (``Q·Kᵀ`` and ``P·V``, ``2·2·n²·d_q`` per layer forward,
    x3 in training) inside ``step_flops`` of the same forwards: the part a causal kernel could
    halve, which ``vtc.cost.flops`` counts in full."""
    cfg = model.llm.config
    d_q = cfg.num_attention_heads * getattr(cfg, "head_dim", None) if getattr(cfg, "head_dim", None) else cfg.hidden_size
    total = 0.0
    for o in outs:
        text = o.lengths - o.visual_in
        for layer_counts in o.seen:
            n = (text + layer_counts).double()
            total += float((2 * 2 * n * n * d_q).sum())
    return train_multiplier * total


# -- output ------------------------------------------------------------------------------------

def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine(),
            "when": time.strftime("%Y-%m-%d %H:%M:%S")}


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if abs(v) >= 1e9:
            return f"{v / 1e9:.1f} G"
        if v != 0 and abs(v) < 0.01:
            return f"{v:.2e}"
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table of ``rows`` with ``columns`` = [(key, header), ...]."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_outputs(out: str | Path, markdown: str, record: dict) -> tuple[Path, Path]:
    """``out`` without suffix (or with .md/.json): writes ``out.md`` and ``out.json``."""
    base = Path(out)
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    if not base.is_absolute():
        base = Path.cwd() / base
    base.parent.mkdir(parents=True, exist_ok=True)
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    md.write_text(markdown + "\n")
    js.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return md, js


def default_out(name: str) -> Path:
    """Where a benchmark writes unless ``--out`` says otherwise: outputs/bench/ (ignored by git).
    The committed measurements in experiments/bench/ change only when ``--out`` names them, so a
    rerun, or a ``--quick`` smoke test with its FAIL verdicts, never overwrites them."""
    return ROOT / "outputs" / "bench" / name


def sizes_dict(s: Sizes) -> dict:
    return {**asdict(s), "num_patches": s.num_patches}


__all__ = ["Sizes", "QUICK", "replace", "build_lmm", "load_compressor", "compressor_names", "make_batch",
           "expand_for_hf", "train_step", "recording_forwards", "timed", "median", "allocator_peak_bytes",
           "step_flops", "write_outputs", "md_table", "environment", "optimizer"]
