"""POPE, MME and ScienceQA: answer parsing, metrics and the released files' formats. As
tests/metrics/test_metrics.py: fixtures in the real formats, expected numbers worked out by hand."""
from __future__ import annotations

import json

import pytest

from tests.metrics.test_metrics import SHORT, answers_file, write_jsonl
from vtc.data.eval_files import write_questions
from vtc.data.eval_gt import read_mme_gt, read_pope_gt, read_scienceqa_gt
from vtc.data.eval_score import score_benchmark
from vtc.metrics.mme import MMEScore, parse_mme_answer
from vtc.metrics.pope import POPEMetrics, parse_pope_answer
from vtc.metrics.scienceqa import parse_choice


# -- POPE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("No", "no"), ("no.", "no"), ("No, there is not.", "no"), ("There is no dog", "no"), ("It is not", "no"),
    ("Yes", "yes"), ("Yes, there is a dog.", "yes"),
    ("Yes. No.", "yes"),      # only the first sentence counts
    ("NO", "yes"),            # case-sensitive words: "NO" is none of No / not / no
    ("Not really", "yes"),    # "Not" is not "not"
    ("Nope", "yes"), ("I don't know", "yes"), ("nothing", "yes"),
    ("no\nthere is none", "yes"),  # split on single spaces only: "no\nthere" is one word
])
def test_pope_parsing(text, expected):
    assert parse_pope_answer(text) == expected


POPE_QUESTIONS = [
    {"question_id": i, "image": f"COCO_val2014_{i:012d}.jpg", "text": "Is there a dog in the image?" + SHORT,
     "category": "random" if i <= 4 else "popular"} for i in range(1, 9)
]
POPE_LABELS = ["yes", "yes", "no", "no", "yes", "yes", "yes", "no"]
POPE_PREDS = ["Yes, there is a dog.", "No", "No.", "Yes",            # random: TP FN TN FP
              "Yes", "There is not a cat", "NO", "No, there is not."]  # popular: TP FN TP(NO->yes) TN


def check_pope(out):
    # random: TP=FN=TN=FP=1 -> acc .5, precision 1/2, recall 1/2, F1 .5, yes ratio 2/4
    assert out["random/acc"] == pytest.approx(0.5)
    assert out["random/f1"] == pytest.approx(0.5)
    assert out["random/yes_ratio"] == pytest.approx(0.5)
    # popular: TP=2, FN=1, TN=1, FP=0 -> acc 3/4, precision 2/2, recall 2/3,
    # F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8, yes ratio 2/4
    assert out["popular/acc"] == pytest.approx(0.75)
    assert out["popular/precision"] == pytest.approx(1.0)
    assert out["popular/recall"] == pytest.approx(2 / 3)
    assert out["popular/f1"] == pytest.approx(0.8)
    assert out["popular/yes_ratio"] == pytest.approx(0.5)
    # top level: the mean over the two splits
    assert out["acc"] == pytest.approx((0.5 + 0.75) / 2)
    assert out["precision"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["recall"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["f1"] == pytest.approx((0.5 + 0.8) / 2)
    assert out["n"] == 8


def test_pope_files(tmp_path):
    write_questions(tmp_path / "llava_pope_test.jsonl", POPE_QUESTIONS)
    # the label file as JSONL with categories
    write_jsonl(tmp_path / "labels.jsonl", [{"question_id": q["question_id"], "label": lab, "category": q["category"]}
                                            for q, lab in zip(POPE_QUESTIONS, POPE_LABELS)])
    answers_file(tmp_path / "ans.jsonl", [(q["question_id"], p) for q, p in zip(POPE_QUESTIONS, POPE_PREDS)])
    check_pope(score_benchmark("pope", tmp_path / "ans.jsonl", tmp_path / "labels.jsonl"))
    # POPE's own folder: coco_pope_<category>.json (JSONL lines, per-file ids), paired by position
    # with the question file's questions of that category, as LLaVA's eval_pope.py does
    pope_dir = tmp_path / "coco"
    pope_dir.mkdir()
    for cat, idx in (("random", range(0, 4)), ("popular", range(4, 8))):
        write_jsonl(pope_dir / f"coco_pope_{cat}.json",
                    [{"question_id": j + 1, "image": "x.jpg", "text": "?", "label": POPE_LABELS[i]} for j, i in enumerate(idx)])
    gt = read_pope_gt(pope_dir, tmp_path / "llava_pope_test.jsonl")
    assert gt["3"] == {"label": "no", "category": "random"}
    check_pope(score_benchmark("pope", tmp_path / "ans.jsonl", gt))
    # without categories: one pooled confusion matrix: TP=3, FN=2, TN=2, FP=1 -> acc 5/8
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"question_id": q["question_id"], "label": lab}
                                                 for q, lab in zip(POPE_QUESTIONS, POPE_LABELS)])
    pooled = score_benchmark("pope", tmp_path / "ans.jsonl", flat)
    assert pooled["acc"] == pytest.approx(5 / 8)
    assert pooled["precision"] == pytest.approx(3 / 4) and pooled["recall"] == pytest.approx(3 / 5)
    # ... and the question file brings the categories back
    check_pope(score_benchmark("pope", tmp_path / "ans.jsonl", flat, questions=tmp_path / "llava_pope_test.jsonl"))


