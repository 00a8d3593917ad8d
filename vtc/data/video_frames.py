"""A video file -> N frames sampled uniformly over its length, with their times, decoded by PyAV.

Separate from the converter's record and shard logic (:mod:`vtc.data.convert_videos` wraps it):
this module is the one place that decides *which* frames of a video a model sees, and it has no
dependency on the rest of vtc, so that any code that must sample a video the same way (the
converter, an evaluation loader) can call :func:`sample_video`. PyAV (``av``, which ships FFmpeg)
is imported when a video is first read: the rest of the converter works without it, and a missing
PyAV raises ImportError (it never turns every video into a skipped, "unreadable" one).

Which frames. Video-LLaVA (PKU-YuanGroup/Video-LLaVA, ``load_and_transform_video`` in
``videollava/model/multimodal_encoder/languagebind/video/processing_video.py``, decord backend)
takes ``np.linspace(0, duration - 1, num_frames, dtype=int)`` with ``duration = len(VideoReader)``,
the video's frame count; LLaVA-NeXT-Video / LLaVA-Video's ``load_video(..., force_sample=True)``
does the same (``np.linspace(0, total_frame_num - 1, max_frames_num, dtype=int)``).
:func:`sample_indices` is that formula, so the first and the last frame are always taken and the
indices are floored. A video with fewer frames than N is **not** skipped: the formula then repeats
frames (5 frames, N = 8 -> 0 0 1 1 2 2 3 4), which is what Video-LLaVA trains on. Only a video
stream that yields no frame at all is refused (:data:`NO_FRAMES`). MVBench's own rule (segment
midpoints inside a question's start/end bound, :func:`segment_indices`) is the other one offered:
a caller passes it to :func:`sample_video` as ``pick``.

How the frames are counted and found. The count is the number of *decoded* frames of the first
video stream, in presentation order (what the decoder returns), not the container's metadata (often
absent or wrong). :func:`sample_video` demuxes the stream once without decoding to count its
packets, decodes it once keeping only the chosen frames, and -- only if the decoder returned a
different number of frames than there were packets -- decodes once more with the indices of the
true count. Every frame up to the last is decoded (no seeking): exact, and codec-independent.

Times: a frame's time in seconds is its presentation timestamp minus the first frame's (so a
stream that starts at a non-zero pts still starts at 0.0), rounded to microseconds; if the stream
lacks timestamps, ``index / average frame rate`` as LLaVA-Video's ``frame_time`` does (the index
itself if the rate is unknown too).

Strictness (as for images, a damaged file is refused, not half-kept): a file FFmpeg cannot open,
whose demuxer flags a packet corrupt (a file cut inside a packet), or whose decoder reports an
error on any packet is :data:`UNREADABLE`. A file cut exactly between two packets reads as a
shorter video: container metadata (frame counts) is too often wrong to tell. A file with no video
stream (an audio file, with or without cover art; an mp4 whose only track is empty) is
:data:`NO_VIDEO_STREAM`. Rotation
metadata (phones' display matrix) is ignored, as decord does: pixels are stored as coded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image

# VideoError.reason values.
UNREADABLE = "unreadable"
NO_VIDEO_STREAM = "no_video_stream"
NO_FRAMES = "no_frames"
NO_FRAME_RATE = "no_frame_rate"  # a start/end bound in seconds, on a video without a frame rate

_ATTACHED_PIC = 0x0400  # FFmpeg's AV_DISPOSITION_ATTACHED_PIC


class VideoError(Exception):
    """A video that cannot give frames. ``reason`` is :data:`UNREADABLE`, :data:`NO_VIDEO_STREAM`,
    :data:`NO_FRAMES` or :data:`NO_FRAME_RATE`; ``detail`` says what FFmpeg said."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class SampledVideo(NamedTuple):
    frames: list[Image.Image]  # RGB, one per index (a repeated index repeats the same image)
    timestamps: list[float]    # seconds since the first frame, one per index
    indices: list[int]         # the sampled frame indices, non-decreasing
    frame_count: int           # decoded frames in the stream


def sample_indices(frame_count: int, n: int) -> list[int]:
    """Video-LLaVA's frame indices: ``np.linspace(0, frame_count - 1, n, dtype=int)``."""
    if frame_count < 1 or n < 1:
        raise ValueError(f"need frame_count >= 1 and n >= 1, got {frame_count}, {n}")
    return [int(i) for i in np.linspace(0, frame_count - 1, n, dtype=int)]


def segment_indices(n: int, fps: float | None, max_frame: int, bound=None, first_idx: int = 0) -> list[int]:
    """MVBench's frame indices (``get_index`` of ``video_chat2/mvbench.ipynb``, github.com/OpenGVLab/
    Ask-Anything at 4dd8210b): the middle of each of ``n`` equal segments of the frames between
    ``bound = (start, end)`` seconds (the whole video without one),

        start_idx = max(first_idx, round(start * fps)),  end_idx = min(round(end * fps), max_frame)
        index_i = int(start_idx + seg / 2 + np.round(seg * i)),  seg = (end_idx - start_idx) / n

    with Python's and numpy's round (halves to even) as the notebook has them. The notebook calls
    it with ``max_frame`` = the last frame's index and ``first_idx`` 0 for a video file; for a
    folder of frames (``00001.jpg``...) with ``max_frame`` = the number of files, ``first_idx`` 1
    and ``fps`` 3. Indices are clipped to ``[first_idx, max_frame]``: a bound past the video's end
    (the notebook would read out of range) takes its last frames."""
    if bound is not None and not fps:
        raise VideoError(NO_FRAME_RATE, f"a start/end bound {list(bound)} needs the frame rate, which the video lacks")
    start_idx, end_idx = first_idx, max_frame  # no bound: the notebook's (-100000, 100000) s clip to these
    if bound is not None:
        start_idx = max(first_idx, round(bound[0] * fps))
        end_idx = min(round(bound[1] * fps), max_frame)
    seg = float(end_idx - start_idx) / n
    return [min(max(int(start_idx + seg / 2 + np.round(seg * i)), first_idx), max_frame) for i in range(n)]


