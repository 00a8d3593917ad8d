"""MMBench(-CN) with CircularEval, VizWiz, SEED-Bench, MM-Vet, LLaVA-Bench and the VQAv2 test-dev
submission: files in the release formats written to tmp_path, every expected score worked out by
hand in the comments (not by calling the code under test), and eval.py end to end on a tiny
checkpoint for MMBench (circular) and MM-Vet (answers only)."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.test_eval_benchmarks import _img, bench_ws  # noqa: F401  (bench_ws: a fixture)
from vtc.data.eval_lmm import load_benchmark_questions, read_vizwiz_questions, write_submission
from vtc.data.eval_score import score_benchmark
from vtc.data.mmbench import mmbench_questions
from vtc.metrics.mmbench import infer_choice

LETTER = "Answer with the option's letter from the given choices directly."
COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "source", "comment", "image"]


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _png_b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tsv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(COLS)
        for r in rows:
            w.writerow([r.get(c, "") for c in COLS])
    return path


# Three questions with 4, 3 and 2 options (an empty cell, "nan" and pandas' NA string "None" end the
# list, as LLaVA reads the TSV with pandas); the second one's hint is "nan" (absent).
MMB_ROWS = [
    {"index": 0, "question": "What colour is it?", "hint": "A hint.", "A": "red", "B": "green", "C": "blue",
     "D": "yellow", "answer": "C", "category": "colour", "l2-category": "attribute_reasoning", "source": "s", "comment": "c"},
    {"index": 1, "question": "How many?", "hint": "nan", "A": "one", "B": "two", "C": "three", "D": "",
     "answer": "A", "category": "count", "l2-category": "logic_reasoning"},
    {"index": 2, "question": "Which animal?", "A": "cat", "B": "dog", "C": "None", "D": "nan",
     "answer": "B", "category": "animal", "l2-category": "logic_reasoning"},
]


def _mmb_tsv(path: Path, rows=MMB_ROWS) -> Path:
    return _tsv(path, [{**r, "image": _png_b64((40 * i, 90, 200))} for i, r in enumerate(rows)])


def _mmb_answers(path: Path, passes, texts) -> Path:
    """LLaVA's model_vqa_mmbench.py records for the given passes and answer texts."""
    return _jsonl(path, [{"question_id": p["question_id"], "round_id": p["round_id"], "prompt": p["text"], "text": t,
                          "options": p["options"], "option_char": p["option_char"], "answer_id": str(i),
                          "model_id": "m", "metadata": {}} for i, (p, t) in enumerate(zip(passes, texts))])


def test_mmbench_prompts_rotate_over_the_options_each_question_has(tmp_path):
    tsv = _mmb_tsv(tmp_path / "mmb.tsv")
    passes = mmbench_questions(tsv)  # no copies in the file: every rotation asked (LLaVA's --all-rounds)
    assert [(p["question_id"], p["round_id"]) for p in passes] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                                    (2, 0), (2, 1)]
    # hint + question + "A. ..." lines (model_vqa_mmbench.py); round 1 shifts the options left by one
    assert passes[0]["text"] == "A hint.\nWhat colour is it?\nA. red\nB. green\nC. blue\nD. yellow"
    assert passes[1]["text"] == "A hint.\nWhat colour is it?\nA. green\nB. blue\nC. yellow\nD. red"
    assert passes[1]["option_char"] == ["B", "C", "D", "A"]
    assert passes[6]["text"] == "How many?\nA. three\nB. one\nC. two" and passes[6]["option_char"] == ["C", "A", "B"]
    assert passes[8]["options"] == ["dog", "cat"]
    assert Image.open(io.BytesIO(base64.b64decode(passes[0]["image_base64"]))).size == (24, 16)
    assert len(mmbench_questions(tsv, all_rounds=False)) == 3
    assert [p["question_id"] for p in mmbench_questions(tsv, limit=2)] == [0] * 4 + [1] * 3
    # A file that holds the circular copies (index + 1e6) is asked as it is.
    copies = _mmb_tsv(tmp_path / "copies.tsv", MMB_ROWS[:1] + [{**MMB_ROWS[0], "index": 1000000, "A": "green",
                                                                "B": "blue", "C": "yellow", "D": "red", "answer": "B"}])
    assert [p["question_id"] for p in mmbench_questions(copies)] == [0, 1000000]


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(C) three", "C"), ("The answer is A", "A"),  # a letter among the last four words
    ("A or B", None),  # two letters, and "a or b" names no option text
    ("A cat is on the mat", None),  # "A" is the first of six words; the text is over 2x the options' length
    ("the dog", "A"),  # no letter: the one option text it contains
    ("Z", "Z"), ("Sorry, I can't help with images of people yet.", "Z"),
])
def test_option_extraction_follows_vlmevalkit(text, expected):
    assert infer_choice(text, {"A": "dog", "B": "cat", "C": "fox"}) == expected


