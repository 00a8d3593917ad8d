"""The synthetic video benchmark on disk: clips (:mod:`vtc.synthetic.video_world`) rendered frame
by frame and written as webdataset shards in docs/video.md's format, with a tokenizer, the priors
and the one-frame / average baselines, cached so that a run builds it once.

Layout written by :func:`generate` (``out_dir``)::

    train/train-00000.tar ... index.json   {"shards": [{"path", "count"}], "total"}
    val/...  test/...
    frames/train/... frames/val/...         single frames for the tiny encoder's pre-training
    tokenizer/                              build_tiny_tokenizer over every text generated
    meta.json                               parameters, priors, baselines
    DONE                                    written last

A sample (key ``{split}_{index:06d}``, also its ``id``) is ``{key}.json`` then
``{key}.vid0.000.jpg`` .. ``{key}.vid0.{frames-1:03d}.jpg``. The record holds the conversation
(``<video>`` in the first human turn), ``question_type``, ``"video": "{key}.vid0"`` (the clip has
no source file: it names its frame members), ``"video_timestamps": [[t / FPS, ...]]`` (FPS = 1:
frame t at t seconds) and ``"grids"``, the board of every frame (-1 empty).

``frames/`` is the image world's single-image format (``{key}_f{t}.jpg`` + ``.json`` with the
frame's ``"grid"``): frame ``i % frames`` of clip ``i``, for the first ``encoder_frames`` training
clips and up to 512 validation clips, so that :func:`vtc.synthetic.encoder_pretrain.pretrain_encoder`
pre-trains the tiny encoder on the frames the video model will see (``vtc.synthetic.prepare``
points it there). One frame per clip: 6000 clips' frames vary more than 750 clips' 8 frames.

Deterministic as the image set: plain USTAR tars with mtime 0 and no owner, a numpy Generator per
shard seeded with ``(seed, split, shard, 2)``, so the bytes do not depend on ``workers``; built in a
temporary sibling folder renamed into place at the end.

CLI: ``python -m vtc.synthetic.video_shards --out DIR [--seed 0] [--train 8000 --val 500 --test 500]
[--image-size 112] [--grid 3] [--frames 8] [--train-turns 1] [--train-readout 0]
[--encoder-frames 6000] [--shard-size 500] [--workers N] [--force]``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from vtc.data.batch import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from vtc.data.tokenizer import build_tiny_tokenizer
from vtc.synthetic.render import JPEG_QUALITY, render_board
from vtc.synthetic.shards import _add_member, ensure_built, finish_set, prior_stats, start_set
from vtc.synthetic.video_baselines import BaselineCounter
from vtc.synthetic.video_world import (
    FPS,
    FRAMES,
    QUESTION_MIX,
    check_geometry,
    follow_up_turns,
    human_turn,
    make_clip,
)
from vtc.synthetic.world import SPLITS, source_pools

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
_VIDEO_TAG = 2  # keeps the clips' random streams apart from the image set's of the same seed
ENCODER_VAL_FRAMES = 512
FRAMES_DIR = "frames"


def frames_root(root) -> str:
    """Where the single frames for the encoder's pre-training live (``{root}/frames``)."""
    return os.path.join(str(root), FRAMES_DIR)


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    return buf.getvalue()


def make_sample(rng, key: str, qtype: str, grid: int, frames: int, pool, image_size: int,
                turns: int = 1, turn_rng=None, readout: int = 0):
    """One clip: ``(frame JPEGs, record, states, args)``; follow-up rounds come from ``turn_rng``,
    so the first question and the frames do not depend on ``turns``."""
    states, question, answer, args = make_clip(rng, qtype, grid, frames)
    jpgs = [_jpeg(render_board(rng, states[t], pool, image_size)) for t in range(frames)]
    record = {
        "id": key,
        "video": f"{key}.vid0",
        "video_timestamps": [[round(t / FPS, 6) for t in range(frames)]],
        "conversations": [{"from": "human", "value": human_turn(question, True)}, {"from": "gpt", "value": answer}],
        "question_type": qtype,
        "grids": states.tolist(),
    }
    if turns > 1:
        record["conversations"] += follow_up_turns(turn_rng, states, question, turns - 1, readout)
    return jpgs, record, states, args


