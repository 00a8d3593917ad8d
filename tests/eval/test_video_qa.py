"""Video QA files and offline scoring (vtc.data.video_qa, vtc.metrics.mvbench, score_benchmark on
msvd_qa / msrvtt_qa / activitynet_qa / mvbench). Fixtures are small hand-written files in
Video-LLaVA's GPT_Zero_Shot_QA layout and MVBench's json/ layout; every expected value is worked
out by hand in the test (not by calling the code under test). No model, no Lightning: fast."""
from __future__ import annotations

import ast
import json

import pytest

from vtc.data.eval_files import write_answers
from vtc.data.eval_gt import BENCHMARKS, VIDEO_BENCHMARKS, read_gt
from vtc.data.eval_score import score_benchmark
from vtc.data.video_qa import (
    read_mvbench,
    read_video_qa,
    read_video_qa_answers,
    read_video_questions,
    video_path,
    write_video_qa_answers,
)
from vtc.metrics.mvbench import MVBenchAccuracy, check_ans, mvbench_prediction


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


MSVD_Q = [{"video_name": "-4wsuPCjDBc_5_15", "question": "what is the man doing?", "question_id": "v_-4wsuPCjDBc_5_15_0"},
          {"video_name": "-4wsuPCjDBc_5_15", "question": "who is cooking?", "question_id": "v_-4wsuPCjDBc_5_15_1"},
          {"video_name": "0lh_UWF9ZP4_62_69", "question": "what is the color of the car?", "question_id": "v_0lh_UWF9ZP4_62_69_0"}]
MSVD_A = [{"answer": "cook", "question_id": "v_-4wsuPCjDBc_5_15_0"}, {"answer": "man", "question_id": "v_-4wsuPCjDBc_5_15_1"},
          {"answer": "red", "question_id": "v_0lh_UWF9ZP4_62_69_0"}]


@pytest.fixture
def zero_shot(tmp_path):
    """eval/GPT_Zero_Shot_QA with MSVD (answers with ids, shuffled) and ActivityNet (ids, types)."""
    root = tmp_path / "GPT_Zero_Shot_QA"
    _json(root / "MSVD_Zero_Shot_QA/test_q.json", MSVD_Q)
    _json(root / "MSVD_Zero_Shot_QA/test_a.json", [MSVD_A[2], MSVD_A[0], MSVD_A[1]])
    _touch(root / "MSVD_Zero_Shot_QA/videos/-4wsuPCjDBc_5_15.avi")
    (root / "MSVD_Zero_Shot_QA/videos/0lh_UWF9ZP4_62_69").mkdir()  # a folder of frames
    anet_q = [{"video_name": f"vid{i}", "question": q, "question_id": f"vid{i}_{i}"}
              for i, q in enumerate(["is the man running", "what color is the ball", "how many people are there",
                                     "what does he do first"])]
    anet_a = [{"answer": a, "type": t, "question_id": f"vid{i}_{i}"} for i, (a, t) in enumerate([("yes", 3), ("red", 4), ("2", 7), ("jump", 0)])]
    _json(root / "Activitynet_Zero_Shot_QA/test_q.json", anet_q)
    _json(root / "Activitynet_Zero_Shot_QA/test_a.json", anet_a)
    _touch(root / "Activitynet_Zero_Shot_QA/all_test/v_vid0.mp4")
    _touch(root / "Activitynet_Zero_Shot_QA/all_test/v_vid0.mkv")
    return root


