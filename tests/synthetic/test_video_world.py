"""The synthetic video benchmark: determinism, answers recomputed from the board states, the
shards' docs/video.md format, priors and baselines printed, one-frame and frame-average oracles near
the prior, the data config and prepare.py's dispatch."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from vtc.config import compose_conf
from vtc.data.tokenizer import load_tokenizer
from vtc.synthetic import prepare
from vtc.synthetic.encoder_pretrain import read_samples
from vtc.synthetic.video_baselines import baseline_stats
from vtc.synthetic.video_shards import ensure_video, frames_root, generate, main
from vtc.synthetic.video_world import (
    QUESTION_MIX,
    blink_patterns,
    follow_up_turns,
    make_clip,
)

SMALL = {"seed": 5, "n_train": 12, "n_val": 6, "n_test": 5, "image_size": 36, "grid": 3, "frames": 8,
         "shard_size": 5, "train_turns": 3, "train_readout": 1, "encoder_frames": 7}
EMPTY = -1


# ----------------------------------------------------------------------------- an independent reading


def _word(v: int) -> str:
    return "none" if v == EMPTY else str(v)


def recompute(states, question: str):
    """The answer of ``question`` read off the board states alone (None: the clip does not pose it)."""
    s = np.asarray(states)
    frames = s.shape[0]
    if m := re.fullmatch(r"What digit is in row (\d+), column (\d+) in frame (\d+)\?", question):
        r, c, f = (int(x) - 1 for x in m.groups())
        return _word(int(s[f, r, c]))
    if m := re.fullmatch(r"What digits are in row (\d+) in frame (\d+)\?", question):
        r, f = (int(x) - 1 for x in m.groups())
        return " ".join(_word(int(v)) for v in s[f, r])
    if m := re.fullmatch(r"How many frames show a (\d)\?", question):
        return str(sum(int((s[t] == int(m.group(1))).any()) for t in range(frames)))
    if m := re.fullmatch(r"How many times does the (\d) appear\?", question):
        on = [(s[t] == int(m.group(1))).any() for t in range(frames)]
        return str(sum(1 for t in range(frames) if on[t] and (t == 0 or not on[t - 1])))
    if question == "Which digit appears last?":
        pops = [(t, int(s[t, r, c])) for t in range(1, frames) for r in range(s.shape[1]) for c in range(s.shape[2])
                if s[t, r, c] != EMPTY and s[t, r, c] != s[t - 1, r, c]]
        if not pops:
            return None
        latest = max(t for t, _ in pops)
        digits = {d for t, d in pops if t == latest}
        return str(digits.pop()) if len(digits) == 1 else None
    if m := re.fullmatch(r"Which way does the (\d) move\?", question):
        where = [tuple(x) for t in range(frames) for x in np.argwhere(s[t] == int(m.group(1)))]
        cells = [x for i, x in enumerate(where) if i == 0 or x != where[i - 1]]
        if len(cells) != 2 or cells[0][0] != cells[1][0] or abs(cells[0][1] - cells[1][1]) != 1:
            return None
        return "right" if cells[1][1] > cells[0][1] else "left"
    raise AssertionError(f"unexpected question {question!r}")


def _clips(n_per_type: int, seed: int = 0, grid: int = 3, frames: int = 8):
    rng = np.random.default_rng(seed)
    return [(qtype, *make_clip(rng, qtype, grid, frames)) for qtype in QUESTION_MIX for _ in range(n_per_type)]


# ----------------------------------------------------------------------------- the world


def test_clips_are_deterministic():
    a, b = _clips(20, seed=1), _clips(20, seed=1)
    for (qa, sa, *ra), (qb, sb, *rb) in zip(a, b):
        assert qa == qb and np.array_equal(sa, sb) and ra == rb
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, _clips(20, seed=2)))


@pytest.mark.parametrize("grid,frames", [(3, 8), (2, 4), (4, 12), (3, 16)])
def test_answers_match_the_board_states(grid, frames):
    for qtype, states, question, answer, args in _clips(150, seed=grid * frames, grid=grid, frames=frames):
        assert states.shape == (frames, grid, grid)
        assert recompute(states, question) == answer, (qtype, question, answer, states.tolist())
        if qtype == "count_times":  # the digit blinks in one cell, on in half the frames
            assert len({tuple(x[1:]) for x in np.argwhere(states == args["d"])}) == 1
            assert sum((states[t] == args["d"]).any() for t in range(frames)) == frames // 2
        if qtype == "frame_cell" and frames <= 11:  # the asked cell never shows one content twice
            assert len(set(states[:, args["r"], args["c"]].tolist())) == frames


def test_answer_distributions():
    counts = {q: Counter() for q in QUESTION_MIX}
    for qtype, _, _, answer, _ in _clips(600, seed=3):
        counts[qtype][answer] += 1
    assert set(counts["frame_cell"]) == {str(d) for d in range(10)} | {"none"}
    assert set(counts["count_times"]) == {"1", "2", "3", "4"}
    assert set(counts["last"]) == {str(d) for d in range(10)}
    assert set(counts["direction"]) == {"left", "right"}
    for c in counts.values():  # near uniform: the prior is ~1/len(answers)
        assert max(c.values()) / sum(c.values()) < 1.6 / len(c)


def test_follow_up_rounds_are_answered_from_the_states():
    rng = np.random.default_rng(4)
    for qtype, states, question, _, _ in _clips(40, seed=4):
        turns = follow_up_turns(rng, states, question, 4, readout=1)
        questions = [t["value"].split("\n")[0] for t in turns[0::2]]
        assert len(turns) == 8 and question not in questions and len(set(questions)) == 4
        assert questions[-1].startswith("What digits are in row")
        for q, a in zip(questions, turns[1::2]):
            assert recompute(states, q) == a["value"]


def test_blink_patterns():
    for frames in (4, 8, 9):
        pats = blink_patterns(frames)
        assert sorted(pats) == list(range(1, frames // 2 + 1))
        for p in pats.values():
            assert len(p) and (p.sum(1) == frames // 2).all() and not (p[:, 0] & p[:, -1]).any()


# ----------------------------------------------------------------------------- baselines


def _static_reader(states, question, board):
    """A model that sees one board only: it reads the question off a clip of that board repeated."""
    return recompute(np.repeat(board[None], states.shape[0], axis=0), question)


def _average_board(states):
    """What an average of all frames shows most strongly: per cell, its most frequent content."""
    out = np.empty(states.shape[1:], np.int64)
    for r in range(states.shape[1]):
        for c in range(states.shape[2]):
            col = states[:, r, c].tolist()
            out[r, c] = max(col, key=lambda v: (col.count(v), -col.index(v)))
    return out


def test_one_frame_and_average_readers_are_near_the_prior():
    clips = _clips(1000, seed=11)
    priors, simple_one, simple_avg = {}, {}, {}
    for qtype in QUESTION_MIX:
        mine = [c for c in clips if c[0] == qtype]
        answers = Counter(c[3] for c in mine)
        priors[qtype] = max(answers.values()) / len(mine)
        frames = mine[0][1].shape[0]
        simple_one[qtype] = max(np.mean([_static_reader(s, q, s[k]) == a for _, s, q, a, _ in mine])
                                for k in range(frames))
        simple_avg[qtype] = np.mean([_static_reader(s, q, _average_board(s)) == a for _, s, q, a, _ in mine])
    stats = baseline_stats((q, args, s, a) for q, s, _, a, args in clips)
    for qtype, prior in priors.items():
        # The simple oracles: a frame or the average board read as a still clip.
        assert simple_one[qtype] <= prior + 0.15, (qtype, simple_one[qtype], prior)
        assert simple_avg[qtype] <= prior + 0.05, (qtype, simple_avg[qtype], prior)
        # The rule-aware readers of vtc.synthetic.video_baselines (module doc).
        assert stats[qtype]["one_frame"] <= prior + 0.15, (qtype, stats[qtype], prior)
        assert stats[qtype]["average"] <= prior + 0.07, (qtype, stats[qtype], prior)
    overall_prior = float(np.mean(list(priors.values())))
    assert stats["overall"]["one_frame"] <= overall_prior + 0.10
    assert stats["overall"]["average"] <= overall_prior + 0.04
    # A reader that sees every frame in order answers everything (test_answers_match_the_board_states).


# ----------------------------------------------------------------------------- shards


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("vid") / "a"
    return root, generate(root, workers=1, verbose=False, **SMALL)


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            assert m.mtime == 0 and m.uname == "" and m.uid == 0
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_same_seed_same_bytes(small, tmp_path):
    root, _ = small
    again = tmp_path / "b"
    generate(again, workers=2, verbose=False, **SMALL)
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    for name in a:
        if name != "meta.json":
            assert a[name] == b[name], name
    other = tmp_path / "c"
    generate(other, workers=1, verbose=False, **{**SMALL, "seed": 6})
    assert _files(other)["train/train-00000.tar"] != a["train/train-00000.tar"]


def test_shards_hold_frames_timestamps_and_records(small):
    root, stats = small
    assert (root / "DONE").exists() and stats["params"]["kind"] == "video"
    tok = load_tokenizer(root / "tokenizer")
    for split, n in (("train", 12), ("val", 6), ("test", 5)):
        index = json.loads((root / split / "index.json").read_text())
        assert index["total"] == n == stats["splits"][split]["n"]
        keys = []
        for shard in index["shards"]:
            with tarfile.open(root / split / shard["path"]) as tar:
                names = tar.getnames()
            samples = _samples(root / split / shard["path"])
            assert len(samples) == shard["count"] and len(names) == 9 * shard["count"]
            for key, members in samples.items():
                keys.append(key)
                assert names[names.index(f"{key}.json"):names.index(f"{key}.json") + 9] == \
                    [f"{key}.json"] + [f"{key}.vid0.{t:03d}.jpg" for t in range(8)]
                rec = json.loads(members["json"])
                assert rec["id"] == key and rec["video"] == f"{key}.vid0"
                assert rec["video_timestamps"] == [[float(t) for t in range(8)]]
                conv = rec["conversations"]
                assert conv[0]["value"].startswith("<video>\n") and rec["question_type"] in QUESTION_MIX
                assert sum(t["value"].count("<video>") for t in conv) == 1
                assert len(conv) == (6 if split == "train" else 2)
                for q, a in zip(conv[0::2], conv[1::2]):
                    assert recompute(rec["grids"], q["value"].split("\n")[-2]) == a["value"]
                    ids = tok(a["value"], add_special_tokens=False)["input_ids"]
                    assert tok.unk_token_id not in ids
                for t in range(8):
                    with Image.open(io.BytesIO(members[f"vid0.{t:03d}.jpg"])) as img:
                        assert img.format == "JPEG" and img.size == (36, 36) and img.mode == "RGB"
        assert keys == [f"{split}_{i:06d}" for i in range(n)]


def test_frames_for_the_encoder(small):
    root, stats = small
    assert stats["encoder_frames"] == {"train": 7, "val": 6}
    clips = {}
    for split in ("train", "val"):
        for shard in json.loads((root / split / "index.json").read_text())["shards"]:
            clips.update(_samples(root / split / shard["path"]))
    for split, n in stats["encoder_frames"].items():
        got = read_samples(str(Path(frames_root(root)) / split), 100)  # the encoder's own reader
        assert len(got) == n
        for i, (jpg, rec) in enumerate(got):
            key, t = f"{split}_{i:06d}", i % 8
            assert rec["clip"] == key and rec["frame"] == t
            assert rec["grid"] == json.loads(clips[key]["json"])["grids"][t]
            assert jpg == clips[key][f"vid0.{t:03d}.jpg"]


def test_priors_and_baselines_printed(tmp_path, capsys):
    stats = generate(tmp_path / "p", workers=1, **{**SMALL, "train_turns": 1, "train_readout": 0})
    out = capsys.readouterr().out
    for qtype in QUESTION_MIX:
        assert re.search(rf"{qtype}\s+n=\d+\s+majority=\S+\s+prior=\d+\.\d%\s+one-frame=\d+\.\d% \(frame \d\)\s+"
                         rf"average=\d+\.\d%", out), out
    assert "test accuracy of train's majority answers" in out
    for split in ("train", "val", "test"):
        assert set(stats["baselines"][split]) <= set(QUESTION_MIX) | {"overall"}
    main(["--out", str(tmp_path / "p"), "--train", "12", "--val", "6", "--test", "5", "--image-size", "36",
          "--frames", "8", "--seed", "5", "--shard-size", "5", "--encoder-frames", "7"])
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--frames" in capsys.readouterr().out


def test_ensure_video_is_idempotent_and_checks_params(small, tmp_path):
    root, _ = small
    done = (root / "DONE").stat().st_mtime_ns
    kw = {k: v for k, v in SMALL.items() if k != "shard_size"}
    assert ensure_video(root, **kw)["params"]["seed"] == 5
    assert (root / "DONE").stat().st_mtime_ns == done
    with pytest.raises(ValueError, match="other parameters"):
        ensure_video(root, **{**kw, "frames": 6})
    image = tmp_path / "img"
    image.mkdir()
    (image / "DONE").write_text("ok\n")
    (image / "meta.json").write_text(json.dumps({"params": {"seed": 5}}))
    with pytest.raises(ValueError, match="image set"):
        ensure_video(image, **kw)
    with pytest.raises(ValueError, match="grid >= 2"):
        generate(tmp_path / "g1", **{**SMALL, "grid": 1})


# ----------------------------------------------------------------------------- config and prepare


def test_conf_composes():
    cfg = compose_conf("train", ["data=synthetic_video"])
    assert cfg.data._target_ == compose_conf("train", []).data._target_
    gen = cfg.data.generate
    assert gen.kind == "video" and gen.frames == 8 and gen.grid == 3
    assert Path(cfg.data.root).name == "synthetic-video-s0-112px-g3-f8-n8000-t3-r1-e6000"
    assert cfg.encoder.path.endswith(Path(cfg.data.root).name)
    assert "kind" not in compose_conf("train", []).data.generate


def test_prepare_dispatches_on_kind(tmp_path, monkeypatch):
    root = tmp_path / "data" / "v"
    cfg = compose_conf("train", ["data=synthetic_video", f"data.root={root}",
                                 f"encoder.path={tmp_path / 'enc'}"])
    small = {k: v for k, v in SMALL.items() if k != "shard_size"}
    for k, v in small.items():
        OmegaConf.update(cfg, f"data.generate.{k}", v)
    seen = {}
    monkeypatch.setattr(prepare, "ensure_synthetic", lambda *a, **k: seen.setdefault("image", (a, k)))
    monkeypatch.setattr(prepare, "pretrain_encoder", lambda **k: seen.setdefault("encoder", k))
    prepare.prepare(cfg)
    assert "image" not in seen and json.loads((root / "meta.json").read_text())["params"]["kind"] == "video"
    assert seen["encoder"]["data_root"] == frames_root(str(root))
    done = (root / "DONE").stat().st_mtime_ns
    prepare.ensure_data(cfg)  # idempotent
    assert (root / "DONE").stat().st_mtime_ns == done

    image = compose_conf("train", [f"data.root={tmp_path / 'data' / 'i'}", f"encoder.path={tmp_path / 'enc2'}"])
    seen.clear()
    prepare.prepare(image)
    assert seen["image"][1]["grid"] == 3 and seen["encoder"]["data_root"] == str(tmp_path / "data" / "i")
