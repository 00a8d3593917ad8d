"""The language model: a HF causal LM whose decoder layers we drive ourselves.

Running the layer loop here (instead of ``model(inputs_embeds=...)``) is what lets a compressor
shrink the sequence between layer K-1 and layer K (LLaVolta, FastV, DART) while every layer still
uses the model's own attention kernel (SDPA or flash-attention): the mask for each segment of
layers is built by transformers' ``create_causal_mask`` for the sequence that segment sees.
Works for Llama-family decoders (Llama/Vicuna, Qwen2, Mistral): ``model.model.{embed_tokens,
layers, norm, rotary_emb}`` and ``model.lm_head``.
"""
from __future__ import annotations

import functools
import inspect
import json
import os

import torch
from torch import nn

from vtc.errors import ConfigError
from vtc.model.compile import CompiledLayers
from vtc.model.sequence import LayerContext, SeqState


def resolve_attn_implementation(choice: str, device: torch.device | str | None = None) -> str:
    """``auto``: flash_attention_2 when flash-attn is installed and the device is CUDA, else sdpa."""
    if choice != "auto":
        return choice
    from transformers.utils import is_flash_attn_2_available

    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "flash_attention_2" if on_cuda and is_flash_attn_2_available() else "sdpa"


def load_text_config(path: str | None = None, config: dict | None = None, model_type: str = "llama"):
    from transformers import AutoConfig

    if path is not None:
        if not os.path.isdir(path):
            raise ConfigError("llm.path", f"directory {path!r} does not exist; point it at a local model folder")
        return AutoConfig.from_pretrained(path, local_files_only=True)
    cfg = dict(config or {})
    model_type = cfg.pop("model_type", model_type)
    return AutoConfig.for_model(model_type, **cfg)


class LanguageModel(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config
        self._compiled = None  # vtc.model.compile.CompiledLayers once compile_layers() ran

    @classmethod
    def build(
        cls,
        path: str | None = None,
        config: dict | None = None,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        trust_remote_code: bool = False,
    ) -> "LanguageModel":
        from transformers import AutoModelForCausalLM

        attn = resolve_attn_implementation(attn_implementation)
        torch_dtype = getattr(torch, dtype) if dtype else None
        if path is not None:
            load_text_config(path)  # validates the directory
            model = AutoModelForCausalLM.from_pretrained(
                path,
                local_files_only=True,
                attn_implementation=attn,
                dtype=torch_dtype,
                trust_remote_code=trust_remote_code,
            )
        else:
            tcfg = load_text_config(None, config)
            tcfg._attn_implementation = attn
            model = AutoModelForCausalLM.from_config(tcfg, trust_remote_code=trust_remote_code)
            if torch_dtype is not None:
                model = model.to(torch_dtype)
        return cls(model)

    # -- parts ---------------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.embed_tokens(input_ids)

    # -- the layer loop --------------------------------------------------------------------------
    def compile_layers(self) -> None:
        """Run training forwards through ``torch.compile``d decoder layers (vtc/model/compile.py)."""

        self._compiled = CompiledLayers(self.layers)

    def run_layers(
        self,
        state: SeqState,
        compressor: nn.Module | None = None,
        cache=None,
        past_mask: list[torch.Tensor] | None = None,
    ) -> tuple[SeqState, list[torch.Tensor], list[torch.Tensor]]:
        """Run every decoder layer, letting an in-LLM compressor act before its layer.

        Returns the final state (after the final norm), the visual tokens each sample had at each
        layer ([B] per layer), and the 2-D key masks of each layer segment (for decoding with
        a KV cache: segment s spans from the layer where the sequence last changed).
        ``past_mask`` holds those masks from earlier calls (decode steps).
        A compressor with an ``attention_rule`` (VoCo) also restricts who attends to whom from its
        layer on (:func:`attention_rule`); the keys it hides from every later token are zero in the
        returned masks.
        """
        compiled = self._compiled
        if compiled is not None and not compiled.failed and cache is None and torch.is_grad_enabled():
            return compiled.run(lambda: self._run_layers(state, compressor, cache, past_mask, self.layers),
                                lambda: self._run_layers(state, compressor, cache, past_mask, compiled.layers))
        return self._run_layers(state, compressor, cache, past_mask, self.layers)

    def _run_layers(self, state, compressor, cache, past_mask, forwards):
        """The loop of :meth:`run_layers`; ``forwards[i]`` runs layer i (itself, or compiled)."""
        from transformers.masking_utils import create_causal_mask

        seen: list[torch.Tensor] = []
        segment_masks: list[torch.Tensor] = []
        new_segment = True  # (not ``mask4d is None``: create_causal_mask returns None for a plain causal mask)
        seg = -1
        previous = None  # the state the previous layer consumed (FastV / DART score layer K-1)
        and_mask, hidden_keys = None, None  # an attention rule of the compressor (VoCo), from its layer on
        for i, (layer, forward) in enumerate(zip(self.layers, forwards)):
            if compressor is not None and getattr(compressor, "site", None) == "llm" and compressor.applies_at(i):
                if past_mask is None:  # training / prefill; decode steps reuse the compressed cache
                    at = LayerContext(index=i, layer=layer, previous_layer=self.layers[i - 1] if i else None,
                                      previous_input=previous, final_norm=self.decoder.norm)
                    state = compressor.compress(state, at)
                    and_mask, hidden_keys = attention_rule(compressor, state, self.config)
                new_segment = True  # a new segment of layers starts here, with its own key mask
            if new_segment:
                new_segment = False
                seg += 1
                key_mask = state.attention_mask
                if past_mask is not None:
                    key_mask = torch.cat([past_mask[seg], state.attention_mask], dim=1)
                # Keys no later token may attend (VoCo: the visual tokens) leave the mask handed to
                # decode steps, so those steps need no rule (and the cache may drop them).
                segment_masks.append(key_mask if hidden_keys is None else key_mask.masked_fill(hidden_keys, 0))
                mask4d = create_causal_mask(
                    config=self.config,
                    inputs_embeds=state.hidden,
                    attention_mask=key_mask,
                    position_ids=state.position_ids,
                    and_mask_function=and_mask,
                    layer_idx=i,
                    **{cache_keyword(create_causal_mask): cache},
                )
                pos_emb = self.decoder.rotary_emb(state.hidden, position_ids=state.position_ids)
            hidden = forward(
                state.hidden,
                attention_mask=mask4d,
                position_ids=state.position_ids,
                use_cache=cache is not None,
                **{cache_keyword(type(layer).forward): cache},
                position_embeddings=pos_emb,
            )
            if isinstance(hidden, tuple):  # older decoder layers return tuples
                hidden = hidden[0]
            previous = state
            state = state.with_hidden(hidden)
            seen.append(state.visual_counts())
        state = state.with_hidden(self.decoder.norm(state.hidden))
        return state, seen, segment_masks

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)