# -- open-ended: reading ----------------------------------------------------------------------------------
def test_video_qa_questions_expose_id_video_text_answer(zero_shot):
    qs = read_video_qa(zero_shot / "MSVD_Zero_Shot_QA")  # the folder: test_q.json + test_a.json
    assert [q["question_id"] for q in qs] == [q["question_id"] for q in MSVD_Q]  # question-file order
    assert qs[0] == {"question_id": "v_-4wsuPCjDBc_5_15_0", "video": "-4wsuPCjDBc_5_15", "video_name": "-4wsuPCjDBc_5_15",
                     "text": "what is the man doing?", "answer": "cook"}
    assert [q["answer"] for q in qs] == ["cook", "man", "red"]  # by question_id, though test_a.json is shuffled
    videos = zero_shot / "MSVD_Zero_Shot_QA/videos"
    assert video_path(qs[0], videos) == videos / "-4wsuPCjDBc_5_15.avi"
    assert video_path(qs[2], videos) == videos / "0lh_UWF9ZP4_62_69"  # frames folder
    assert video_path({"video": "nope"}, videos) is None

    anet = read_video_questions("activitynet_qa", zero_shot / "Activitynet_Zero_Shot_QA")
    assert anet[0]["video"] == "v_vid0" and anet[0]["video_name"] == "vid0"  # run_inference_video_qa_act.py's v_
    assert [q["answer_type"] for q in anet] == [3, 4, 7, 0]
    # .mp4 comes before .mkv in Video-LLaVA's search order
    assert video_path(anet[0], zero_shot / "Activitynet_Zero_Shot_QA/all_test").name == "v_vid0.mp4"
    assert video_path(anet[1], zero_shot / "Activitynet_Zero_Shot_QA/all_test") is None


def test_video_qa_answers_pair_by_position_without_ids(tmp_path):
    q = _json(tmp_path / "test_q.json", MSVD_Q)
    a = _json(tmp_path / "test_a.json", [{"answer": "cook"}, {"answer": "man"}, {"answer": "red"}])
    assert [x["answer"] for x in read_video_qa(q, a)] == ["cook", "man", "red"]
    gt = read_gt("msvd_qa", str(a), questions=str(q))
    assert gt["v_0lh_UWF9ZP4_62_69_0"] == {"answer": "red", "question": "what is the color of the car?",
                                            "video": "0lh_UWF9ZP4_62_69"}
    with pytest.raises(ValueError, match="paired by position"):
        read_video_qa(q, _json(tmp_path / "short.json", [{"answer": "cook"}]))
    with pytest.raises(ValueError, match="give the question file"):
        read_gt("msvd_qa", str(a))
    with pytest.raises(ValueError, match="answered twice"):
        read_video_qa(q, [MSVD_A[0], MSVD_A[0], MSVD_A[1]])
    with pytest.raises(ValueError, match="1 questions have no answer"):
        read_video_qa(q, [MSVD_A[0], MSVD_A[1], {**MSVD_A[1], "question_id": "other"}])
    with pytest.raises(ValueError, match="video_name"):
        read_video_qa([{"question": "q", "question_id": 1}])


# -- open-ended: Video-LLaVA's answers file ---------------------------------------------------------------
def test_video_qa_answers_file_is_video_llavas_layout(tmp_path):
    path = write_video_qa_answers(tmp_path / "merge.jsonl", [
        {"id": "v_-4wsuPCjDBc_5_15_0", "question": "what is the man doing?", "answer": "cook", "pred": "Cooking."},
        # LLaVA-style record: question_id, and the prediction as text
        {"question_id": 7, "question": "is it a café?", "answer": "yes", "text": 'He said "yes"'},
    ])
    # json.dumps of {"id", "question", "answer", "pred"} per line, as run_inference_video_qa.py writes
    assert path.read_text() == (
        '{"id": "v_-4wsuPCjDBc_5_15_0", "question": "what is the man doing?", "answer": "cook", "pred": "Cooking."}\n'
        '{"id": "7", "question": "is it a caf\\u00e9?", "answer": "yes", "pred": "He said \\"yes\\""}\n')
    # What eval_video_qa.py does with it: eval() each line (literal_eval here), file names "<id>.json",
    # then prediction_set[file[:-5]] -- the id must be a string for that lookup to work.
    lines = path.read_text().splitlines()
    contents = [ast.literal_eval(line.strip()) for line in lines]
    assert contents == [json.loads(line) for line in lines]
    prediction_set = {s["id"]: {"q": s["question"], "a": s["answer"], "pred": s["pred"]} for s in contents}
    caption_files = [f"{s['id']}.json" for s in contents]
    assert [prediction_set[f[:-5]]["pred"] for f in caption_files] == ["Cooking.", 'He said "yes"']
    assert prediction_set["7"]["q"] == "is it a café?"

    # appending (chunk files concatenated into merge.jsonl)
    write_video_qa_answers(path, [{"id": "x", "question": "q", "answer": "a", "pred": "p"}], append=True)
    assert path.read_text().splitlines()[-1] == '{"id": "x", "question": "q", "answer": "a", "pred": "p"}'
    assert read_video_qa_answers(path)[0] == {"question_id": "v_-4wsuPCjDBc_5_15_0", "text": "Cooking.",
                                              "answer": "cook", "question": "what is the man doing?"}
    for bad in ({"id": "1", "question": "q", "answer": "a"},  # no pred
                {"id": "1", "question": "q", "answer": None, "pred": "p"},
                {"id": True, "question": "q", "answer": "a", "pred": "p"}):
        with pytest.raises(ValueError):
            write_video_qa_answers(tmp_path / "bad.jsonl", [bad])
    assert not (tmp_path / "bad.jsonl").exists()


