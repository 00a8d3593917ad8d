"""Benchmark metrics and evaluation files. Fixtures are written in the real file formats into
tmp_path; every expected number is worked out by hand in the comments (not by calling the code
under test). No Lightning import: fast."""
from __future__ import annotations

import json

import pytest
import torch

from vtc.data.eval_files import image_path, read_answers, read_questions, write_answers, write_questions
from vtc.data.eval_score import score_benchmark
from vtc.metrics.exact_match import ExactMatchAccuracy, TextVQAAccuracy
from vtc.metrics.mme import MMEScore
from vtc.metrics.normalize import normalize_answer, normalize_answer_evalai
from vtc.metrics.pope import POPEMetrics
from vtc.metrics.scienceqa import ScienceQAAccuracy
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
    preds, labels = ["Yes, there is a dog.", "No", "No.", "Yes"], ["yes", "yes", "no", "no"]
    m = merged(POPEMetrics, (preds[:2], labels[:2]), (preds[2:4], labels[2:4]))
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
