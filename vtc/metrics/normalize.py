"""VQA answer normalisation, as the official VQA evaluation script does it.

Source: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the official VQA API
(github.com/GT-Vision-Lab/VQA; Antol et al., "VQA: Visual Question Answering", ICCV 2015;
Goyal et al., "Making the V in VQA Matter", CVPR 2017). A result answer goes through::

    s = s.replace("\\n", " ").replace("\\t", " ").strip()
    s = processPunctuation(s)      # below: process_punctuation
    s = processDigitArticle(s)     # below: process_digit_article

``process_punctuation``: for each character of ``PUNCTUATION`` (``; / [ ] " { } ( ) = + \\ _ - > < @ `
, ? !``; the apostrophe, colon and period are *not* in it): if the character appears with a space
before or after it anywhere in the input, or the input contains a digit-comma-digit group ("1,000"),
every occurrence is deleted; otherwise every occurrence is replaced by a space ("t-shirt" ->
"t shirt", "1,000" -> "1000", "red, blue" -> "red blue"). Then periods not followed by a digit are
deleted ("yes." -> "yes", "2.5" stays). The official period pattern is ``(?!<=\\d)(\\.)(?!\\d)``:
its first group is a (mistyped) look-*ahead*, so only ``(?!\\d)`` has an effect; and it passes
``re.UNICODE`` (= 32) positionally as ``count``, so at most 32 periods are removed. Both quirks
are kept.

``process_digit_article``: lower-case, split on whitespace, map number words ``none zero one ...
ten`` to digits ("none" -> "0"), drop the articles ``a an the``, then replace whole words found in
the contraction table ("dont" -> "don't"), and join with single spaces. The table is the official
one, including its oddities (keys with capitals such as "Im" can never match after lower-casing;
"somebody'd" maps to "somebodyd").

Also here: :func:`normalize_answer_evalai`, the EvalAI answer processor (MMF / pythia's
``EvalAIAnswerProcessor``) that LLaVA's ``llava/eval/m4c_evaluator.py`` applies to TextVQA
predictions and ground truths, and LLaVA's VQAv2 submission converter to predictions. It first
lower-cases, deletes every "," and "?", and splits "'s" off ("dog's" -> "dog 's"), then runs the
same punctuation / digit-article steps (its comma test is ``(?<=\\d)(,)+(?=\\d)``).
"""
from __future__ import annotations

import re

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "normalize_answer",
    "normalize_answer_evalai",
    "process_digit_article",
    "process_punctuation",
]

# The official contraction table (vqaEval.py), written out: missing-apostrophe form -> fixed form.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)

_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim; effectively r"\.(?!\d)"
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official call passes re.UNICODE (32) as `count`
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(,)+(?=\d)")


def _punctuation(text: str, comma_pattern: re.Pattern) -> str:
    out = text
    digit_comma = comma_pattern.search(text) is not None
    for p in PUNCTUATION:
        # the tests look at the *input* text, not at the partly processed one (as the original)
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module docstring)."""
    return _punctuation(text, _COMMA_STRIP)


def process_digit_article(text: str, *, none_to_zero: bool = True) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop articles,
    fix contractions, single spaces. ``none_to_zero=False`` leaves the word "none" alone (the
    official table maps it to "0"; see :class:`vtc.metrics.exact_match.ExactMatchAccuracy`)."""
    words = []
    for word in text.lower().split():
        if word != "none" or none_to_zero:
            word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str, *, none_to_zero: bool = True) -> str:
    """Normalise an answer exactly as the official VQA evaluation normalises a result answer:
    newlines/tabs -> spaces, strip, :func:`process_punctuation`, :func:`process_digit_article`.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The T-shirt")
    't shirt'
    >>> normalize_answer("1,000")
    '1000'
    >>> normalize_answer("dont")
    "don't"
    """
    s = str(s).replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(s), none_to_zero=none_to_zero)


def normalize_answer_evalai(s: str) -> str:
    """EvalAI's answer processor as used by LLaVA's ``m4c_evaluator.py`` (TextVQA) and its VQAv2
    submission converter: lower-case; delete "," and "?"; "'s" -> " 's"; strip; newlines/tabs ->
    spaces; strip; punctuation (EvalAI's comma pattern); digits / articles / contractions.

    >>> normalize_answer_evalai("The dog's ball?")
    "dog 's ball"
    """
    s = str(s).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(_punctuation(s, _EVALAI_COMMA_STRIP))