def test_mmbench_circular_accuracy_by_hand(tmp_path):
    tsv = _mmb_tsv(tmp_path / "mmb.tsv")
    passes = mmbench_questions(tsv)
    texts = [
        # q0 (answer C = blue): right letters per round C, B, A, D -> all right, "blue" by its text
        "C", "B.", "The answer is A", "blue",
        # q1 (answer A = one): rounds show [one two three], [two three one], [three one two] -> A, C, B; the last is wrong
        "A", "C", "A",
        # q2 (answer B = dog): round 0 unresolved ("a" is no letter, the text is too long to match), round 1 right (A)
        "I think it is a dog", "A",
    ]
    scores = score_benchmark("mmbench", _mmb_answers(tmp_path / "a.jsonl", passes, texts), str(tsv))
    # circular: only q0 -> 1/3; first passes: q0 and q1 right -> 2/3
    assert scores["acc"] == pytest.approx(1 / 3) and scores["acc_first"] == pytest.approx(2 / 3)
    assert scores["acc_colour"] == 1.0 and scores["acc_count"] == 0.0 and scores["acc_animal"] == 0.0
    assert scores["acc_l2_attribute_reasoning"] == 1.0 and scores["acc_l2_logic_reasoning"] == 0.0
    assert (scores["n"], scores["n_passes"], scores["n_unresolved"], scores["n_missing"]) == (3, 9, 1, 0)
    # Without q2's answers: 1 of 2 questions, one missing.
    part = score_benchmark("mmbench_cn", _mmb_answers(tmp_path / "b.jsonl", passes[:7], texts[:7]), str(tsv))
    assert part["acc"] == 0.5 and part["n"] == 2 and part["n_missing"] == 1
    with pytest.raises(ValueError, match="more than once"):
        score_benchmark("mmbench", _mmb_answers(tmp_path / "c.jsonl", passes[:1] * 2, ["C", "C"]), str(tsv))


def test_mmbench_circular_copies_in_the_file_form_one_question(tmp_path):
    rows = [MMB_ROWS[0], {**MMB_ROWS[0], "index": 1000000, "A": "green", "B": "blue", "C": "yellow", "D": "red",
                          "answer": "B", "image": "0"}]  # VLMEvalKit stores a copy's image as its row's index
    tsv = _tsv(tmp_path / "copies.tsv", [{**rows[0], "image": _png_b64((1, 2, 3))}, rows[1]])
    passes = mmbench_questions(tsv)
    assert passes[1]["image_base64"] == passes[0]["image_base64"]
    right = score_benchmark("mmbench", _mmb_answers(tmp_path / "r.jsonl", passes, ["C", "B"]), str(tsv))
    wrong = score_benchmark("mmbench", _mmb_answers(tmp_path / "w.jsonl", passes, ["C", "C"]), str(tsv))
    assert (right["acc"], right["n"], right["n_passes"]) == (1.0, 1, 2)
    assert (wrong["acc"], wrong["acc_first"]) == (0.0, 1.0)  # the copy's answer is B: "C" misses it


def test_mmbench_submission_table(tmp_path):
    tsv = _mmb_tsv(tmp_path / "mmb.tsv")
    passes = mmbench_questions(tsv)
    ans = _mmb_answers(tmp_path / "a.jsonl", passes[:5], ["C", "x", "y", "z", "A"])
    out = write_submission({"name": "mmbench", "questions": str(tsv), "gt": str(tsv)}, ans, passes)
    rows = list(csv.reader(open(out, encoding="utf-8"), delimiter="\t"))
    # convert_mmbench_for_submission.py: hint, category, source, image, comment, l2-category dropped;
    # prediction inserted as the 7th column; round 0's answer; NA cells empty
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer"]
    assert rows[1] == ["0", "What colour is it?", "red", "green", "blue", "yellow", "C", "C"]
    assert rows[2][6] == "A" and rows[3] == ["2", "Which animal?", "cat", "dog", "", "", "", "B"]


