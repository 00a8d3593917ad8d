"""Benchmark metrics and evaluation files. Fixtures are written in the real file formats into
tmp_path; every expected number is worked out by hand in the comments (not by calling the code
under test). No Lightning import: fast."""
from __future__ import annotations

import json

import pytest
import torch

from vtc.data.eval_files import image_path, read_answers, read_questions, write_answers, write_questions
from vtc.data.eval_gt import read_mme_gt, read_pope_gt, read_scienceqa_gt
from vtc.data.eval_score import score_benchmark
from vtc.metrics.exact_match import ExactMatchAccuracy, TextVQAAccuracy
from vtc.metrics.mme import MMEScore, parse_mme_answer
from vtc.metrics.normalize import normalize_answer, normalize_answer_evalai
from vtc.metrics.pope import POPEMetrics, parse_pope_answer
from vtc.metrics.scienceqa import ScienceQAAccuracy, parse_choice
from vtc.metrics.vqav2 import VQAv2Accuracy, leave_one_out_accuracy

SHORT = "\nAnswer the question using a single word or phrase."


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def answers_file(path, pairs, prompts=None):
    """LLaVA answer-file lines for (question_id, text) pairs."""
    prompts = prompts or {}
    return write_jsonl(path, [{"question_id": q, "prompt": prompts.get(i, ""), "text": t, "answer_id": f"a{i}",
                               "model_id": "m", "metadata": {}} for i, (q, t) in enumerate(pairs)])


# -- normalisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    # number words -> digits (whole words only), case folded
    ("Two", "2"), ("ten", "10"), ("zero", "0"), ("none", "0"), ("twenty", "twenty"), ("Two dogs", "2 dogs"),
    # articles a / an / the dropped, only as whole words
    ("The cat", "cat"), ("an apple", "apple"), ("a dog and the cat", "dog and cat"), ("theater", "theater"),
    # comma between digits: then *all* listed punctuation is deleted
    ("1,000", "1000"), ("10,000 people", "10000 people"),
    # punctuation touching a space is deleted, otherwise replaced by a space
    ("red, blue", "red blue"), ("red,blue", "red blue"), ("t-shirt", "t shirt"), ("left - right", "left right"),
    ("What?", "what"), ("hello!", "hello"), ("(a)", ""),
    # periods: deleted unless a digit follows
    ("yes.", "yes"), ("3.5", "3.5"), ("U.S.A.", "usa"), (".5", ".5"),
    # apostrophe and colon are not in the punctuation list
    ("it's", "it's"), ("10:30", "10:30"),
    # contractions (the official table; applied after lower-casing, word by word)
    ("dont", "don't"), ("isnt it", "isn't it"), ("Wont", "won't"), ("youre", "you're"), ("oclock", "o'clock"),
    ("Im", "im"),  # the table's key is "Im": it cannot match after lower-casing (as the official script)
    # whitespace: newlines / tabs -> spaces, runs collapsed
    ("  Yes\nit\tis  ", "yes it is"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_variants():
    # the EvalAI processor (LLaVA's TextVQA) deletes commas and "?" *before* the punctuation step and
    # splits "'s" off; everything else is the same processing
    assert normalize_answer_evalai("red,blue") == "redblue"  # official: "red blue"
    assert normalize_answer_evalai("The dog's ball?") == "dog 's ball"
    assert normalize_answer_evalai("Coca-Cola") == "coca cola"
    assert normalize_answer_evalai("Two") == "2"
    # "none" -> "0" can be switched off (the synthetic set tells "none" from "0")
    assert normalize_answer("None", none_to_zero=False) == "none"
    assert normalize_answer("two", none_to_zero=False) == "2"


# -- exact match --------------------------------------------------------------------------------
def test_exact_match():
    m = ExactMatchAccuracy()
    # "Two" ~ "2" (number word), "The cat." ~ "cat" (article, period), "none" != "0" (kept by default),
    # "dog" != "cat": 2 of 4
    m.update(["Two", "The cat.", "none", "dog"], ["2", "cat", "0", "cat"])
    assert float(m.compute()) == pytest.approx(2 / 4)
    official = ExactMatchAccuracy(none_to_zero=True)
    official.update(["none"], ["0"])  # the official table maps "none" -> "0": a match
    assert float(official.compute()) == 1.0
    gqa = ExactMatchAccuracy("gqa")
    # LLaVA's GQA conversion only strips trailing periods and lower-cases: "Yes." ~ "yes", "The dog" != "dog"
    gqa.update(["Yes.", "The dog"], ["yes", "dog"])
    assert float(gqa.compute()) == pytest.approx(0.5)
    assert float(ExactMatchAccuracy().compute()) == 0.0  # nothing seen
    with pytest.raises(ValueError):
        m.update(["a"], ["a", "b"])
    with pytest.raises(TypeError):
        m.update(["a"], [["a", "b"]])


def test_leave_one_out_by_hand():
    # 10 answers, k of them equal to the prediction. Annotator i left out: if i is one of the k,
    # k-1 of the other 9 match, else k match; score_i = min(1, matches/3); average the 10.
    def ten(k):
        return ["x"] * k + ["y"] * (10 - k)
    assert leave_one_out_accuracy("x", ten(0)) == 0.0
    assert leave_one_out_accuracy("x", ten(1)) == pytest.approx((1 * 0 + 9 * (1 / 3)) / 10)  # 0.3
    assert leave_one_out_accuracy("x", ten(2)) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert leave_one_out_accuracy("x", ten(3)) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)  # 0.9
    assert leave_one_out_accuracy("x", ten(4)) == pytest.approx((4 * 1 + 6 * 1) / 10)  # 1.0
    assert leave_one_out_accuracy("x", ten(2)) == pytest.approx(0.6)