def read_frames(path: str | os.PathLike, n: int) -> tuple[list[Image.Image], list[float]]:
    """``(frames, timestamps)``: ``n`` RGB frames of ``path`` sampled as :func:`sample_video`."""
    sampled = sample_video(path, n)
    return sampled.frames, sampled.timestamps


Picker = Callable[[int, "float | None"], list[int]]  # (decoded frame count, frame rate) -> indices


def sample_video(path: str | os.PathLike, n: int, pick: Picker | None = None) -> SampledVideo:
    """Decode ``n`` frames of the video at ``path``, sampled uniformly over it (see module
    docstring), or at the indices ``pick(frame_count, fps)`` returns (e.g. MVBench's
    :func:`segment_indices` inside a start/end bound).

    Raises FileNotFoundError for a path that is not a file, :class:`VideoError` for a video that
    cannot give frames, ValueError for ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pick = pick or (lambda count, fps: sample_indices(count, n))
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    av = _import_av()
    if os.path.getsize(path) == 0:
        raise VideoError(UNREADABLE, "empty file")
    try:
        packets, fps = _count_packets(av, path)
        if packets == 0:
            raise VideoError(NO_FRAMES, "the video stream holds no frame")
        indices = pick(packets, fps)
        decoded = _decode(av, path, set(indices))
        if decoded.count != packets:  # the decoder's count is the truth: sample over it
            if decoded.count == 0:
                raise VideoError(NO_FRAMES, f"{packets} packets decode to no frame")
            indices = pick(decoded.count, fps)
            decoded = _decode(av, path, set(indices))
    except VideoError:
        raise
    except Exception as e:  # FFmpeg errors, and decoders raise all sorts on damaged data
        raise VideoError(UNREADABLE, f"{type(e).__name__}: {e}") from e
    return SampledVideo([decoded.images[i] for i in indices], _timestamps(indices, decoded),
                        indices, decoded.count)


def _import_av():
    try:
        import av  # deferred: only videos need PyAV (and FFmpeg with it)
    except ImportError as e:
        raise ImportError("reading videos needs PyAV: pip install av") from e
    return av


def _open_video(av, path: str):
    """Open ``path`` and return ``(container, first video stream)``; the caller closes. Cover art
    (a still picture attached to an audio file, which FFmpeg lists as a video stream) is not a
    video."""
    container = av.open(path)
    videos = [s for s in container.streams.video
              if not int(getattr(s, "disposition", 0)) & _ATTACHED_PIC]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        if len(videos) < len(container.streams.video):
            kinds.append("cover art")
        container.close()
        raise VideoError(NO_VIDEO_STREAM, f"streams: {', '.join(kinds)}")
    return container, videos[0]


def _count_packets(av, path: str) -> tuple[int, float | None]:
    """The video stream's packets and average frame rate (decord's ``get_avg_fps``; None when the
    container has none); a packet the demuxer flags corrupt (cut short) refuses it."""
    container, stream = _open_video(av, path)
    rate = stream.average_rate or stream.guessed_rate
    count = 0
    with container:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                raise VideoError(UNREADABLE, f"packet {count} is corrupt (truncated file?)")
            count += bool(packet.size)  # the demuxer ends with an empty flush packet
    return count, (float(rate) if rate else None)


class _Decoded(NamedTuple):
    images: dict[int, Image.Image]   # wanted index -> RGB frame
    times: dict[int, float | None]   # wanted index -> pts in seconds (None: no pts)
    first: float | None              # the first frame's pts in seconds
    fps: float | None                # the stream's average (else guessed) frame rate
    count: int                       # frames decoded


def _decode(av, path: str, wanted: set[int]) -> _Decoded:
    """Decode every frame of the video stream, keeping the images and times of ``wanted``."""
    container, stream = _open_video(av, path)
    rate = stream.average_rate or stream.guessed_rate
    images: dict[int, Image.Image] = {}
    times: dict[int, float | None] = {}
    first, count = None, 0
    with container:
        for frame in container.decode(stream):
            if count == 0:
                first = frame.time
            if count in wanted:
                images[count] = frame.to_image()
                times[count] = frame.time
            count += 1
    return _Decoded(images, times, first, float(rate) if rate else None, count)


def _timestamps(indices: list[int], decoded: _Decoded) -> list[float]:
    """Seconds since the first frame (pts), else ``index / fps``, else the index itself."""
    first = decoded.first
    if first is not None and all(decoded.times[i] is not None for i in indices):
        return [round(decoded.times[i] - first, 6) for i in indices]
    fps = decoded.fps
    return [round(i / fps, 6) if fps else float(i) for i in indices]