VIZWIZ = [  # image, answers, answer_type, answerable, the model's answer, its score (worked out below)
    ("VizWiz_val_00000000.jpg", ["coca cola"] * 4 + ["coke"] * 6, "other", 1, "Coca-Cola.", 1.0),
    ("VizWiz_val_00000001.jpg", ["unanswerable"] * 9 + ["blue"], "unanswerable", 0, "Unanswerable", 1.0),
    ("VizWiz_val_00000002.jpg", ["Yes"] * 5 + ["yes"] * 2 + ["no"] * 3, "yes/no", 1, "yes", 0.6),
    ("VizWiz_val_00000003.jpg", ["red"] * 10, "other", 1, "Unanswerable", 0.0),
]
VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."


def _vizwiz(tmp_path):
    gt = _json(tmp_path / "val.json", [{"image": im, "question": f"q{i}?", "answers": [{"answer": a, "answer_confidence": "yes"}
               for a in ans], "answer_type": t, "answerable": ok} for i, (im, ans, t, ok, _, _) in enumerate(VIZWIZ)])
    qs = _jsonl(tmp_path / "llava_val.jsonl", [{"question_id": 10 + i, "image": v[0], "text": f"q{i}?\n{VIZWIZ_SUFFIX}"}
                                               for i, v in enumerate(VIZWIZ)])
    ans = _jsonl(tmp_path / "a.jsonl", [{"question_id": 10 + i, "prompt": "", "text": v[4]} for i, v in enumerate(VIZWIZ)])
    return gt, qs, ans


def test_vizwiz_accuracy_and_unanswerable_by_hand(tmp_path):
    gt, qs, ans = _vizwiz(tmp_path)
    scores = score_benchmark("vizwiz", ans, str(gt), questions=str(qs))
    # "Coca-Cola." -> "coca cola" (hyphen -> space, period dropped): 4 of 10 annotators -> 1.0;
    # "Unanswerable" -> "unanswerable": 9 -> 1.0; "yes" meets only the 2 lower-case "yes" (the
    # annotations are compared unprocessed): (2 * 1/3 + 8 * 2/3) / 10 = 0.6; "unanswerable" vs "red": 0.
    assert scores["acc"] == pytest.approx((1 + 1 + 0.6 + 0) / 4)
    assert scores["acc_other"] == pytest.approx(0.5) and scores["acc_unanswerable"] == 1.0
    assert scores["acc_yes_no"] == pytest.approx(0.6) and scores["n"] == 4 and scores["n_missing"] == 0
    # "unanswerable" said for images 1 and 3, true for image 1 only: P = 1/2, R = 1, F1 = 2/3
    assert scores["unanswerable_precision"] == 0.5 and scores["unanswerable_recall"] == 1.0
    assert scores["unanswerable_f1"] == pytest.approx(2 / 3)
    # VizWiz's own val.json as the question file: question ids are the image stems.
    own = read_vizwiz_questions(gt)
    assert own[0] == {"question_id": "VizWiz_val_00000000", "image": VIZWIZ[0][0], "text": "q0?"}
    ans2 = _jsonl(tmp_path / "a2.jsonl", [{"question_id": q["question_id"], "text": v[4]} for q, v in zip(own, VIZWIZ)])
    assert score_benchmark("vizwiz", ans2, str(gt), questions=str(gt))["acc"] == pytest.approx(0.65)


