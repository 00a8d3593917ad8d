"""vtc.synthetic.error_analysis against hand-counted answers on two 3x3 boards (no model, no training)."""
import io
import json
import tarfile

import pytest

from vtc.synthetic.error_analysis import analyse, load_boards, main

E = -1
BOARDS = {
    # row 1 = [1, 2, 3], column 1 = [1, 4, 7]
    "q0": [[1, 2, 3], [4, 5, 6], [7, 8, E]],
    # row 2 = [9, E, 9], column 3 = [2, 9, 2]
    "q1": [[1, 1, 2], [9, E, 9], [3, 4, 2]],
}
QUESTIONS = {"q0": "<image>\nWhat digit is in row 1, column 1?", "q1": "<image>\nWhat digit is in row 2, column 3?"}


def write_split(tmp_path):
    d = tmp_path / "test"
    d.mkdir()
    with tarfile.open(d / "test-00000.tar", "w") as tar:
        for qid, grid in BOARDS.items():
            rec = {"id": qid, "conversations": [{"from": "human", "value": QUESTIONS[qid]}, {"from": "gpt", "value": "x"}],
                   "question_type": "cell", "grid": grid}
            for name, data in ((f"{qid}.jpg", b"not decoded"), (f"{qid}.json", json.dumps(rec).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (d / "index.json").write_text(json.dumps({"shards": [{"path": "test-00000.tar", "n": len(BOARDS)}]}))
    return d


def test_localisation_shares_match_hand_counts(tmp_path):
    boards = load_boards(write_split(tmp_path))
    assert boards["q1"]["grid"] == BOARDS["q1"]
    preds = [
        {"question_id": "q0", "question_type": "cell", "text": "2", "answer": "1"},   # wrong: row 1, not column 1
        {"question_id": "q1", "question_type": "cell", "text": "9", "answer": "9"},   # right
        {"question_id": "q0", "question_type": "cell", "text": "none", "answer": "1"},  # wrong, no digit
        {"question_id": "x", "question_type": "count", "text": "3", "answer": "3"},
    ]
    res = analyse(preds, boards)
    assert res["acc"] == pytest.approx(2 / 4)
    assert res["types"] == {"cell": {"n": 3, "acc": pytest.approx(1 / 3)}, "count": {"n": 1, "acc": 1.0}}
    c = res["cell"]
    # row hits: "2" in [1,2,3] yes; "9" in [9,E,9] yes; "none" no. Column hits: no; "9" in [2,9,2] yes; no.
    assert c["row_hit"] == pytest.approx(2 / 3) and c["col_hit"] == pytest.approx(1 / 3)
    # Chance, a random cell's content in the asked row: q0 cells whose digit is in {1,2,3}: 3 of 9;
    # q1: cells holding 9: 2 of 9 (the empty cell never hits). Mean over the three questions.
    assert c["row_chance"] == pytest.approx((3 / 9 + 2 / 9 + 3 / 9) / 3)
    # column: q0 digits in {1,4,7}: 3 of 9; q1 digits in {2,9}: 2, 9, 9, 2 -> 4 of 9.
    assert c["col_chance"] == pytest.approx((3 / 9 + 4 / 9 + 3 / 9) / 3)
    w = res["cell_wrong"]
    assert w["n"] == 2 and w["n_digit"] == 1 and w["digit"] == pytest.approx(1 / 2)
    # The one digit-naming wrong answer ("2" for row 1, column 1): on the board, in the row's other
    # cells [2, 3], not in the column's other cells [4, 7]. Chance over the 7 other filled cells
    # (2,3,4,5,6,7,8): in {2,3}: 2/7; in {4,7}: 2/7.
    assert w["on_board"] == 1.0 and w["row_other"] == 1.0 and w["col_other"] == 0.0
    assert w["row_other_chance"] == pytest.approx(2 / 7) and w["col_other_chance"] == pytest.approx(2 / 7)


def test_cli_prints_and_writes_json_and_rejects_bad_paths(tmp_path, capsys):
    split = write_split(tmp_path)
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps({"question_id": "q0", "question_type": "cell", "text": "1", "answer": "1"}) + "\n")
    res = main([str(preds), str(split), "--json", str(tmp_path / "out.json")])
    assert res["acc"] == 1.0 and json.loads((tmp_path / "out.json").read_text())["cell"]["n"] == 1
    assert "cell questions (1)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no index.json"):
        main([str(preds), str(tmp_path)])
    with pytest.raises(SystemExit, match="cannot read predictions"):
        main([str(tmp_path / "missing.jsonl"), str(split)])
