"""VoCo-LLaMA: the LLM compresses the image into a few learned VoCo tokens itself.

Paper: Ye et al., "VoCo-LLaMA: Towards Vision Compression with Large Language Models",
arXiv 2406.12275 (CVPR 2025), Sec. 3, and the released code (github.com/Yxxxb/VoCo-LLaMA:
``make_voco_mask_llava`` in ``llava/model/language_model/llava_llama_1stg.py``, the prompt built in
``preprocess_v1`` of ``llava/train/train_compress.py`` and in ``llava/eval/model_vqa_loader.py``).

The input sequence is X = (V, VoCo, T): m VoCo tokens follow each sample's visual tokens V, and the
attention mask M (True = may attend) is the causal mask with one block removed,

    M_ij = False  if token i is after the VoCo tokens (the text T) and token j is in V,
    M_ij = causal otherwise,

so the VoCo tokens attend to the visual tokens and the text sees the image only through the VoCo
tokens' keys and values at every layer: the LLM learns, in instruction tuning, to distil the
image into them (training-aware; ``compressor=voco`` trains them with the LLM). A checkpoint
trained without VoCo has no VoCo embedding; evaluating it with ``compressor=voco`` is refused
(``vtc.assembly.checkpoint.load_weights``, ``vtc.eval.init_from.check_zero_shot``: a test-time
compressor may not bring parameters the checkpoint lacks).

Defaults: m = ``tokens`` = 1, the paper's headline setting (576 -> 1, "576x"); the paper also
reports 2, 4, 8, 16, 32, 64, 128 tokens, and the released training and eval scripts use 2.

The VoCo token (their code): one new special token ``<voco>`` added to the vocabulary
(``resize_token_embeddings``; transformers 4.37, their pin, initialises the new row like the
others, normal with std ``initializer_range`` = 0.02), written m times: all m VoCo tokens share one
learned embedding and differ by position only. Here it is a parameter [1, d] (``shared``, default)
or, ``shared=false``, m distinct embeddings [m, d]; std 0.02 either way. Position ids: the VoCo
tokens are ordinary tokens of the sequence: they take the positions after the last visual token,
and every later token of the sample moves up by m (their position ids are ``arange`` over it).

Accounting convention (``kept``, ``tokens_per_layer``, the LMM's ``seen``): the VoCo tokens are
counted as visual tokens. Every layer of the prefill (and of a training step) runs on all n
visual tokens plus the m VoCo tokens, so each layer "sees" n + m (0 for a sample without an
image, which gets no VoCo tokens); the FLOPs count that, honestly: a dense kernel computes the
masked text -> visual block too. What VoCo saves is the text's view of the image (m tokens instead
of n, in every layer) and, at inference, the cache: after the prompt is prefilled the visual
tokens' keys and values are never read again, and ``LMM.generate`` drops them (``drop_cache``),
so decoding attends to m VoCo entries per image instead of n. (The paper's FLOPs / cache savings
assume the VoCo activations are computed once and reused; a fresh image per prompt still pays
the prefill over n + m.)

Deviations from the released code, each for a reason:
 - their mask hides every key before the first VoCo token from the text, which in their prompt
   (``<image>\\n<voco>..\\n`` + system prompt + question: the image first) is the BOS token, the
   image and a newline; vtc keeps its templates' layout (system prompt before the image), so it
   hides exactly the visual tokens, the paper's Eq. (text tokens may not attend to V);
 - no newline tokens around the VoCo tokens (vtc has no tokenizer here; they carry no content);
 - no extra output row in the LM head for ``<voco>`` (it is never a target);
 - the plain template's caption follows the image directly: the prediction the last visual token
   made (the caption's first token) moves to the last VoCo token, which now precedes it;
 - their inference keeps the visual tokens' cache behind the mask and recomputes the image per
   question; vtc drops it after prefill (``drop_cache: false`` keeps it masked instead: the same
   tokens, tested).

Kernels: the mask is handed to transformers' ``create_causal_mask`` as an ``and_mask_function``
(``vtc.model.llm.attention_rule``), which SDPA, eager and flex attention take; flash-attention
takes only padding and is refused (``llm.attn_implementation``), as their code, which applies
its VoCo mask on the SDPA path only. One visual span per sample (one image, one video, or items
written side by side): m VoCo tokens after it (the paper's video setting, VoCo tokens per frame, is
not this).
"""
from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from torch import nn

from vtc.compressors.base import LLMCompressor
from vtc.errors import ConfigError
from vtc.model.sequence import LayerContext, SeqState

INIT_STD = 0.02  # LLaMA's initializer_range: how their resized embedding initialises <voco>


def visual_spans(state: SeqState) -> tuple[torch.Tensor, torch.Tensor]:
    """(start [B], count [B]) of each sample's contiguous visual span (start 0, count 0: none)."""
    vis = state.visual_mask & state.attention_mask.bool()
    count = vis.sum(1)
    start = torch.where(count > 0, vis.int().argmax(1), torch.zeros_like(count))
    return start, count