#: kernels whose mask transformers builds from mask functions (flash-attention only takes padding)
MASK_FUNCTION_KERNELS = ("sdpa", "eager", "flex_attention")


def attention_rule(compressor, state: SeqState, config):
    """(and_mask_function, hidden keys [B, T] or None) of an in-LLM compressor that restricts who
    attends to whom (VoCo: the text after the VoCo tokens may not see the visual tokens), else
    (None, None).

    The compressor's ``attention_rule(state)`` returns None (nothing to restrict in this batch) or
    ``(fn, hidden)``: ``fn(batch_idx, head_idx, q_idx, kv_idx) -> bool`` in the index space of
    ``state`` (the prefill's cache is empty, so cache positions are those indices), combined with
    the causal and padding mask by ``create_causal_mask``; ``hidden`` marks the keys that no token
    after ``state`` may see, which the key mask kept for decode steps zeroes."""
    rule = getattr(compressor, "attention_rule", None)
    if rule is None:
        return None, None
    kernel = getattr(config, "_attn_implementation", None) or "sdpa"
    if kernel not in MASK_FUNCTION_KERNELS:
        raise ConfigError("llm.attn_implementation", f"{type(compressor).__name__} hides tokens from others by an "
                          f"attention mask, which {kernel} cannot take (it only skips padding); use "
                          f"llm.attn_implementation=sdpa (or eager)")
    out = rule(state)
    return (None, None) if out is None else out


@functools.cache
def cache_keyword(fn) -> str:
    """The name ``fn`` takes the KV cache under: ``cache`` since transformers 5.2x, where
    ``past_key_values`` still works but warns on every call; ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def text_info(path: str | None, config: dict | None) -> dict:
    """Depth and width of an LLM, from its config alone (no weights)."""
    cfg = load_text_config(path, config)
    return {"num_layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size}


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