def test_textvqa_accuracy():
    m = TextVQAAccuracy()
    # "Coca-Cola" -> "coca cola", 3 of 10 answers -> 0.9; "12" with 2 of 10 -> 0.6; mean 0.75
    m.update(["Coca-Cola", "12"], [["coca cola"] * 3 + ["coke"] * 7, ["12"] * 2 + ["21"] * 8])
    assert float(m.compute()) == pytest.approx(0.75)


# -- VQAv2 --------------------------------------------------------------------------------------
def vqa_annotation(qid, answers, answer_type):
    return {"question_id": qid, "image_id": 1, "question_type": "what", "answer_type": answer_type,
            "multiple_choice_answer": answers[0],
            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}


def test_vqav2_official_format(tmp_path):
    ann = {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": [
        vqa_annotation(1, ["2", "2"] + ["3"] * 8, "number"),         # pred "two" -> "2": k = 2 -> 0.6
        vqa_annotation(2, ["yes"] * 10, "yes/no"),                   # pred "Yes." -> "yes": k = 10 -> 1.0
        vqa_annotation(3, ["red"] + ["blue"] * 9, "other"),          # pred "red": k = 1 -> 0.3
        vqa_annotation(4, ["t-shirt"] * 3 + ["shirt"] * 7, "other"),  # annotators disagree -> gt punctuation
        # processed: "t-shirt" -> "t shirt"; pred "T-shirt" -> "t shirt": k = 3 -> 0.9
        vqa_annotation(5, ["no"] * 10, "yes/no"),                    # not answered: n_missing
    ]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    answers_file(tmp_path / "ans.jsonl", [(1, "two"), (2, "Yes."), (3, "red"), (4, "T-shirt")])
    out = score_benchmark("vqav2", tmp_path / "ans.jsonl", tmp_path / "ann.json")
    assert out["acc"] == pytest.approx((0.6 + 1.0 + 0.3 + 0.9) / 4)  # 0.7
    assert out["acc_number"] == pytest.approx(0.6)
    assert out["acc_yes_no"] == pytest.approx(1.0)
    assert out["acc_other"] == pytest.approx((0.3 + 0.9) / 2)
    assert out["n"] == 4 and out["n_missing"] == 1


def test_vqav2_simple_jsonl_and_gt_modes(tmp_path):
    write_jsonl(tmp_path / "gt.jsonl", [{"question_id": 7, "answers": ["Two"] * 10}])
    answers = [{"question_id": 7, "text": "2"}]
    # official: ten identical raw answers are compared unprocessed, "2" != "Two" -> 0
    assert score_benchmark("vqav2", answers, tmp_path / "gt.jsonl")["acc"] == 0.0
    # official_gt=False normalises the ground truth too: "Two" -> "2", k = 10 -> 1
    assert score_benchmark("vqav2", answers, tmp_path / "gt.jsonl", official_gt=False)["acc"] == 1.0
    m = VQAv2Accuracy()
    m.update(["two"], [["2", "2"] + ["3"] * 8])
    assert float(m.compute()) == pytest.approx(0.6)


