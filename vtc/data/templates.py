"""Conversation templates: LLaVA ``conversations`` -> token ids, labels, generation prompt.

Input: ``[{"from": "human", "value": str}, {"from": "gpt", "value": str}, ...]``, starting with
the human, alternating, ending with the assistant (several rounds allowed). The visual
placeholders (``<image>``, ``<video>``: one per visual item, docs/video.md) appear in the first
human turn.

Templates (``template=``):

``plain`` (LLaVA pretraining)
    ``<s> <image> {first gpt value} \\n`` -- the human text is dropped, as LLaVA's
    ``preprocess_plain`` does; loss on the caption and the ``\\n``. When the tokenizer maps
    ``"\\n"`` to no token at all (a word-level tokenizer), ``</s>`` ends the caption instead, so
    that the model always learns where a caption stops. Later rounds are ignored.

``vicuna_v1`` (LLaVA ``conv_vicuna_v1``)
    ``<s>{SYSTEM}`` then per round `` USER: {human} ASSISTANT: {gpt}</s>``; loss on
    ``{gpt}</s>`` of every round, nothing else (system, roles, questions, image placeholder).
    ``SYSTEM`` is Vicuna's system prompt (:data:`VICUNA_SYSTEM`) unless ``system`` gives
    another (``""``: none; the synthetic set's tiny model drops it, see conf/data/synthetic.yaml).

How the ids are made (the choice to know about): the text is cut into *segments* at every
boundary that matters -- the image placeholder, the start of each answer, each ``</s>`` -- and
each segment is tokenised on its own with ``add_special_tokens=False``; the ids are then
concatenated. ``<s>`` / ``</s>`` / ``<image>`` are inserted as ids, never tokenised from text.
This makes the label mask exact by construction (no re-tokenisation and length arithmetic as in
LLaVA's ``preprocess_v1``), and makes the teacher-forced prompt of the last round identical, id
for id, to the generation prompt. The cost: a SentencePiece tokenizer sees each segment as the
start of a text (it adds its prefix space ``▁`` there), so ids can differ slightly from
tokenising the whole string at once -- the same thing LLaVA's ``tokenizer_image_token`` does
around ``<image>``. The space between ``ASSISTANT:`` and the answer is left to the tokenizer
(SentencePiece's prefix space; a word-level tokenizer ignores whitespace).

Visual items: ``visual_items`` (default: 1 with ``has_image``, else 0) is how many the sample
has. ``<video>`` becomes the same placeholder id as ``<image>`` (the sample's item list says which
is which). With one item and no placeholder in the text, ``<image>\\n`` is put at the start of the
first human turn (what LLaVA's data loading effectively requires). A placeholder in a sample with
no item, a count of placeholders other than the item count (one item: at most one), or a
placeholder outside the first human turn raise ``ValueError``.

Truncation (``max_length`` counts text tokens; the placeholder counts 1 -- the visual tokens
are added by the model later): ``input_ids``/``labels`` are cut on the right, which drops later
rounds first and keeps the image (it sits in the first round). If the placeholder itself would
fall beyond ``max_length`` the sample cannot be represented and ``ValueError`` is raised (the
data pipeline skips and counts it). A sample may end up with no supervised token when its
answers are cut; the training pipeline drops those. ``gen_input_ids`` longer than
``max_length`` keep their head up to and including the placeholder (or ``<s>``) and the tail
that ends with ``ASSISTANT:``; the middle (older rounds) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from vtc.data.batch import IGNORE_INDEX, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
TEMPLATES = ("plain", "vicuna_v1")
# Every text the templates themselves add, so that a tiny vocabulary can cover it.
TEMPLATE_TEXTS = (VICUNA_SYSTEM, f" {USER_ROLE}: ", f" {ASSISTANT_ROLE}:", "\n")

_HUMAN, _GPT = "human", "gpt"


def _check_conversation(conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(
            f"conversations must be a non-empty list of {{'from', 'value'}} dicts, "
            f"got {type(conversations).__name__}"
        )
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i} is not a dict with 'from' and 'value': {turn!r}")
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise ValueError(f"conversation turn {i}: 'value' must be a string, got {type(value).__name__}")
        expected = _HUMAN if i % 2 == 0 else _GPT
        if role != expected:
            raise ValueError(
                f"conversation turn {i}: expected from={expected!r} (roles must alternate "
                f"human, gpt, human, ...), got {role!r}"
            )
        turns.append((role, value))
    if len(turns) % 2:
        raise ValueError("conversation must end with a 'gpt' turn (the reference answer)")
    return turns


PLACEHOLDER_RE = re.compile(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}")


def placeholder_kinds(conversations: Sequence[dict]) -> list[str]:
    """The placeholders of a record in text order, as ``"image"`` / ``"video"``: the order the
    sample's visual items must come in."""
    text = "".join(str(t.get("value", "")) for t in conversations if isinstance(t, dict))
    return ["video" if m.group(0) == VIDEO_PLACEHOLDER else "image" for m in PLACEHOLDER_RE.finditer(text)]