# -- open-ended: offline exact match ----------------------------------------------------------------------
# (prediction, reference, right?) worked out by hand with the VQA normalisation: lower-case, punctuation
# and articles removed, number words as digits.
EXACT_CASES = [
    ("Cooking.", "cooking", True),            # final period dropped, case folded
    ("The man", "man", True),                 # article dropped
    ("a dog!", "dog", True),                  # "!" and article
    ("two", "2", True),                       # number word
    ("T-shirt", "t shirt", True),             # hyphen -> space
    ("man's", "man", False),                  # the apostrophe is kept
    ("The man is cooking.", "cooking", False),  # a sentence is not the answer
    ("yes, it is", "yes", False),
    ("", "dog", False),
    ("an apple", "apple", True),
]


def test_open_ended_exact_match_from_the_answers_file_alone(tmp_path):
    recs = [{"id": f"q{i}", "question": "?", "answer": ref, "pred": pred} for i, (pred, ref, _) in enumerate(EXACT_CASES)]
    path = write_video_qa_answers(tmp_path / "merge.jsonl", recs)
    right = sum(ok for _, _, ok in EXACT_CASES)  # 6 of 10
    assert right == 6
    for name in ("msvd_qa", "msrvtt_qa"):
        assert score_benchmark(name, str(path)) == {"acc": pytest.approx(0.6), "n": 10.0}
    with pytest.raises(ValueError, match="more than once"):
        score_benchmark("msvd_qa", recs + recs[:1])


def test_open_ended_scored_against_the_dataset_folder(zero_shot, tmp_path):
    # MSVD: 2 of 3 questions answered (one right, one wrong); answers in LLaVA's format this time.
    answers = write_answers(tmp_path / "a.jsonl", [{"question_id": "v_-4wsuPCjDBc_5_15_0", "text": "Cook."},
                                                    {"question_id": "v_0lh_UWF9ZP4_62_69_0", "text": "blue"}], model_id="m")
    out = score_benchmark("msvd_qa", str(answers), str(zero_shot / "MSVD_Zero_Shot_QA"))
    assert out == {"acc": 0.5, "n": 2.0, "n_missing": 1.0}
    with pytest.raises(ValueError, match="no ground truth"):
        score_benchmark("msvd_qa", [{"question_id": "unknown", "text": "x"}], str(zero_shot / "MSVD_Zero_Shot_QA"))

    # ActivityNet: types 3 (yes_no), 4 (color), 7 (number), 0 (motion); right: yes, "two" == "2"; wrong: blue, run.
    preds = {"vid0_0": "Yes.", "vid1_1": "blue", "vid2_2": "two", "vid3_3": "run"}
    out = score_benchmark("activitynet_qa", [{"question_id": k, "text": v} for k, v in preds.items()],
                          str(zero_shot / "Activitynet_Zero_Shot_QA"))
    assert out == {"acc": 0.5, "acc_color": 0.0, "acc_free": pytest.approx(2 / 3), "acc_motion": 0.0,
                   "acc_number": 1.0, "acc_yes_no": 1.0, "n": 4.0, "n_missing": 0.0}