class VoCo(LLMCompressor):
    """``tokens`` (m) learned VoCo tokens after each sample's visual tokens, before layer 0."""

    knobs: ClassVar[tuple[str, ...]] = ()  # m fixes the parameter's shape: nothing a stage may change

    def __init__(self, tokens: int = 1, shared: bool = True, drop_cache: bool = True):
        super().__init__(layer=0)  # acts on the input embeddings
        self.tokens = tokens
        self.shared = shared
        #: read by ``LMM.generate``: drop the visual tokens' keys/values after the prefill
        self.drop_cache = drop_cache
        self.register_parameter("embeddings", None)  # [1 or m, d_llm], created by setup()

    # -- configuration ---------------------------------------------------------------------------
    def check(self, encoder, llm_layers: int) -> None:
        m = self.tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError("compressor.tokens", f"the number of VoCo tokens per image must be an integer >= 1 "
                              f"(the paper: 1; also 2..128), got {m!r}")
        for key in ("shared", "drop_cache"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"compressor.{key}", f"must be true or false, got {getattr(self, key)!r}")
        if self.layer != 0:
            raise ConfigError("compressor.layer", f"VoCo acts on the input embeddings (layer 0), got {self.layer!r}")
        super().check(encoder, llm_layers)

    def setup(self, encoder, llm_hidden: int) -> None:
        super().setup(encoder, llm_hidden)
        weight = torch.empty(1 if self.shared else self.tokens, llm_hidden)
        self.embeddings = nn.Parameter(nn.init.normal_(weight, std=INIT_STD))

    def budget_knobs(self, tokens: int, n: int, encoder) -> dict:
        raise ConfigError("schedule", f"VoCo's {self.tokens} token(s) are learned parameters whose count is fixed "
                          "when the model is built; a schedule cannot change it (train one model per "
                          "compressor.tokens, with schedule=constant)")

    def describe(self) -> str:
        return f"VoCo(tokens={self.tokens})" if self.compressing() else "VoCo(off)"

    # -- counting --------------------------------------------------------------------------------
    def kept(self, n: int) -> int:
        """Visual tokens each layer sees: the n visual tokens and the m VoCo tokens (see above)."""
        return n + self.tokens if n > 0 else 0

    # -- the operator ----------------------------------------------------------------------------
    def voco_embeddings(self, dtype: torch.dtype) -> torch.Tensor:
        if self.embeddings is None:
            raise RuntimeError("VoCo.setup() was not called: the VoCo embedding does not exist yet")
        return self.embeddings.to(dtype).expand(self.tokens, -1)

    def compress(self, state: SeqState, at: LayerContext) -> SeqState:
        """Insert the m VoCo tokens after each sample's visual tokens (counted as visual)."""
        m, B = self.tokens, state.hidden.shape[0]
        voco = self.voco_embeddings(state.hidden.dtype)
        start, count = visual_spans(state)
        steps = torch.arange(1, m + 1, device=state.position_ids.device)
        visual, positions = [], []
        for b in range(B):
            s, n = int(start[b]), int(count[b])
            if n == 0:  # a text-only sample: no image, no VoCo tokens
                visual.append(state.hidden.new_zeros(0, state.hidden.shape[-1]))
                positions.append(state.position_ids.new_zeros(0))
                continue
            p = state.position_ids[b, s:s + n]
            visual.append(torch.cat([state.hidden[b, s:s + n], voco]))
            positions.append(torch.cat([p, p[-1] + steps]))
        out = state.replace_visual(visual, positions)  # refuses several spans per sample
        new_start, new_count = visual_spans(out)
        stop = new_start + new_count  # one past the last VoCo token
        has = count > 0
        cols = torch.arange(out.hidden.shape[1], device=stop.device)[None]
        after = (cols >= stop[:, None]) & out.attention_mask.bool() & has[:, None]
        out = replace(out, position_ids=out.position_ids + m * after.long())
        if out.targets is not None and bool(has.any()):
            rows = torch.arange(B, device=stop.device)[has]
            targets = out.targets.clone()
            targets[rows, stop[has] - 1] = state.targets[rows, (start + count)[has] - 1]
            out = replace(out, targets=targets)
        return out

    def attention_rule(self, state: SeqState):
        """For the state ``compress`` returned: (mask function, hidden keys [B, T]), or None when no
        sample has an image. Queries after a sample's VoCo tokens may not attend to its visual
        tokens; everything else stays causal (``vtc.model.llm.attention_rule``)."""
        start, count = visual_spans(state)
        has = count > 0
        if not bool(has.any()):
            return None
        stop = start + count
        cols = torch.arange(state.hidden.shape[1], device=stop.device)[None]
        hidden = (cols >= start[:, None]) & (cols < (stop - self.tokens)[:, None]) & has[:, None]
        blind = (cols >= stop[:, None]) & has[:, None]

        def may_attend(batch_idx, head_idx, q_idx, kv_idx):
            return ~(blind[batch_idx, q_idx] & hidden[batch_idx, kv_idx])

        return may_attend, hidden