def _write_shard(job: dict) -> dict:
    """Worker: one shard of clips (and its frames for the encoder); answer counts, baselines, texts."""
    split, shard, start, count, frames = job["split"], job["shard"], job["start"], job["count"], job["frames"]
    pool = source_pools(job["seed"])[split]
    rng = np.random.default_rng([job["seed"], _SPLIT_CODE[split], shard, _VIDEO_TAG])
    turn_rng = np.random.default_rng([job["seed"], _SPLIT_CODE[split], shard, _VIDEO_TAG, 1])
    types, probs = list(QUESTION_MIX), np.array(list(QUESTION_MIX.values()))
    answers: dict[str, Counter] = {t: Counter() for t in types}
    baselines, texts, n_frames = BaselineCounter(), set(), 0
    with ExitStack() as stack:
        tar = stack.enter_context(tarfile.open(job["path"], "w", format=tarfile.USTAR_FORMAT))
        frames_tar = (stack.enter_context(tarfile.open(job["frames_path"], "w", format=tarfile.USTAR_FORMAT))
                      if job["frames_path"] else None)
        for i in range(start, start + count):
            key = f"{split}_{i:06d}"
            qtype = types[int(rng.choice(len(types), p=probs))]
            jpgs, record, states, args = make_sample(rng, key, qtype, job["grid"], frames, pool, job["image_size"],
                                                     job["turns"], turn_rng, job["readout"])
            _add_member(tar, f"{key}.json", json.dumps(record).encode("utf-8"))
            for t, jpg in enumerate(jpgs):
                _add_member(tar, f"{key}.vid0.{t:03d}.jpg", jpg)
            answer = record["conversations"][1]["value"]
            answers[qtype][answer] += 1
            baselines.add(qtype, args, states, answer)
            texts.update(turn["value"] for turn in record["conversations"])
            if frames_tar is not None and i < job["frames_cap"]:
                t = i % frames
                one = {"id": f"{key}_f{t}", "clip": key, "frame": t, "grid": states[t].tolist()}
                _add_member(frames_tar, f"{key}_f{t}.jpg", jpgs[t])
                _add_member(frames_tar, f"{key}_f{t}.json", json.dumps(one).encode("utf-8"))
                n_frames += 1
    return {"split": split, "shard": shard, "answers": {t: dict(c) for t, c in answers.items()},
            "baselines": baselines.to_dict(), "texts": sorted(texts), "frames": n_frames}


def _print_stats(stats: dict) -> None:
    for split, s in stats["splits"].items():
        if not s["n"]:
            continue
        base = stats["baselines"].get(split, {})
        print(f"[synthetic-video] {split}: {s['n']} clips; per question type the prior (majority answer) and "
              f"the best one-frame and frame-average readers (vtc.synthetic.video_baselines):")
        for qtype, t in s["types"].items():
            b = base.get(qtype, {})
            print(f"  {qtype:<12} n={t['n']:<6} majority={t['majority']!r:<7} prior={100 * t['prior']:.1f}%  "
                  f"one-frame={100 * b.get('one_frame', 0):.1f}% (frame {b.get('one_frame_at', '-')})  "
                  f"average={100 * b.get('average', 0):.1f}%")
        o = base.get("overall", {})
        print(f"  overall      prior={100 * s['overall_prior']:.1f}%  one-frame={100 * o.get('one_frame', 0):.1f}%  "
              f"average={100 * o.get('average', 0):.1f}%")
    if "test_prior_from_train_majority" in stats:
        print(f"[synthetic-video] test accuracy of train's majority answers: "
              f"{100 * stats['test_prior_from_train_majority']:.1f}%")


