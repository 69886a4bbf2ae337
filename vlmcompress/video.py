"""Reading video frames with decord: a uniform sample, a sample at a given rate, or a stream of chunks.

``decord`` is an optional dependency (``pip install 'vlmcompress[video]'``), imported when a video is
opened. Frames come back as uint8 RGB numpy arrays ``[T, H, W, 3]``, with the time of each frame.

For long videos use :func:`iter_video_chunks`: it decodes ``chunk_frames`` sampled frames at a time,
so an hour of video never sits decoded in memory at once (an hour at 1 fps is 3,600 frames, ~2.2 GB
at 448×448).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["VideoClip", "iter_video_chunks", "read_video", "sample_frame_indices"]


@dataclass(frozen=True)
class VideoClip:
    """Frames sampled from one video.

    Attributes:
        frames: ``[T, H, W, 3]`` uint8 RGB.
        timestamps: ``[T]`` float64 seconds, the presentation time of each frame (non-decreasing).
        indices: ``[T]`` int64 index of each frame in the source video.
        fps: the source's average frame rate.
        duration: the whole source video's length in seconds (not just the sampled part).
    """

    frames: np.ndarray
    timestamps: np.ndarray
    indices: np.ndarray
    fps: float
    duration: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the *sampled* clip over the whole video (what a VLM's video metadata
        wants): ``num_frames / duration``."""
        return self.num_frames / max(self.duration, 1e-6)


def _positive_int(name: str, value, *, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _positive_float(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _uniform(count: int, k: int) -> np.ndarray:
    """``k`` indices spread evenly over ``range(count)``, first and last included (``k <= count``)."""
    return np.floor(np.linspace(0, count - 1, k) + 0.5).astype(np.int64)


def sample_frame_indices(
    total: int,
    source_fps: float,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Which frames of a ``total``-frame video to read.

    - ``num_frames``: ``min(num_frames, total)`` frames spread uniformly over the whole video, first
      and last frame included (``linspace(0, total - 1, k)`` rounded, as Hugging Face video
      processors sample); never repeats a frame.
    - ``fps``: the frame shown at each time ``0, 1/fps, 2/fps, ...`` (every frame when ``fps`` is at
      least the source rate).
    - neither: every frame.
    - ``max_frames`` then caps the count, keeping a uniform subset of the chosen frames.

    Returns:
        ``[T]`` int64, strictly increasing.
    """
    total = _positive_int("total", total, allow_none=False)
    num_frames = _positive_int("num_frames", num_frames)
    max_frames = _positive_int("max_frames", max_frames)
    fps = _positive_float("fps", fps)
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None:
        indices = _uniform(total, min(num_frames, total))
    elif fps is not None:
        source_fps = _positive_float("source_fps", source_fps)
        step = source_fps / fps  # source frames per sample
        count = math.ceil(total / step - 1e-9)
        # +1e-6: i * step is an integer in exact arithmetic more often than in float (e.g. 3 * 10/3).
        indices = np.floor(np.arange(count) * step + 1e-6).astype(np.int64)
        indices = np.unique(np.clip(indices, 0, total - 1))
    else:
        indices = np.arange(total, dtype=np.int64)
    if max_frames is not None and indices.size > max_frames:
        indices = indices[_uniform(indices.size, max_frames)]
    return indices


def _open(path, size):
    """A decord ``VideoReader`` for ``path``, with clear errors."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if not path.is_file():
        raise ValueError(f"video path is not a file: {path}")
    width = height = -1
    if size is not None:
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in size)):
            raise ValueError(f"size must be a (width, height) pair of positive ints, got {size!r}")
        width, height = size
    try:
        import decord
    except ImportError as err:
        raise ImportError(
            "reading video needs decord: pip install 'vlmcompress[video]'"
        ) from err
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height)
    except (RuntimeError, decord.DECORDError) as err:
        raise ValueError(f"could not read {path} as a video: {str(err).splitlines()[0]}") from err
    if len(reader) == 0:
        raise ValueError(f"video has no frames: {path}")
    return path, reader


def _source_info(reader) -> tuple[float, float]:
    """``(fps, duration)`` of the whole source."""
    fps = float(reader.get_avg_fps())
    total = len(reader)
    end = float(reader.get_frame_timestamp(total - 1)[1])
    duration = end if end > 0 else (total / fps if fps > 0 else 0.0)
    return fps, duration


def _clip(reader, indices: np.ndarray, fps: float, duration: float) -> VideoClip:
    frames = reader.get_batch(indices.tolist()).asnumpy()
    times = np.asarray(reader.get_frame_timestamp(indices.tolist()), dtype=np.float64).reshape(-1, 2)[:, 0]
    return VideoClip(frames=frames, timestamps=times, indices=indices.astype(np.int64), fps=fps, duration=duration)


def read_video(
    path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
) -> VideoClip:
    """Decode sampled frames of a video (see :func:`sample_frame_indices` for the sampling).

    Args:
        path: the video file.
        num_frames: read this many frames spread uniformly over the video (fewer if it is shorter).
        fps: or read frames at this rate (seconds ``0, 1/fps, ...``).
        max_frames: cap on the number of frames either way.
        size: ``(width, height)`` to resize to while decoding; ``None`` keeps the source size.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a readable video, or bad sampling arguments.
        ImportError: decord is not installed.
    """
    _positive_int("num_frames", num_frames)
    _positive_int("max_frames", max_frames)
    _positive_float("fps", fps)
    if num_frames is not None and fps is not None:
        raise ValueError("give num_frames or fps, not both")
    _, reader = _open(path, size)
    source_fps, duration = _source_info(reader)
    indices = sample_frame_indices(len(reader), source_fps, num_frames=num_frames, fps=fps, max_frames=max_frames)
    return _clip(reader, indices, source_fps, duration)


def iter_video_chunks(
    path,
    *,
    chunk_frames: int,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
) -> Iterator[VideoClip]:
    """Stream a video as consecutive :class:`VideoClip` chunks of at most ``chunk_frames`` frames.

    Samples every frame, or frames at ``fps``, like :func:`read_video`; concatenating the chunks'
    ``frames``, ``timestamps`` and ``indices`` gives exactly what ``read_video(path, fps=fps,
    size=size)`` returns. Only one chunk is decoded at a time. Arguments are checked and the file is
    opened when this is called, not at the first ``next()``.
    """
    chunk_frames = _positive_int("chunk_frames", chunk_frames, allow_none=False)
    _positive_float("fps", fps)
    _, reader = _open(path, size)
    source_fps, duration = _source_info(reader)
    indices = sample_frame_indices(len(reader), source_fps, fps=fps)

    def chunks() -> Iterator[VideoClip]:
        for start in range(0, indices.size, chunk_frames):
            yield _clip(reader, indices[start:start + chunk_frames], source_fps, duration)

    return chunks()