def test_pope_metric_edge_cases():
    m = POPEMetrics()
    m.update(["No", "No"], ["no", False])  # no "yes" predicted: precision's denominator is 0 -> 0.0
    assert m.compute() == {"acc": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        m.update(["yes"], ["maybe"])


# -- MME ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"),
    ("not sure", "no"),    # first 4 chars "not " contain "no"
    ("None", "no"),
    ("I think yes", "other"), ("Maybe", "other"),
    (" yes", "yes"), ("  yes", "other"),  # no stripping: only the first 4 characters are looked at
])
def test_mme_parsing(text, expected):
    assert parse_mme_answer(text) == expected


def make_mme_release(root):
    """Two layouts of the MME release: flat (<category>/<image>.txt) and images/ + questions_answers_YN/."""
    (root / "existence").mkdir(parents=True)
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n")
    (root / "existence" / "000000018150.txt").write_text(
        "Is there a bed in this image? Please answer yes or no.\tYes\n"
        "Is there a dog in this image?  Please answer yes or no.\tNo\n")  # double space, as some MME files
    (root / "artwork" / "images").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN").mkdir()
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by maris, jacobus hendricus? Please answer yes or no.\tYes\n"
        "Is this artwork created by bonnard, pierre? Please answer yes or no.\tNo\n")
    (root / "code_reasoning").mkdir()
    (root / "code_reasoning" / "0020.txt").write_text(
        "Is a python code shown in the picture? Please answer yes or no.\tYes\n"
        "Is a c++ code shown in the picture? Please answer yes or no.\tNo\n")


def test_mme_files(tmp_path):
    make_mme_release(tmp_path / "MME")
    gt = read_mme_gt(tmp_path / "MME")
    assert len(gt) == 8
    # LLaVA's question file: question_id = image path (shared by the two questions), the MME suffix
    # replaced by LLaVA's short-answer one; answers interleaved, not in pairs (grouping is by image)
    rows = [  # (question_id, question, prediction, right?)
        ("existence/000000006040.jpg", "Is there a train in this image?", "Yes", True),
        ("existence/000000018150.jpg", "Is there a bed in this image?", "Yes", True),
        ("artwork/images/10002.jpg", "Is this artwork created by maris, jacobus hendricus?", "Yes, it is.", True),
        ("code_reasoning/0020.png", "Is a python code shown in the picture?", "I think yes", False),  # other
        ("existence/000000006040.jpg", "Is there a bed in this image?", "No", True),
        ("existence/000000018150.jpg", "Is there a dog in this image?", "Yes", False),
        ("artwork/images/10002.jpg", "Is this artwork created by bonnard, pierre?", "not sure", True),  # -> no
        ("code_reasoning/0020.png", "Is a c++ code shown in the picture?", "No", True),
    ]
    questions = [{"question_id": q, "image": q, "text": text + SHORT, "category": q.split("/")[0]} for q, text, _, _ in rows]
    write_questions(tmp_path / "llava_mme.jsonl", questions)
    answers_file(tmp_path / "ans.jsonl", [(q, pred) for q, _, pred, _ in rows],
                 {i: q["text"] for i, q in enumerate(questions)})
    out = score_benchmark("mme", tmp_path / "ans.jsonl", tmp_path / "MME", questions=tmp_path / "llava_mme.jsonl")
    # existence: 3 of 4 questions right -> acc 75; image 6040 both right, 18150 not -> acc+ 50; score 125
    assert out["existence/acc"] == pytest.approx(75.0)
    assert out["existence/acc_plus"] == pytest.approx(50.0)
    assert out["existence/score"] == pytest.approx(125.0)
    # artwork: 2/2, its one image right -> 100 + 100
    assert out["artwork/score"] == pytest.approx(200.0)
    # code_reasoning: 1/2 -> 50, image not fully right -> 0; score 50
    assert out["code_reasoning/acc"] == pytest.approx(50.0) and out["code_reasoning/acc_plus"] == 0.0
    assert out["perception"] == pytest.approx(125 + 200)
    assert out["cognition"] == pytest.approx(50.0)
    assert out["total"] == pytest.approx(375.0)
    assert out["n"] == 8 and out["n_missing"] == 0
    # the same ground truth as a JSONL (question file + "answer"), category from the question id
    write_jsonl(tmp_path / "mme_gt.jsonl", [{"question_id": q["question_id"], "image": q["image"], "text": q["text"],
                                            "answer": gt_ans} for q, gt_ans in
                                           zip(questions, ["Yes", "Yes", "Yes", "Yes", "No", "No", "No", "No"])])
    assert score_benchmark("mme", tmp_path / "ans.jsonl", tmp_path / "mme_gt.jsonl")["total"] == pytest.approx(375.0)