def _jobs(tmp: Path, sizes: dict, params: dict) -> tuple[list[dict], dict, dict]:
    jobs, index, frames_index = [], {}, {}
    caps = {"train": params["encoder_frames"], "val": min(ENCODER_VAL_FRAMES, sizes["val"]), "test": 0}
    for split in SPLITS:
        (tmp / split).mkdir()
        if caps[split]:
            (tmp / FRAMES_DIR / split).mkdir(parents=True)
        shards, fshards = [], []
        for shard, start in enumerate(range(0, sizes[split], params["shard_size"])):
            count = min(params["shard_size"], sizes[split] - start)
            name = f"{split}-{shard:05d}.tar"
            shards.append({"path": name, "count": count})
            n_frames = max(0, min(count, caps[split] - start))
            if n_frames:
                fshards.append({"path": name, "count": n_frames})
            jobs.append({"split": split, "shard": shard, "start": start, "count": count, "seed": params["seed"],
                         "path": str(tmp / split / name), "grid": params["grid"], "frames": params["frames"],
                         "image_size": params["image_size"], "frames_cap": caps[split],
                         "frames_path": str(tmp / FRAMES_DIR / split / name) if n_frames else None,
                         "turns": params["train_turns"] if split == "train" else 1,
                         "readout": params["train_readout"] if split == "train" else 0})
        index[split] = {"shards": shards, "total": sizes[split]}
        if caps[split]:
            frames_index[split] = {"shards": fshards, "total": sum(s["count"] for s in fshards)}
    return jobs, index, frames_index


