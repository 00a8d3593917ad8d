"""MME perception / cognition scores.

Benchmark: Fu et al., "MME: A Comprehensive Evaluation Benchmark for Multimodal Large Language
Models", 2023. Scoring follows MME's official ``eval_tool/calculation.py`` (which LLaVA runs after
``convert_answer_to_mme.py``).

Every image has two yes/no questions. Per category (answers parsed by :func:`parse_mme_answer`)::

    acc   = 100 * #correct questions / #questions
    acc+  = 100 * #images with both questions correct / #images
    score = acc + acc+                                    (0..200)
    perception = sum of the scores of the 10 perception categories
                 (existence, count, position, color, posters, celebrity, scene, landmark,
                  artwork, OCR)                           (0..2000)
    cognition  = sum over commonsense_reasoning, numerical_calculation, text_translation,
                 code_reasoning                           (0..800)

Answer parsing (verbatim MME rule): lower-case the prediction; "yes" or "no" as a whole is taken
as is; otherwise look at its first 4 characters: containing "yes" -> yes, else containing "no" ->
no, else "other" (always wrong). So "Yes, it is" -> yes, "No." -> no, "not sure" -> no (the prefix
"not " contains "no"), "none" -> no, "I think yes" -> other. No stripping (LLaVA strips the
generated text before writing it). Ground truths are "Yes"/"No" (any case).

Pairing. The official script pairs consecutive lines of a category's result file; here questions
are grouped by (category, image), so order does not matter. Because a distributed sampler can send
the two questions of an image to different processes, the per-question rows ``(category index,
48-bit hash of category+image as two 24-bit halves, correct)`` are a list state reduced by
concatenation (``dist_reduce_fx="cat"``); the per-category question counts are sum states. The rows
are flat float32 tensors (every value < 2**24, so exact): torchmetrics stands in an empty tensor of
the metric's dtype (float32 unless ``set_dtype`` changed it; keep it) for a process that saw no
question, and the gathered tensors must agree in dtype and rank. An image counts for
acc+ when all of its questions (two in MME) are right. Categories without any question are left
out of the result and add 0 to perception / cognition.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["COGNITION", "MME_CATEGORIES", "MMEScore", "PERCEPTION", "canonical_category", "parse_mme_answer"]

PERCEPTION: tuple[str, ...] = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)
COGNITION: tuple[str, ...] = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_CATEGORIES: tuple[str, ...] = PERCEPTION + COGNITION
_BY_LOWER = {c.lower(): c for c in MME_CATEGORIES}


def canonical_category(name: str) -> str:
    """MME's spelling of a category name (case-insensitive: "ocr" -> "OCR"); ValueError if unknown."""
    try:
        return _BY_LOWER[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown MME category {name!r}; expected one of {MME_CATEGORIES}") from None


def parse_mme_answer(text: str) -> str:
    """MME's ``parse_pred_ans`` on the lower-cased text -> "yes", "no" or "other"."""
    pred = str(text).lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def _image_key(category: str, image: str) -> tuple[int, int]:
    """48-bit hash of (category, image) as two 24-bit halves (exact in float32)."""
    digest = hashlib.blake2b(f"{category}\0{image}".encode(), digest_size=6).digest()
    return int.from_bytes(digest[:3], "little"), int.from_bytes(digest[3:], "little")


class MMEScore(Metric):
    """MME scores (module docstring). ``update(preds, targets, categories, images)``:

    * ``preds``: generated answers; ``targets``: "Yes"/"No";
    * ``categories``: MME category names (``MME_CATEGORIES``, case-insensitive);
    * ``images``: what identifies the image a question is about (LLaVA's MME question_id,
      e.g. "artwork/images/10002.jpg", or the image path).

    ``compute()`` -> Python floats: ``"<category>/acc"``, ``"<category>/acc_plus"`` (percent),
    ``"<category>/score"`` for every category seen, and ``"perception"``, ``"cognition"``,
    ``"total"`` (= perception + cognition).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        n = len(MME_CATEGORIES)
        self.add_state("q_total", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("q_correct", default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        # flat float32, 4 values per question: category index, image key high / low half, correct
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str], targets: Sequence[str], categories: Sequence[str], images: Sequence[str]) -> None:
        if not (len(preds) == len(targets) == len(categories) == len(images)):
            raise ValueError("preds, targets, categories and images must have the same length")
        if not preds:
            return
        rows = []
        for p, t, c, img in zip(preds, targets, categories, images):
            gt = str(t).strip().lower()
            if gt not in ("yes", "no"):
                raise ValueError(f"MME ground truth must be Yes or No, got {t!r}")
            cat = canonical_category(c)
            rows.append((MME_CATEGORIES.index(cat), *_image_key(cat, str(img)), int(parse_mme_answer(p) == gt)))
        rows_t = torch.tensor(rows, dtype=torch.long, device=self.q_total.device)
        n = len(MME_CATEGORIES)
        self.q_total += torch.bincount(rows_t[:, 0], minlength=n)
        self.q_correct += torch.bincount(rows_t[:, 0][rows_t[:, 3] == 1], minlength=n)
        self.rows.append(rows_t.to(torch.float32).flatten())

    def compute(self) -> dict[str, float]:
        rows = self.rows
        if isinstance(rows, list):
            rows = dim_zero_cat(rows) if rows else torch.zeros(0)
        images: dict[tuple[int, int, int], bool] = {}
        for cat, hi, lo, ok in rows.reshape(-1, 4).long().tolist():
            images[(cat, hi, lo)] = images.get((cat, hi, lo), True) and bool(ok)
        n_img = [0] * len(MME_CATEGORIES)
        n_img_ok = [0] * len(MME_CATEGORIES)
        for (cat, _, _), ok in images.items():
            n_img[cat] += 1
            n_img_ok[cat] += ok
        out: dict[str, float] = {}
        sums = {"perception": 0.0, "cognition": 0.0}
        for i, cat in enumerate(MME_CATEGORIES):
            total = int(self.q_total[i])
            if total == 0:
                continue
            acc = 100.0 * int(self.q_correct[i]) / total
            acc_plus = 100.0 * n_img_ok[i] / n_img[i] if n_img[i] else 0.0
            out[f"{cat}/acc"], out[f"{cat}/acc_plus"], out[f"{cat}/score"] = acc, acc_plus, acc + acc_plus
            sums["perception" if cat in PERCEPTION else "cognition"] += acc + acc_plus
        out.update(sums)
        out["total"] = sums["perception"] + sums["cognition"]
        return out
