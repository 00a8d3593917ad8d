"""The synthetic digit-grid VQA benchmark: determinism, disjoint splits, priors, readability."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vtc.synthetic import render, world
from vtc.synthetic import shards as synthetic
from vtc.synthetic.shards import ensure_synthetic, generate, prior_stats
from vtc.synthetic.world import (
    SPLITS,
    SUFFIX,
    _QUESTIONS,
    question_mix,
    source_pools,
)

SMALL = dict(seed=3, n_train=12, n_val=5, n_test=4, image_size=36, grid=3, shard_size=5)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "a"
    stats = generate(root, workers=1, verbose=False, **SMALL)
    return root, stats


def test_same_seed_same_bytes(small, tmp_path):
    root, _ = small
    again = tmp_path / "b"
    generate(again, workers=2, verbose=False, **SMALL)  # a process pool: still identical
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    for name in a:
        if name != "meta.json":  # holds the wall time
            assert a[name] == b[name], name
    other = tmp_path / "c"
    generate(other, workers=1, verbose=False, **{**SMALL, "seed": 4})
    assert _files(other)["train/train-00000.tar"] != a["train/train-00000.tar"]


def test_layout_index_and_tar_headers(small):
    root, stats = small
    assert (root / "DONE").exists() and (root / "tokenizer" / "tokenizer.json").exists()
    for split, n in (("train", 12), ("val", 5), ("test", 4)):
        index = json.loads((root / split / "index.json").read_text())
        assert index["total"] == n == stats["splits"][split]["n"]
        assert [s["count"] for s in index["shards"]] == [min(5, n - k) for k in range(0, n, 5)]
        for shard in index["shards"]:
            with tarfile.open(root / split / shard["path"]) as tar:
                members = tar.getmembers()
                assert len(members) == 2 * shard["count"]
                assert all(m.mtime == 0 and m.uname == "" and m.uid == 0 for m in members)
                names = [m.name for m in members]
                assert names[0::2] == [n.replace(".json", ".jpg") for n in names[1::2]]
    assert not list(root.parent.glob(".a.tmp-*"))


def test_source_pools_are_disjoint():
    pools = source_pools(0)
    sets = {s: set(np.concatenate(list(pools[s].values())).tolist()) for s in SPLITS}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"] | sets["val"] | sets["test"]) == 1797
    _, labels = world._digits()
    for split in SPLITS:
        for digit in range(10):
            idx = pools[split][digit]
            assert len(idx) >= 20 and (labels[idx] == digit).all()
    assert source_pools(0)["val"][3].tolist() == pools["val"][3].tolist()
    assert source_pools(1)["val"][3].tolist() != pools["val"][3].tolist()


def test_renderer_draws_only_from_its_pool(monkeypatch):
    """Every glyph of a split's board comes from that split's pool."""
    pools = source_pools(0)
    drawn = []
    real_choice = np.random.Generator.choice

    class Spy:
        def __init__(self, rng):
            self.rng = rng

        def choice(self, a, *args, **kw):
            out = real_choice(self.rng, a, *args, **kw)
            drawn.append(int(out))
            return out

        def __getattr__(self, name):
            return getattr(self.rng, name)

    rng = np.random.default_rng(0)
    board = np.array([[1, 2, -1], [3, 4, 5], [6, 7, 8]])
    render.render_board(Spy(rng), board, pools["test"], 36)
    test_pool = set(np.concatenate(list(pools["test"].values())).tolist())
    assert len(drawn) == 8 and set(drawn) <= test_pool


def test_prior_at_most_20_percent():
    rng = np.random.default_rng(0)
    mix = question_mix(3)
    answers = {t: Counter() for t in mix}
    for qtype in rng.choice(list(mix), size=6000, p=list(mix.values())):
        _, _, answer = _QUESTIONS[str(qtype)](rng, 3)
        answers[str(qtype)][answer] += 1
    stats = prior_stats(answers)
    assert stats["overall_prior"] <= 0.20, stats
    assert all(t["prior"] <= 0.20 for t in stats["types"].values()), stats


def test_priors_of_a_generated_split(tmp_path):
    stats = generate(tmp_path / "p", seed=0, n_train=600, n_val=0, n_test=0, image_size=24, grid=3,
                     shard_size=600, workers=1, verbose=False)
    assert stats["splits"]["train"]["overall_prior"] <= 0.20, stats["splits"]["train"]
    assert set(stats["splits"]["train"]["types"]) == {"cell", "count", "relation"}


def _check_record(rec: dict) -> None:
    grid = np.array(rec["grid"])
    human, gpt = rec["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n") and human["value"].endswith("\n" + SUFFIX)
    question = human["value"].split("\n")[1]
    assert _qa_type(question) == rec["question_type"]
    _check_qa(grid, question, gpt["value"])


def _qa_type(question: str) -> str:
    if question.startswith("What digit is in row"):
        return "cell"
    return "count" if question.startswith("How many") else "relation"


def _check_qa(grid: np.ndarray, question: str, answer: str) -> None:
    """The answer to one question about ``grid``, recomputed from the question text."""
    assert answer and " " not in answer
    qtype = _qa_type(question)
    if qtype == "cell":
        r, c = (int(x) - 1 for x in re.fullmatch(r"What digit is in row (\d), column (\d)\?", question).groups())
        assert answer == ("none" if grid[r, c] == -1 else str(grid[r, c]))
    elif qtype == "count":
        d = int(re.fullmatch(r"How many (\d)s are there\?", question).group(1))
        assert answer == str(int((grid == d).sum()))
    else:
        m = re.fullmatch(r"What digit is (to the right of|to the left of|below|above) the (\d)\?", question)
        phrase, d = m.group(1), int(m.group(2))
        (r,), (c,) = np.nonzero(grid == d)  # the anchor is unique
        dr, dc = {"to the right of": (0, 1), "to the left of": (0, -1), "below": (1, 0), "above": (-1, 0)}[phrase]
        v = grid[r + dr, c + dc]
        assert answer == ("none" if v == -1 else str(v))


def _read_split(root: Path, split: str) -> list[dict]:
    """Every sample of a generated split, in shard order, as webdataset reads it."""
    import webdataset as wds

    return list(wds.WebDataset(sorted(str(p) for p in (root / split).glob("*.tar")), shardshuffle=False,
                               empty_check=False))


def test_multi_turn_training_conversations(small, tmp_path):
    """train_turns=3: every training conversation has three rounds about its board (answers
    recomputed, no question asked twice); the image and first round are those of train_turns=1,
    and val/test are unchanged (one round), so priors and benchmarks do not move."""
    root, stats = small
    multi = tmp_path / "m"
    mstats = generate(multi, workers=1, verbose=False, train_turns=3, **SMALL)
    assert mstats["splits"] == stats["splits"] and mstats["params"]["train_turns"] == 3
    for split in ("val", "test"):
        assert ([(s["jpg"], s["json"]) for s in _read_split(multi, split)]
                == [(s["jpg"], s["json"]) for s in _read_split(root, split)])
    for one, three in zip(_read_split(root, "train"), _read_split(multi, "train"), strict=True):
        assert one["jpg"] == three["jpg"]
        r1, r3 = json.loads(one["json"]), json.loads(three["json"])
        conv = r3["conversations"]
        assert conv[:2] == r1["conversations"] and len(conv) == 6
        assert [t["from"] for t in conv] == ["human", "gpt"] * 3
        questions = [t["value"] for t in conv[0::2]]
        assert len(set(questions)) == 3 and all("<image>" not in q for q in questions[1:])
        for q, a in zip(questions[1:], conv[3::2]):
            assert q.endswith("\n" + SUFFIX)
            _check_qa(np.array(r3["grid"]), q.split("\n")[0], a["value"])
    with pytest.raises(ValueError, match="train_turns"):
        generate(tmp_path / "bad", workers=1, verbose=False, train_turns=0, **SMALL)


def test_readout_rounds(small, tmp_path):
    """train_readout=1 with train_turns=3: every training conversation ends with one round that
    reads a whole row or column of its board out (the answer recomputed here from the board); the
    image and first round are those of train_turns=1, the second round is a benchmark question
    (answer recomputed), val/test are unchanged and the tokenizer knows the readout's words."""
    root, stats = small
    ro = tmp_path / "ro"
    rstats = generate(ro, workers=1, verbose=False, train_turns=3, train_readout=1, **SMALL)
    assert rstats["splits"] == stats["splits"] and rstats["params"]["train_readout"] == 1

    for split in ("val", "test"):
        assert ([(s["jpg"], s["json"]) for s in _read_split(ro, split)]
                == [(s["jpg"], s["json"]) for s in _read_split(root, split)])
    axes = Counter()
    for a, b in zip(_read_split(ro, "train"), _read_split(root, "train"), strict=True):
        conv = json.loads(a["json"])["conversations"]
        assert a["jpg"] == b["jpg"] and conv[:2] == json.loads(b["json"])["conversations"] and len(conv) == 6
        grid = np.array(json.loads(a["json"])["grid"])
        _check_qa(grid, conv[2]["value"].split("\n")[0], conv[3]["value"])
        q, ans = conv[4]["value"], conv[5]["value"]
        assert q.endswith("\n" + SUFFIX)
        m = re.fullmatch(r"What digits are in (row|column) (\d)\?", q.split("\n")[0])
        assert m, q
        axis, i = m.group(1), int(m.group(2)) - 1
        line = grid[i, :] if axis == "row" else grid[:, i]
        assert ans.split(" ") == ["none" if v == -1 else str(v) for v in line]
        axes[axis] += 1
    assert set(axes) == {"row", "column"}  # both kinds drawn (12 boards)
    vocab = json.loads((ro / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"digits", "are", "row", "column"} <= set(vocab)
    for bad in (3, -1):
        with pytest.raises(ValueError, match="train_readout must be in 0..train_turns-1"):
            generate(tmp_path / f"bad{bad}", workers=1, verbose=False, train_turns=3, train_readout=bad, **SMALL)


def test_shards_readable_by_tarfile_and_webdataset(small):
    import webdataset as wds

    root, _ = small
    url = str(root / "train" / "train-{00000..00002}.tar")
    samples = list(wds.WebDataset(url, shardshuffle=False, empty_check=False))  # no .decode()
    assert [s["__key__"] for s in samples] == [f"train_{i:06d}" for i in range(12)]
    for s in samples:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.size == (36, 36) and img.mode == "RGB"
        rec = json.loads(s["json"])
        assert rec["id"] == s["__key__"] and rec["image"] == s["__key__"] + ".jpg"
        assert len(rec["grid"]) == 3 and all(len(row) == 3 for row in rec["grid"])
        _check_record(rec)
    with tarfile.open(root / "val" / "val-00000.tar") as tar:
        recs = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(recs) == 5
    for rec in recs:
        _check_record(rec)


def test_answers_follow_the_board():
    rng = np.random.default_rng(5)
    for qtype, make in _QUESTIONS.items():
        for _ in range(200):
            board, question, answer = make(rng, 3)
            _check_record({"grid": board.tolist(), "question_type": qtype, "conversations": [
                {"from": "human", "value": f"<image>\n{question}\n{SUFFIX}"}, {"from": "gpt", "value": answer}]})


def test_ensure_synthetic_is_idempotent_and_atomic(small, tmp_path, monkeypatch, capsys):
    root, stats = small
    before = (root / "DONE").stat().st_mtime_ns
    again = ensure_synthetic(root, **SMALL)
    assert again["splits"] == stats["splits"] and (root / "DONE").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="other parameters"):
        ensure_synthetic(root, **{**SMALL, "n_train": 13})

    # a run killed half-way leaves nothing that looks complete
    def boom(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "_write_shard", boom)
    target = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(target, workers=1, **SMALL)
    assert not target.exists() and not list(tmp_path.glob(".killed*"))
    monkeypatch.undo()

    # the CLI prints the priors, and does not regenerate a complete folder
    synthetic.main(["--out", str(root), "--seed", "3", "--train", "12", "--val", "5", "--test", "4",
                    "--image-size", "36", "--shard-size", "5"])
    out = capsys.readouterr().out
    assert "already complete" in out and "overall" in out
    assert (root / "DONE").stat().st_mtime_ns == before