# -- GQA / TextVQA files ------------------------------------------------------------------------
def test_gqa(tmp_path):
    def q(answer, structural, balanced=True):
        return {"question": "?", "imageId": "n1", "answer": answer, "fullAnswer": answer, "isBalanced": balanced,
                "types": {"structural": structural, "semantic": "attr", "detailed": "x"}}
    questions = {"101": q("yes", "verify"), "102": q("dog", "query"), "103": q("left", "choose"),
                 "104": q("no", "verify", balanced=False), "105": q("red", "query"), "106": q("cat", "query")}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    answers_file(tmp_path / "ans.jsonl", [("101", "Yes."), ("102", "The dog"), ("103", "left"), ("105", "Red.")])
    out = score_benchmark("gqa", tmp_path / "ans.jsonl", tmp_path / "testdev_balanced_questions.json")
    # right: 101 ("yes"), 103, 105 ("red"); wrong: 102 ("the dog" != "dog") -> 3/4
    assert out["acc"] == pytest.approx(0.75)
    assert out["acc_binary"] == pytest.approx(2 / 2)  # 101 verify, 103 choose
    assert out["acc_open"] == pytest.approx(1 / 2)  # 102, 105 query
    assert out["n_missing"] == 1  # 106; 104 is not balanced, not scored


def test_textvqa_files(tmp_path):
    data = {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "abc", "question": "what is the brand?",
         "answers": ["coca cola"] * 3 + ["coke"] * 7},
        {"question_id": 34603, "image_id": "def", "question": "What number is on the bus?",
         "answers": ["12"] * 2 + ["21"] * 8},
    ]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    # one answer by question id; one as LLaVA writes it: question_id = image id, question in the prompt
    prompts = {1: "What number is on the bus?\nReference OCR token: 12, 21" + SHORT}
    answers_file(tmp_path / "ans.jsonl", [(34602, "Coca-Cola"), ("def", "12")], prompts)
    out = score_benchmark("textvqa", tmp_path / "ans.jsonl", tmp_path / "TextVQA_0.5.1_val.json")
    assert out["acc"] == pytest.approx((0.9 + 0.6) / 2)  # k = 3 -> 0.9, k = 2 -> 0.6
    assert out["n"] == 2 and out["n_missing"] == 0


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


# -- questions / answers files ------------------------------------------------------------------
def test_questions_and_answers_files(tmp_path):
    write_questions(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a/b.jpg", "text": "What?", "category": "c"},
                                           {"question_id": 2, "text": "Text only?"}])
    qs = read_questions(tmp_path / "q.jsonl")
    assert qs[0]["category"] == "c" and image_path(qs[0], tmp_path / "img") == tmp_path / "img" / "a" / "b.jpg"
    assert image_path(qs[1], tmp_path / "img") is None
    # LLaVA's ScienceQA question file: a JSON list in conversation format
    (tmp_path / "sqa.json").write_text(json.dumps([{"id": "7", "image": "7/image.png", "conversations": [
        {"from": "human", "value": "<image>\nWhich is a mammal?\nA. cat\nB. fish"}, {"from": "gpt", "value": "A"}]}]))
    assert read_questions(tmp_path / "sqa.json") == [
        {"question_id": "7", "text": "Which is a mammal?\nA. cat\nB. fish", "image": "7/image.png"}]

    path = write_answers(tmp_path / "answers" / "m.jsonl",
                         [{"question_id": 1, "prompt": "What?", "text": "cat", "question_type": "cell"},
                          {"question_id": 2, "text": "dog", "answer_id": "fixed", "model_id": "other"}], model_id="m")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(lines[0]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]  # LLaVA's order
    assert lines[0]["model_id"] == "m" and lines[0]["metadata"] == {"question_type": "cell"}
    assert len(lines[0]["answer_id"]) == 22 and lines[1]["answer_id"] == "fixed" and lines[1]["model_id"] == "other"
    assert lines[1]["prompt"] == ""
    write_answers(path, [{"question_id": 3, "text": "x"}], model_id="m", append=True)
    assert [a["question_id"] for a in read_answers(path)] == [1, 2, 3]
    # LLaVA's per-chunk answer files, read together
    other = write_answers(tmp_path / "answers" / "1_2.jsonl", [{"question_id": 4, "text": "y"}], model_id="m")
    assert [a["question_id"] for a in read_answers([path, other])] == [1, 2, 3, 4]


def test_exact_benchmark_and_file_errors(tmp_path):
    # LMMModule's predictions.jsonl carries the reference answer: no ground-truth file needed
    preds = [{"question_id": "s1", "question_type": "cell", "text": "none", "answer": "none"},
             {"question_id": "s2", "question_type": "cell", "text": "0", "answer": "none"},
             {"question_id": "s3", "question_type": "count", "text": "Two", "answer": "2"}]
    out = score_benchmark("exact", preds)
    # right: s1, s3 ("Two" ~ "2"); wrong: s2 ("0" is not "none") -> 2/3; cell 1/2, count 1/1
    assert out["acc"] == pytest.approx(2 / 3)
    assert out["acc_cell"] == pytest.approx(0.5) and out["acc_count"] == 1.0
    write_jsonl(tmp_path / "gt.jsonl", [{"question_id": "s1", "answer": "none"}])
    with pytest.raises(ValueError, match="no ground truth"):
        score_benchmark("exact", preds, tmp_path / "gt.jsonl")
    with pytest.raises(ValueError, match="more than once"):
        score_benchmark("exact", [preds[0], preds[0]], tmp_path / "gt.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark"):
        score_benchmark("mmmu", preds, tmp_path / "gt.jsonl")


