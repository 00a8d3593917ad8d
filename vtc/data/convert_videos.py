"""The converter's video policy: one source video file -> N frame JPEGs and their times.

Separate from the frame sampling itself (:mod:`vtc.data.video_frames`, PyAV) and from the shard
writing (:mod:`vtc.data.convert_shards`): this module applies the converter's options to a video
and turns what can go wrong into the converter's skip reasons.

* ``--frames N`` (default 8) frames are sampled uniformly over the video's decoded frames, as
  Video-LLaVA does (:func:`vtc.data.video_frames.sample_indices`); a video shorter than N frames
  repeats frames rather than being skipped;
* each frame gets the image policy (:func:`vtc.data.convert_images.fit_image`: RGB, shrunk to
  ``--max-side`` with the bicubic filter, never enlarged) and is stored as an RGB JPEG at the
  images' quality (:func:`vtc.data.convert_images.encode_jpeg`);
* a frame's time is in seconds since the video's first frame; the record stores one list per
  video as ``"video_timestamps"`` (docs/video.md);
* skip reasons: ``missing_video``, ``corrupt_video`` (empty file, FFmpeg cannot open or decode
  it), ``no_video_stream``, ``video_too_short`` (no frame at all); details name the path
  relative to ``--videos``, never the full one.
"""

from __future__ import annotations

import os

from vtc.data.convert_images import Options, encode_jpeg, fit_image
from vtc.data.convert_records import (
    CORRUPT_VIDEO,
    MISSING_VIDEO,
    NO_VIDEO_STREAM,
    VIDEO_TOO_SHORT,
    SkipSample,
)
from vtc.data.video_frames import NO_FRAMES, NO_VIDEO_STREAM as _NO_STREAM, VideoError, sample_video

MAX_FRAMES = 999  # frame members are numbered with 3 digits: vid0.000.jpg ... vid0.998.jpg

_REASONS = {NO_FRAMES: VIDEO_TOO_SHORT, _NO_STREAM: NO_VIDEO_STREAM}


def videos_dir(opts: Options) -> str:
    """The directory video paths are relative to: ``--videos``, else ``--images``."""
    return opts.videos_dir if opts.videos_dir is not None else opts.images_dir


def load_video(video: str, opts: Options) -> tuple[list[bytes], list[float]]:
    """``opts.frames`` JPEG frames of ``video`` (relative to :func:`videos_dir`) and their times
    in seconds, or raise SkipSample."""
    path = os.path.join(videos_dir(opts), video)
    if not os.path.isfile(path):
        raise SkipSample(MISSING_VIDEO, f"no file {video!r} under the video directory")
    try:
        sampled = sample_video(path, opts.frames)
    except VideoError as e:
        raise SkipSample(_REASONS.get(e.reason, CORRUPT_VIDEO),
                         e.detail.replace(path, video)) from e
    encoded: dict[int, bytes] = {}  # a repeated index (short video) is encoded once
    jpegs = []
    for index, frame in zip(sampled.indices, sampled.frames):
        if index not in encoded:
            encoded[index] = encode_jpeg(fit_image(frame, opts.max_side))
        jpegs.append(encoded[index])
    return jpegs, sampled.timestamps