# -- MVBench ----------------------------------------------------------------------------------------------
@pytest.fixture
def mvbench_json(tmp_path):
    root = tmp_path / "MVBench/json"
    _json(root / "action_sequence.json", [
        {"video": "ZS9XR.mp4", "question": "What happened after the person took the food?",
         "candidates": ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle."],
         "answer": "Tidied up the blanket.", "start": 11.1, "end": 19.6},
        {"video": "A1B2C.mp4", "question": "What did the person do first?", "candidates": ["Sat down.", "Stood up."],
         "answer": "Sat down.", "start": 0.0, "end": 5.5},
    ])
    _json(root / "fine_grained_action.json", [
        {"video": "x/clip.mp4", "question": "What is the action?", "candidates": ["run", "walk", "run"], "answer": "run"},
        {"video": "y/clip.mp4", "question": "What is the action?", "candidates": ["swim", "dive"], "answer": "dive"},
    ])
    _json(root / "episodic_reasoning.json", [
        {"video": "s01e02_seg02_clip_00", "question": "Why?", "candidates": ["a", "b", "c", "d"], "answer": "d",
         "start": 1.0, "end": 9.0},
    ])
    (root / "readme.md").write_text("not a task")
    return root


def test_mvbench_questions_follow_the_notebooks_template(mvbench_json):
    qs = read_mvbench(mvbench_json)
    # MVBENCH_TASKS order (the notebook's data_list): action_sequence, fine_grained_action, episodic_reasoning
    assert [q["question_id"] for q in qs] == ["action_sequence/0", "action_sequence/1", "fine_grained_action/0",
                                             "fine_grained_action/1", "episodic_reasoning/0"]
    q = qs[0]
    assert q["text"] == ("Question: What happened after the person took the food?\nOptions:\n(A) Ate the medicine.\n"
                         "(B) Tidied up the blanket.\n(C) Put down the cup/glass/bottle.")
    assert q["gt"] == "(B) Tidied up the blanket." and q["answer_letter"] == "B" and q["answer"] == "Tidied up the blanket."
    assert q["options"] == ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle."]
    assert q["video"] == "star/Charades_v1_480/ZS9XR.mp4" and q["bound"] == [11.1, 19.6] and q["data_type"] == "video"
    assert q["task"] == "action_sequence" and q["task_type"] == "Action Sequence"
    assert qs[2]["gt"] == "(C) run"  # a repeated candidate: the notebook's loop keeps the last match
    assert qs[2]["video"] == "Moments_in_Time_Raw/videos/x/clip.mp4" and qs[2]["bound"] is None
    assert qs[4]["data_type"] == "frame" and qs[4]["video"] == "tvqa/frames_fps3_hq/s01e02_seg02_clip_00"
    assert [x["question_id"] for x in read_mvbench(mvbench_json / "fine_grained_action.json")] == \
        ["fine_grained_action/0", "fine_grained_action/1"]
    assert len(read_mvbench(mvbench_json, tasks=["episodic_reasoning"])) == 1

    with pytest.raises(ValueError, match="none of the candidates"):
        read_mvbench(_json(mvbench_json.parent / "bad/action_count.json",
                           [{"video": "v.mp4", "question": "?", "candidates": ["1", "2"], "answer": "3"}]))
    with pytest.raises(ValueError, match="unknown MVBench task"):
        read_mvbench(_json(mvbench_json.parent / "other/foo.json", []))
    with pytest.raises(ValueError, match="none of MVBench's task files"):
        read_mvbench(mvbench_json.parent / "other")
    with pytest.raises(ValueError, match="no such MVBench task file"):
        read_mvbench(mvbench_json, tasks=["state_change"])


# check_ans(pred, "(B) cat") by hand: first word (split on " ") lower-cased; right when it, periods
# removed, is inside "(b)", or "(b)" is inside it.
CHECK_ANS = [
    ("(B) cat", True), ("(b)", True), ("B.", True), ("B", True), ("b)", True), ("(B)cat", True), ("B. cat", True),
    ("The answer is B", False),  # first word "the"
    ("Option B", False), ("cat", False), ("(A) dog", False), ("B,", False), ("C", False),
    ("", True), ("(", True), (")", True), ("(b", True),  # MVBench's quirks: a substring of "(b)"
]


