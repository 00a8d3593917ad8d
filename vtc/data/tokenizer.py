"""Tokenizers: an offline word-level one for tiny worlds, and a loader for any HF tokenizer.

``build_tiny_tokenizer(texts, out_dir)`` needs no network and no training: the vocabulary is
the sorted set of words of ``texts`` plus the templates' own words (:data:`TEMPLATE_TEXTS`).
Ids: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, ``<image>`` 4, then the words. Words are
whitespace-separated pieces further split at every punctuation character (``"digit?"`` ->
``digit``, ``?``); case is kept. Decoding joins tokens with single spaces. ``tokenizer(text)``
with the default ``add_special_tokens=True`` prepends ``<s>``, as a Llama tokenizer does (the
templates always pass ``add_special_tokens=False`` and insert ``<s>`` themselves).

``load_tokenizer(path)`` loads any saved tokenizer offline, adds ``<image>`` as a special token
when the vocabulary lacks it (then ``len(tokenizer)`` grows by one: a pretrained LLM must resize
its embeddings to ``len(tokenizer)``), and sets a missing pad token to ``<unk>`` (LLaVA's choice
for Llama) or else ``</s>``.

The word-level tokenizer knows only the words it was built from: every other word of real data
becomes ``<unk>`` without a warning (a model trained on such answers learns to say ``<unk>``: loss
~0.01, accuracy 0). :func:`is_word_level` tells it apart; the datamodule's training decoder stops
a run whose answer tokens hold too many ``<unk>`` (``data.max_unk_fraction``, vtc.data.skips).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from vtc.data.batch import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vtc.data.templates import TEMPLATE_TEXTS

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_PLACEHOLDER)


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def build_tiny_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, model_max_length: int = 4096):
    """Build, save (``save_pretrained(out_dir)``) and return a word-level tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in list(texts) + list(TEMPLATE_TEXTS):
        for special in (*SPECIAL_TOKENS, VIDEO_PLACEHOLDER):  # <video> is tokenised as <image>
            text = text.replace(special, " ")
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    words.difference_update(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + sorted(words))}

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    # WordPiece's decoder joins tokens with spaces; no token starts with the prefix, so no glue.
    tok.decoder = decoders.WordPiece(prefix="\u0000##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=[IMAGE_PLACEHOLDER],
        model_max_length=model_max_length,
        padding_side="right",
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)`` + ``<image>`` + a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [IMAGE_PLACEHOLDER]}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def is_word_level(tokenizer) -> bool:
    """Whether ``tokenizer`` is word-level (vtc's tiny one): it fits only the texts it was built from."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"