# -- distributed state --------------------------------------------------------------------------
def merged(cls, first: tuple, second: tuple, **kwargs):
    """Two metric instances (two processes' states) merged the way a sync reduces them."""
    a, b = cls(**kwargs), cls(**kwargs)
    a.update(*first)
    b.update(*second)
    a.merge_state(b)
    return a


def test_states_reduce_by_sum():
    for m in (ExactMatchAccuracy(), TextVQAAccuracy(), VQAv2Accuracy(), POPEMetrics(), ScienceQAAccuracy()):
        assert all(fx.__name__ == "dim_zero_sum" for fx in m._reductions.values()), type(m).__name__
    reductions = MMEScore()._reductions
    assert reductions["q_total"].__name__ == reductions["q_correct"].__name__ == "dim_zero_sum"
    assert reductions["rows"].__name__ == "dim_zero_cat"  # image pairs may be split across processes


def test_merged_states_give_the_combined_result():
    # exact match: 1/2 on one process, 2/2 on the other -> 3/4 together
    m = merged(ExactMatchAccuracy, (["a", "b"], ["a", "x"]), (["c", "d"], ["c", "d"]))
    assert float(m.compute()) == pytest.approx(3 / 4)
    # VQAv2: 0.6 and 0.3 -> mean 0.45; summing the states (manual) gives the same
    first, second = (["2"], [["2"] * 2 + ["3"] * 8]), (["red"], [["red"] + ["blue"] * 9])
    m = merged(VQAv2Accuracy, first, second)
    assert float(m.compute()) == pytest.approx((0.6 + 0.3) / 2)
    a, b = VQAv2Accuracy(), VQAv2Accuracy()
    a.update(*first)
    b.update(*second)
    assert float((a.score + b.score) / (a.total + b.total)) == pytest.approx(0.45)
    # TextVQA: 0.9 and 0.6 -> 0.75
    m = merged(TextVQAAccuracy, (["coca cola"], [["coca cola"] * 3 + ["x"] * 7]), (["12"], [["12"] * 2 + ["x"] * 8]))
    assert float(m.compute()) == pytest.approx(0.75)
    # POPE: the "random" split of the file test halved: TP FN | TN FP -> every ratio 0.5
    m = merged(POPEMetrics, (POPE_PREDS[:2], POPE_LABELS[:2]), (POPE_PREDS[2:4], POPE_LABELS[2:4]))
    assert m.compute() == {"acc": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    # ScienceQA: right + image-right on one, wrong + image-wrong on the other -> 1/2, img 1/2
    m = merged(ScienceQAAccuracy, (["A"], [0], [2], [True]), (["A"], [1], [2], [True]))
    assert m.compute() == {"acc": 0.5, "img_acc": 0.5}
    # MME: the two questions of image "i1" land on different processes (a distributed sampler
    # interleaves them); only together do they show the image fully right (acc+ 100), while
    # image "i2" has one wrong answer (acc 3/4 = 75, acc+ 1/2 = 50 -> score 125)
    first = (["Yes", "Yes"], ["Yes", "Yes"], ["count", "count"], ["i1", "i2"])
    second = (["No", "Yes"], ["No", "No"], ["count", "count"], ["i1", "i2"])
    m = merged(MMEScore, first, second)
    out = m.compute()
    assert out["count/acc"] == pytest.approx(75.0)
    assert out["count/acc_plus"] == pytest.approx(50.0)
    assert out["perception"] == pytest.approx(125.0)
    single = MMEScore()
    single.update(*[f + s for f, s in zip(first, second)])
    assert single.compute() == out


def test_metric_state_moves_and_resets():
    m = MMEScore()
    m.update(["Yes", "No"], ["Yes", "No"], ["color", "color"], ["x", "x"])
    assert m.compute()["color/score"] == pytest.approx(200.0)
    m.reset()
    assert m.compute()["total"] == 0.0
    e = ExactMatchAccuracy().to(torch.device("cpu"))
    e.update(["a"], ["a"])
    assert e.compute().dtype == torch.float64 and float(e.compute()) == 1.0