@pytest.mark.parametrize("pred, right", CHECK_ANS)
def test_check_ans_is_mvbenchs(pred, right):
    assert check_ans(pred, "(B) cat") is right


def test_mvbench_prediction_is_first_line_after_return_prompt():
    assert mvbench_prediction("  B) cat\nbecause ...", "(") == "(B) cat"
    assert mvbench_prediction(" B", "") == "B"
    assert mvbench_prediction("", "(") == "("


def test_mvbench_accuracy_rules():
    preds = ["(B) cat", "B.", "The answer is B", "cat", "", "(A) dog"]
    gts = ["(B) cat"] * 6
    m = MVBenchAccuracy()
    m.update(preds, gts)
    # mvbench: right "(B) cat", "B.", "" (quirk) -> 3/6; no letter in "cat" and ""
    assert float(m.compute()) == pytest.approx(3 / 6) and int(m.no_letter) == 2
    m = MVBenchAccuracy(rule="letter")
    m.update(preds, gts)  # letter: right "(B) cat", "B.", "The answer is B" -> 3/6
    assert float(m.compute()) == pytest.approx(3 / 6)
    m = MVBenchAccuracy(rule="letter")
    m.update(["The answer is B", "", "cat"], ["(B) cat"] * 3)
    assert float(m.compute()) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="rule"):
        MVBenchAccuracy(rule="gpt")
    with pytest.raises(ValueError, match=r"start with '\(X\)'"):
        MVBenchAccuracy().update(["B"], ["B cat"])


def test_mvbench_scored_per_task_and_overall(mvbench_json, tmp_path):
    # gts: action_sequence (B), (A); fine_grained_action (C), (B); episodic_reasoning (D) -- unanswered.
    texts = {"action_sequence/0": "(B) Tidied up the blanket.",  # right under both rules
             "action_sequence/1": "The answer is A",              # mvbench: wrong ("the"); letter: right
             "fine_grained_action/0": "",                         # mvbench: right (quirk); letter: wrong
             "fine_grained_action/1": "dive"}                     # no letter: wrong under both
    path = write_answers(tmp_path / "mvbench.jsonl", [{"question_id": k, "text": v} for k, v in texts.items()], model_id="m")
    out = score_benchmark("mvbench", str(path), str(mvbench_json))
    assert out == {"acc": 0.5, "acc_action_sequence": 0.5, "acc_fine_grained_action": 0.5,
                   "n": 4.0, "n_missing": 1.0, "n_no_letter": 2.0}
    out = score_benchmark("mvbench", str(path), str(mvbench_json), rule="letter")
    assert out["acc"] == 0.5 and out["acc_action_sequence"] == 1.0 and out["acc_fine_grained_action"] == 0.0

    # Answers generated after the pre-filled "Best option:(": the "(" goes back in front.
    texts = {"action_sequence/0": "B) Tidied up the blanket.", "action_sequence/1": "B) Stood up.",
             "fine_grained_action/0": "C) run\nBecause the person runs.", "fine_grained_action/1": "B) dive",
             "episodic_reasoning/0": "D) d"}
    out = score_benchmark("mvbench", [{"question_id": k, "text": v} for k, v in texts.items()], str(mvbench_json),
                          return_prompt="(")
    assert out == {"acc": 0.8, "acc_action_sequence": 0.5, "acc_episodic_reasoning": 1.0, "acc_fine_grained_action": 1.0,
                   "n": 5.0, "n_missing": 0.0, "n_no_letter": 0.0}
    with pytest.raises(ValueError, match="ground truth needed"):
        score_benchmark("mvbench", str(path))


def test_video_benchmarks_are_listed_apart_from_the_image_ones():
    """The video names (run by vtc/eval/video_bench.py) are a list of their own beside the image
    BENCHMARKS; score_benchmark knows both."""
    assert set(VIDEO_BENCHMARKS) == {"msvd_qa", "msrvtt_qa", "activitynet_qa", "mvbench"}
    assert not set(VIDEO_BENCHMARKS) & set(BENCHMARKS)
    with pytest.raises(ValueError, match="mvbench"):
        score_benchmark("nope", [])