def generate(out_dir, seed: int = 0, n_train: int = 8000, n_val: int = 500, n_test: int = 500,
             image_size: int = 112, grid: int = 3, frames: int = FRAMES, shard_size: int = 500,
             workers: int | None = None, verbose: bool = True, train_turns: int = 1, train_readout: int = 0,
             encoder_frames: int = 6000) -> dict:
    """Generate the video benchmark into ``out_dir`` (replacing an earlier generated one).

    ``train_turns`` / ``train_readout``: rounds per training conversation and how many of the
    follow-ups are row-in-a-frame readouts (:func:`vtc.synthetic.video_world.follow_up_turns`);
    val/test ask one question. ``encoder_frames``: training clips that give a frame to
    ``frames/train`` (capped at ``n_train``). Returns the statistics saved in ``meta.json``:
    ``params``, ``splits[split]`` (priors, as :func:`vtc.synthetic.shards.prior_stats`),
    ``baselines[split][qtype]`` (``one_frame``, ``one_frame_at``, ``average``),
    ``encoder_frames`` (frames written per split), ``test_prior_from_train_majority``, ``seconds``.
    """
    check_geometry(int(grid), int(frames))
    if int(train_turns) < 1 or not 0 <= int(train_readout) < int(train_turns):
        raise ValueError(f"need train_turns >= 1 and 0 <= train_readout < train_turns, got {train_turns}, {train_readout}")
    if image_size < 4 * grid or shard_size < 1 or encoder_frames < 0:
        raise ValueError(f"need image_size >= 4*grid, shard_size >= 1, encoder_frames >= 0 "
                         f"(got {image_size}, {shard_size}, {encoder_frames})")
    sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(sizes.values()) < 0:
        raise ValueError(f"split sizes must be >= 0, got {sizes}")
    params = {"kind": "video", "seed": int(seed), "n_train": sizes["train"], "n_val": sizes["val"],
              "n_test": sizes["test"], "image_size": int(image_size), "grid": int(grid), "frames": int(frames),
              "shard_size": int(shard_size), "train_turns": int(train_turns), "train_readout": int(train_readout),
              "encoder_frames": min(int(encoder_frames), sizes["train"])}
    out, tmp, t0 = start_set(out_dir)
    try:
        jobs, index, frames_index = _jobs(tmp, sizes, params)
        workers = min(os.cpu_count() or 1, 8) if workers is None else max(1, int(workers))
        workers = min(workers, max(1, len(jobs)))
        if workers == 1:
            results = [_write_shard(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=workers) as ex:
                results = list(ex.map(_write_shard, jobs))
        answers = {s: {t: Counter() for t in QUESTION_MIX} for s in SPLITS}
        baselines = {s: BaselineCounter() for s in SPLITS}
        texts: set[str] = set()
        for res in results:
            for qtype, counts in res["answers"].items():
                answers[res["split"]][qtype].update(counts)
            baselines[res["split"]].update(res["baselines"])
            texts.update(res["texts"])
        for split in SPLITS:
            (tmp / split / "index.json").write_text(json.dumps(index[split], indent=1) + "\n")
        for split, fidx in frames_index.items():
            (tmp / FRAMES_DIR / split / "index.json").write_text(json.dumps(fidx, indent=1) + "\n")
        # <video> is tokenised as <image> (docs/video.md): it adds no word to the vocabulary.
        build_tiny_tokenizer(sorted(t.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER) for t in texts), tmp / "tokenizer")
        stats: dict = {"params": params, "question_mix": dict(QUESTION_MIX),
                       "splits": {s: prior_stats(answers[s]) for s in SPLITS},
                       "baselines": {s: baselines[s].stats() for s in SPLITS},
                       "encoder_frames": {s: f["total"] for s, f in frames_index.items()}}
        finish_set(tmp, out, stats, answers, sizes["test"], t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _print_stats(stats)
        print(f"[synthetic-video] wrote {out} in {stats['seconds']:.1f} s")
    return stats


def ensure_video(out_dir, **kw) -> dict:
    """Generate into ``out_dir`` only when ``out_dir/DONE`` is missing; returns the statistics.

    An existing set must have been made with the parameters given (and be a video set), else
    ``ValueError``. Concurrent callers are safe (each builds in its own temporary folder; the sets
    are byte-identical); ``vtc.synthetic.prepare`` also holds a file lock around this call.
    """
    out = Path(out_dir)
    if (out / "DONE").exists() and "encoder_frames" in kw:
        # the set records the frames it could give (at most one per training clip)
        n_train = json.loads((out / "meta.json").read_text())["params"].get("n_train")
        if n_train is not None:
            kw = {**kw, "encoder_frames": min(int(kw["encoder_frames"]), n_train)}
    return ensure_built(out, generate, kw, kind="video")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m vtc.synthetic.video_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=8000, help="training clips")
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--frames", type=int, default=FRAMES, help="frames per clip (4..16)")
    p.add_argument("--shard-size", type=int, default=500, help="clips per shard")
    p.add_argument("--train-turns", type=int, default=1, help="question rounds per training conversation")
    p.add_argument("--train-readout", type=int, default=0, help="of those, row-in-a-frame readouts")
    p.add_argument("--encoder-frames", type=int, default=6000, help="training frames for the encoder's pre-training")
    p.add_argument("--workers", type=int, default=None, help="processes (default: cores, at most 8)")
    p.add_argument("--force", action="store_true", help="regenerate even when DONE exists")
    a = p.parse_args(argv)
    kw = {"seed": a.seed, "n_train": a.train, "n_val": a.val, "n_test": a.test, "image_size": a.image_size,
          "grid": a.grid, "frames": a.frames, "shard_size": a.shard_size, "train_turns": a.train_turns,
          "train_readout": a.train_readout, "encoder_frames": a.encoder_frames}
    if a.force or not (Path(a.out) / "DONE").exists():
        return generate(a.out, workers=a.workers, **kw)
    stats = ensure_video(a.out, **kw)
    print(f"[synthetic-video] {a.out} already complete (DONE present); statistics from meta.json:")
    _print_stats(stats)
    return stats


if __name__ == "__main__":
    main()