def test_vizwiz_and_vqav2_submissions(tmp_path, caplog):
    gt, qs, ans = _vizwiz(tmp_path)
    spec = {"name": "vizwiz", "questions": str(qs), "gt": None}
    out = json.loads(write_submission(spec, ans, read_vizwiz_questions(qs)).read_text())
    assert out == [{"image": VIZWIZ[0][0], "answer": "coca cola"}, {"image": VIZWIZ[1][0], "answer": "unanswerable"},
                   {"image": VIZWIZ[2][0], "answer": "yes"}, {"image": VIZWIZ[3][0], "answer": "unanswerable"}]
    assert write_submission({**spec, "gt": str(gt)}, ans, []) is None  # val: scored here, nothing to upload
    # VQAv2: the whole test2015 list, "" where test-dev asked nothing, EvalAI-processed answers.
    root = tmp_path / "vqav2"
    _jsonl(root / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": i, "text": "q"} for i in (1, 2, 3, 4)])
    dev = [{"question_id": 2, "text": "q"}, {"question_id": 4, "text": "q"}]
    _jsonl(root / "dev.jsonl", dev)
    va = _jsonl(root / "a.jsonl", [{"question_id": 2, "text": "Two dogs."}, {"question_id": 4, "text": "Yes"}])
    sub = write_submission({"name": "vqav2", "questions": str(root / "dev.jsonl"), "gt": None}, va, dev)
    assert sub.name == "a_submission.json"
    assert json.loads(sub.read_text()) == [{"question_id": 1, "answer": ""}, {"question_id": 2, "answer": "2 dogs"},
                                           {"question_id": 3, "answer": ""}, {"question_id": 4, "answer": "yes"}]
    (root / "llava_vqav2_mscoco_test2015.jsonl").unlink()
    sub = write_submission({"name": "vqav2", "questions": str(root / "dev.jsonl"), "gt": None}, va, dev)
    assert [r["question_id"] for r in json.loads(sub.read_text())] == [2, 4] and "submission_questions" in caplog.text


def _seed(tmp_path):
    gt = {"question_type": {"Scene Understanding": 1, "Instances Counting": 2},
          "questions": [{"question_id": "101", "answer": "A", "question_type_id": 1, "data_type": "image"},
                        {"question_id": "102", "answer": "B", "question_type_id": 2, "data_type": "image"},
                        {"question_id": "103", "answer": "C", "question_type_id": 2, "data_type": "image"},
                        {"question_id": "104", "answer": "D", "question_type_id": 1, "data_type": "video"}]}
    gt = _json(tmp_path / "SEED-Bench.json", gt)
    folder = {"104": "SEED-Bench-video-image"}
    qs = _jsonl(tmp_path / "q.jsonl", [{"question_id": q, "image": f"{folder.get(q, 'SEED-Bench-image')}/{q}.jpg",
                                   "text": f"Q?\nA. a\nB. b\nC. c\nD. d\n{LETTER}"} for q in ("101", "102", "103", "104")])
    return gt, qs


def test_seed_bench_image_questions_scored_by_hand(tmp_path):
    gt, qs = _seed(tmp_path)
    spec = {"name": "seed_bench", "questions": str(qs), "gt": str(gt), "options": {"data_type": "image"}}
    assert [q["question_id"] for q in load_benchmark_questions(spec)] == ["101", "102", "103"]
    assert [q["question_id"] for q in load_benchmark_questions({**spec, "gt": None})] == ["101", "102", "103"]
    ans = _jsonl(tmp_path / "a.jsonl", [{"question_id": q, "text": t} for q, t in (("101", "A"), ("102", "B."), ("103", "D"))])
    # LLaVA: text == answer -> only 101; per type: Scene 1/1, Counting 0/2
    s = score_benchmark("seed_bench", ans, str(gt), data_type="image")
    assert s["acc"] == pytest.approx(1 / 3) and s["acc_Scene_Understanding"] == 1.0 and s["acc_Instances_Counting"] == 0.0
    assert s["n"] == 3 and s["n_missing"] == 0  # the video question is not in the image benchmark
    # rule=letter reads "B." as B: 2/3, Counting 1/2
    s = score_benchmark("seed_bench", ans, str(gt), rule="letter")
    assert s["acc"] == pytest.approx(2 / 3) and s["acc_Instances_Counting"] == 0.5
    lines = [json.loads(x) for x in write_submission(spec, ans, load_benchmark_questions(spec)).read_text().splitlines()]
    assert lines == [{"question_id": "101", "prediction": "A"}, {"question_id": "102", "prediction": "B."},
                     {"question_id": "103", "prediction": "D"}]


def test_mmvet_results_and_judged_benchmarks_are_not_scored(tmp_path):
    ans = _jsonl(tmp_path / "mmvet.jsonl", [{"question_id": 0, "text": "A dog."}, {"question_id": 7, "text": "Two"}])
    out = write_submission({"name": "mmvet", "questions": "q", "gt": None}, ans, [])
    assert out.name == "mmvet_results.json" and json.loads(out.read_text()) == {"v1_0": "A dog.", "v1_7": "Two"}
    assert out.read_text().startswith('{\n  "v1_0"')  # convert_mmvet_for_eval.py: indent=2
    for name in ("mmvet", "llavabench"):
        with pytest.raises(ValueError, match="GPT-4 judge"):
            score_benchmark(name, str(tmp_path / "mmvet.jsonl"), None)


def test_benchmark_configs_compose_and_check_their_keys(tmp_path):
    from hydra import compose, initialize_config_dir

    import vtc.config  # noqa: F401  (resolvers)
    from tests.conftest import ROOT
    from vtc.errors import ConfigError
    from vtc.eval.bench import benchmark_spec

    def spec(*overrides):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            return benchmark_spec(compose("eval", overrides=["ckpt_path=x", f"paths.output_dir={tmp_path}", *overrides]))

    _mmb_tsv(tmp_path / "mmbench_cn/mmbench_dev_cn_20231003.tsv")
    s = spec("benchmark=mmbench_cn", f"benchmark.root={tmp_path}")  # no image folder: images are in the TSV
    assert s["gt"] == s["questions"] and s["prompt_suffix"] == "请直接回答选项字母。" and s["all_rounds"] is None
    with pytest.raises(ConfigError, match="benchmark.all_rounds"):
        spec("benchmark=mmbench_cn", f"benchmark.root={tmp_path}", "benchmark.all_rounds=sometimes")
    test_split = _tsv(tmp_path / "test.tsv", [])  # no answer column: the server scores it
    test_split.write_text("\t".join(c for c in COLS if c != "answer") + "\n")
    with pytest.raises(ConfigError, match="benchmark.gt.*no 'answer' column"):
        spec("benchmark=mmbench", f"benchmark.questions={test_split}")
    assert spec("benchmark=mmbench", f"benchmark.questions={test_split}", "benchmark.gt=null")["gt"] is None
    with pytest.raises(ConfigError, match="benchmark.questions"):
        spec("benchmark=seed_bench", f"benchmark.root={tmp_path}")
    _jsonl(tmp_path / "vizwiz/llava_test.jsonl", [])
    (tmp_path / "vizwiz/test").mkdir()
    assert spec("benchmark=vizwiz", f"benchmark.root={tmp_path}")["prompt_suffix"] == VIZWIZ_SUFFIX
    _jsonl(tmp_path / "mm-vet/llava-mm-vet.jsonl", [])
    (tmp_path / "mm-vet/images").mkdir()
    assert spec("benchmark=mmvet", f"benchmark.root={tmp_path}")["max_new_tokens"] == 1024


# -- eval.py end to end -----------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_mmbench_circular_and_mmvet_answers_only(bench_ws, tmp_path):  # noqa: F811
    root = bench_ws["eval_root"]
    _mmb_tsv(root / "mmbench/mmbench_dev_20230712.tsv")
    _jsonl(root / "mm-vet/llava-mm-vet.jsonl", [{"question_id": i, "image": f"v1_{i}.png", "text": "What is shown?"}
                                                for i in range(2)])
    for i in range(2):
        _img(root / f"mm-vet/images/v1_{i}.png", (30, 40))
    bench_ws["run"]("eval.py", "-m", f"ckpt_path={bench_ws['ckpt']}", "benchmark=mmbench,mmvet", f"benchmark.root={root}",
                    "benchmark.num_workers=0", "max_new_tokens=6", "eval_batch_size=4", tiny=False)
    client = bench_ws["client"]
    exp = client.get_experiment_by_name("eval")
    runs = {r.data.params.get("benchmark.name"): r for r in client.search_runs([exp.experiment_id], max_results=200)
            if r.data.params.get("benchmark.name") in ("mmbench", "mmvet")}
    mmb, mmvet = runs["mmbench"], runs["mmvet"]
    path = Path(client.download_artifacts(mmb.info.run_id, "answers/mmbench.jsonl", str(tmp_path)))
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    # 4 + 3 + 2 passes in LLaVA's model_vqa_mmbench.py format, the prompt without the answer-format line
    assert [list(r) for r in rows[:1]] == [["question_id", "round_id", "prompt", "text", "options", "option_char",
                                           "answer_id", "model_id", "metadata"]]
    assert [(r["question_id"], r["round_id"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2),
                                                                  (2, 0), (2, 1)]
    assert rows[1]["prompt"] == "A hint.\nWhat colour is it?\nA. green\nB. blue\nC. yellow\nD. red"
    expected = score_benchmark("mmbench", str(path), str(root / "mmbench/mmbench_dev_20230712.tsv"))
    logged = {k.split("/", 1)[1]: v for k, v in mmb.data.metrics.items() if k.startswith("mmbench/")}
    assert logged == pytest.approx(expected) and logged["n"] == 3 and logged["n_passes"] == 9
    assert logged["acc"] <= logged["acc_first"]  # a circular hit needs the first pass right too
    arts = {a.path for a in client.list_artifacts(mmb.info.run_id, "answers")}
    assert arts == {"answers/mmbench.jsonl", "answers/mmbench_submission.tsv"}
    # MM-Vet: answers only, no mmvet/* metric, the grader's JSON beside the answers
    assert not [k for k in mmvet.data.metrics if k.startswith("mmvet/")] and mmvet.data.metrics["cost/kv_bytes"] > 0
    res = json.loads(Path(client.download_artifacts(mmvet.info.run_id, "answers/mmvet_results.json", str(tmp_path))).read_text())
    assert set(res) == {"v1_0", "v1_1"} and all(isinstance(v, str) for v in res.values())