def test_mme_metric_checks():
    m = MMEScore()
    with pytest.raises(ValueError):
        m.update(["yes"], ["yes"], ["not_a_category"], ["img"])
    with pytest.raises(ValueError):
        m.update(["yes"], ["maybe"], ["count"], ["img"])
    m.update(["yes"], ["Yes"], ["ocr"], ["img"])  # category names are case-insensitive
    assert m.compute()["OCR/score"] == pytest.approx(200.0)


# -- ScienceQA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, lenient, strict", [
    ("A", 0, 0), ("B. Paris", 1, 1), ("The answer is C.", 2, 2),
    ("A.", 0, -1),                # LLaVA-1.5: not a letter, no "X. " prefix, no "The answer is"
    ("The answer is B", 1, -1),   # LLaVA's pattern needs a character after the letter
    ("(B)", 1, -1), ("B)", 1, -1), ("b", -1, -1),
    ("E", -1, -1),                # a letter beyond the 4 choices
    ("Because of heat", -1, -1),
    ("The answer is A. The answer is A.", 0, -1),  # LLaVA-1.5 wants exactly one match
    # the lenient parser sees two different letters; LLaVA's case-sensitive pattern sees only "A"
    ("The answer is A. Or the answer is B.", -1, 0),
])
def test_scienceqa_parsing(text, lenient, strict):
    assert parse_choice(text, 4) == lenient
    assert parse_choice(text, 4, strict=True) == strict


def test_scienceqa_files(tmp_path):
    def problem(choices, answer, image, split="test"):
        return {"question": "?", "choices": choices, "answer": answer, "hint": "", "image": image,
                "task": "closed choice", "grade": "grade5", "subject": "natural science", "split": split}
    problems = {"1": problem(["a", "b", "c"], 0, "image.png"), "2": problem(["x", "y"], 1, None),
                "3": problem(["p", "q", "r", "s"], 2, "image.png"), "4": problem(["m", "n"], 0, "image.png"),
                "5": problem(["u", "v"], 0, None, split="train"), "6": problem(["u", "v"], 1, None)}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    answers_file(tmp_path / "ans.jsonl", [("1", "A"), ("2", "The answer is B."), ("3", "C."), ("4", "C")])
    out = score_benchmark("scienceqa", tmp_path / "ans.jsonl", tmp_path / "problems.json", split="test")
    # right: 1 (A=0), 2 (B=1), 3 ("C." -> 2); wrong: 4 ("C" is beyond its 2 choices) -> 3/4
    assert out["acc"] == pytest.approx(0.75)
    assert out["img_acc"] == pytest.approx(2 / 3)  # image problems 1, 3, 4: 1 and 3 right
    assert out["n_missing"] == 1  # problem 6 (test); 5 is train
    strict = score_benchmark("scienceqa", tmp_path / "ans.jsonl", tmp_path / "problems.json", strict=True)
    # LLaVA-1.5's parser rejects "C.": right 1, 2 -> 2/4; image: only 1 -> 1/3
    assert strict["acc"] == pytest.approx(0.5) and strict["img_acc"] == pytest.approx(1 / 3)
    assert "n_missing" not in strict  # no split: problems.json holds every split
    assert read_scienceqa_gt(tmp_path / "problems.json", "test")["3"] == {
        "answer": 2, "n_choices": 4, "has_image": True, "split": "test"}