def _place_visuals(turns: list[tuple[str, str]], items: int) -> list[tuple[str, str]]:
    turns = [(role, PLACEHOLDER_RE.sub(IMAGE_PLACEHOLDER, value)) for role, value in turns]
    counts = [v.count(IMAGE_PLACEHOLDER) for _, v in turns]
    total = sum(counts)
    if items == 0:
        if total:
            raise ValueError(f"{IMAGE_PLACEHOLDER} appears in the conversation but the sample has no image")
        return turns
    where = [i for i, c in enumerate(counts) if c]
    if total != counts[0] or total > items or (items > 1 and total != items):
        want = "at most one" if items == 1 else f"{items}"
        raise ValueError(f"expected {want} {IMAGE_PLACEHOLDER}/{VIDEO_PLACEHOLDER} for {items} visual item(s), "
                         f"in the first human turn; found {total} in turns {where}")
    if total == 0:
        turns = [(turns[0][0], f"{IMAGE_PLACEHOLDER}\n" + turns[0][1])] + turns[1:]
    return turns


def _text_ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _Builder:
    """Accumulates ids and labels segment by segment."""

    def __init__(self, tokenizer, image_id: int):
        self.tok = tokenizer
        self.image_id = image_id
        self.ids: list[int] = []
        self.labels: list[int] = []

    def text(self, text: str, train: bool, image_ok: bool = False) -> None:
        """Tokenise ``text`` (splitting at the placeholder when ``image_ok``)."""
        parts = text.split(IMAGE_PLACEHOLDER) if image_ok else [text]
        for k, part in enumerate(parts):
            if k:
                self.token(self.image_id, False)
            ids = _text_ids(self.tok, part)
            self.ids += ids
            self.labels += ids if train else [IGNORE_INDEX] * len(ids)

    def token(self, token_id: int | None, train: bool) -> None:
        if token_id is None:
            return
        self.ids.append(int(token_id))
        self.labels.append(int(token_id) if train else IGNORE_INDEX)


def _truncate_gen(ids: list[int], max_length: int, keep_head: int) -> list[int]:
    if len(ids) <= max_length:
        return ids
    tail = max_length - keep_head
    if tail <= 0:
        raise ValueError(f"generation prompt head of {keep_head} tokens exceeds max_length={max_length}")
    return ids[:keep_head] + ids[-tail:]


def encode_conversation(
    tokenizer,
    conversations: Sequence[dict],
    template: str,
    max_length: int | None = None,
    has_image: bool = True,
    system: str | None = None,
    visual_items: int | None = None,
) -> dict:
    """Encode one LLaVA conversation (see module docstring).

    Returns ``dict(input_ids: list[int], labels: list[int], gen_input_ids: list[int],
    answer: str)``: teacher-forced ids and unshifted labels (``IGNORE_INDEX`` off the
    assistant's tokens), the generation prompt of the last round (up to and including
    ``ASSISTANT:``; ``<s> <image>`` for ``plain``), and the last assistant answer (stripped).
    ``system``: the vicuna_v1 system prompt (None: :data:`VICUNA_SYSTEM`); plain has none.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {TEMPLATES}")
    if max_length is not None and int(max_length) <= 0:
        raise ValueError(f"max_length must be positive or None, got {max_length}")
    items = (1 if has_image else 0) if visual_items is None else int(visual_items)
    has_image = items > 0
    turns = _place_visuals(_check_conversation(conversations), items)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER) if has_image else None
    if has_image and (image_id is None or image_id == tokenizer.unk_token_id):
        raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER} token; load it with vtc.data.tokenizer.load_tokenizer")
    eos = tokenizer.eos_token_id
    b = _Builder(tokenizer, image_id)
    b.token(tokenizer.bos_token_id, False)

    if template == "plain":
        for _ in range(items):
            b.token(image_id, False)
        gen_ids = list(b.ids)
        answer = turns[1][1]
        b.text(answer, True)
        newline = _text_ids(tokenizer, "\n")
        if newline:
            b.ids += newline
            b.labels += newline
        else:
            b.token(eos, True)
        gen_answer = answer
    else:  # vicuna_v1
        gen_ids: list[int] = []
        system = VICUNA_SYSTEM if system is None else system
        for r in range(0, len(turns), 2):
            human, gpt = turns[r][1], turns[r + 1][1]
            prompt = f" {USER_ROLE}: {human} {ASSISTANT_ROLE}:"
            b.text(system + prompt if r == 0 else prompt, False, image_ok=(r == 0))
            if r == len(turns) - 2:
                gen_ids = list(b.ids)
            b.text(gpt, True)
            b.token(eos, True)
        gen_answer = turns[-1][1]

    ids, labels = b.ids, b.labels
    head = 1 if tokenizer.bos_token_id is not None else 0
    if has_image:
        pos = len(ids) - 1 - ids[::-1].index(image_id)  # the last placeholder: every item must fit
        head = pos + 1
        if max_length is not None and pos >= max_length:
            raise ValueError(
                f"the image placeholder sits at token {pos}, beyond max_length={max_length}"
            )
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
        gen_ids = _truncate_gen(gen_ids, int(max_length), head)
    return {"input_ids": ids, "labels": labels, "gen_input_ids": gen_ids, "answer": gen_answer.strip()}
