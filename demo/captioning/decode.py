"""Read the sampled frames of one video: by time, not frame number, and at the size the model needs.

- **Time-based sampling.** A variable-frame-rate file can hold many frames in one second and few in the
  next; picking frame *numbers* uniformly then samples by frame density, not by time (13 of 16 frames
  from the first second of one such file). Here each sample is a *time* and the frame shown at that time
  is read (the last frame whose presentation time is at or before it).
- **Resize while decoding.** decord scales inside the decoder (``VideoReader(width=, height=)``), so a
  4000×3000 video never exists decoded at full size: 16 such frames are 576 MB as uint8, 1.8 MB at 384×288.
- **decord misreads some widths** (16, 24, 48, 72 px at native size came back with 4 or 6 "channels" or
  failed with a copy-size error, on any source), so the decoded width is always a multiple of 32 (widths
  16–98 that are multiples of 32 read correctly); the processor resizes frames again anyway.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["DecodeError", "Decoded", "Sampling", "decode", "parse_resize", "sample_times"]


class DecodeError(Exception):
    """A video that cannot be captioned, with the reason in plain words (the file is named by the caller)."""


@dataclass(frozen=True)
class Sampling:
    """Which frames to read and at what size (all of it goes into the resume key).

    frames: samples spread uniformly over the window (segment centres); ignored when ``fps`` is set.
    fps: or one sample every ``1/fps`` seconds from ``start``.
    max_frames: cap on the count either way (a uniform subset is kept).
    start, end: the window in seconds (``end=None``: to the end of the video).
    resize: ``None`` (source size), ``("short", n)`` (shorter side ``n`` px, aspect kept, never
        upscaled) or ``("exact", w, h)``.
    """

    frames: int | None = 16
    fps: float | None = None
    max_frames: int | None = None
    start: float = 0.0
    end: float | None = None
    resize: tuple | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["resize"] = self.resize if self.resize in (None, "auto") else list(self.resize)
        return d


@dataclass
class Decoded:
    frames: np.ndarray          # [T, H, W, 3] uint8 RGB
    timestamps: np.ndarray      # [T] float64 seconds: presentation time of each frame read
    indices: np.ndarray         # [T] int64 frame numbers in the source
    source_fps: float           # the source's average frame rate
    duration: float             # the whole source's length in seconds
    window: tuple[float, float] # the sampled window (start, end) in seconds
    source_size: tuple[int, int]    # (width, height) of the source
    size: tuple[int, int]           # (width, height) decoded
    seconds: float              # wall time spent decoding

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sample over its window: what a processor's video metadata wants."""
        return len(self.frames) / max(self.window[1] - self.window[0], 1e-6)


def parse_resize(text: str | None):
    """``--resize`` text → :attr:`Sampling.resize` (``"auto"`` is resolved by the engine, from the processor).

    ``none``/``0`` → None; ``384`` → shorter side 384 px; ``640x360`` → exactly that."""
    if text is None:
        return None
    t = str(text).strip().lower()
    if t in ("none", "0", "off"):
        return None
    if t == "auto":
        return "auto"
    try:
        if "x" in t:
            w, h = (int(v) for v in t.split("x"))
            if w > 0 and h > 0:
                return ("exact", w, h)
        elif int(t) > 0:
            return ("short", int(t))
    except ValueError:
        pass
    raise ValueError(f"--resize must be auto, none, a shorter side in pixels (384) or WIDTHxHEIGHT (640x360), "
                     f"got {text!r}")


def sample_times(window: tuple[float, float], *, frames: int | None, fps: float | None,
                 max_frames: int | None) -> np.ndarray:
    """``[K]`` float64 sample times (seconds) inside ``window`` (see :class:`Sampling`)."""
    start, end = window
    span = end - start
    if fps is not None:
        times = start + np.arange(max(1, math.ceil(span * fps - 1e-9))) / fps
    else:
        k = frames or 16
        times = start + (np.arange(k) + 0.5) * span / k    # segment centres: every part of the window counts
    if max_frames is not None and times.size > max_frames:
        times = times[np.floor(np.linspace(0, times.size - 1, max_frames) + 0.5).astype(np.int64)]
    return times


def _target_size(source: tuple[int, int], resize) -> tuple[int, int]:
    w, h = source
    if resize is not None and resize[0] == "exact":
        w, h = resize[1], resize[2]
    elif resize is not None and resize[0] == "short":
        scale = resize[1] / min(w, h)
        if scale < 1.0:                               # never upscale: it costs memory and adds nothing
            w, h = w * scale, h * scale
    width = max(32, int(round(w / 32)) * 32)
    height = max(32, int(round(h / 2)) * 2)
    return width, height


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[-1] if text else type(err).__name__
    # decord's messages start with "[hh:mm:ss] /path/to/source.cc:123: "; keep only what it says.
    if "] " in line and ".cc:" in line:
        line = line.split(": ", 1)[-1]
    return line.strip()


def _plain(err: BaseException, path: Path) -> str:
    msg = _first_line(err)
    low = str(err).lower()
    if "cannot find video stream" in low:
        return "the file has no video stream (audio only?)"
    if "invalid data found" in low or "error reading" in low:
        return "not a video the decoder can read (unknown format or corrupt data)"
    if "seek" in low:
        return f"not a video the decoder can read (it could not seek to the first frame: {msg})"
    return f"the decoder failed: {msg}"


def decode(path, sampling: Sampling) -> Decoded:
    """The frames of ``path`` chosen by ``sampling``.

    Raises:
        DecodeError: the file is empty, is no video, has no video stream, is corrupt, or the window is
            outside the video; the message says which, in plain words.
        ImportError: decord is not installed.
    """
    t0 = time.perf_counter()
    path = Path(path)
    try:
        import decord
    except ImportError as err:
        raise ImportError("reading video needs decord: pip install 'vlmcompress[video]'") from err
    try:
        if path.stat().st_size == 0:
            raise DecodeError("the file is empty (0 bytes)")
    except OSError as e:
        raise DecodeError(f"cannot read the file: {e.strerror or e}") from e
    try:
        probe = decord.VideoReader(str(path), ctx=decord.cpu(0))
        h, w = probe.next().shape[:2]          # one frame tells the source size (decord has no getter)
        total = len(probe)
        del probe
        size = _target_size((w, h), sampling.resize)
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), width=size[0], height=size[1])
        pts = np.asarray(reader.get_frame_timestamp(list(range(total))), dtype=np.float64).reshape(-1, 2)
        source_fps = float(reader.get_avg_fps())
    except DecodeError:
        raise
    except StopIteration as e:                 # opened, but not one frame decodes (a text file, say)
        raise DecodeError("not a video the decoder can read (no frame could be decoded)") from e
    except Exception as e:                     # decord raises DECORDError, RuntimeError, ValueError
        raise DecodeError(_plain(e, path)) from e
    if total == 0:
        raise DecodeError("the video has no frames")
    starts = pts[:, 0]
    duration = float(pts[-1, 1]) if pts[-1, 1] > 0 else total / max(source_fps, 1e-6)
    start = float(sampling.start or 0.0)
    end = duration if sampling.end is None else min(float(sampling.end), duration)
    if start >= duration:
        raise DecodeError(f"--start {start:g} s is at or past the end of the {duration:.3g} s video")
    times = sample_times((start, end), frames=sampling.frames, fps=sampling.fps, max_frames=sampling.max_frames)
    # The frame on screen at time t: the last one that started at or before t.
    indices = np.clip(np.searchsorted(starts, times + 1e-6, side="right") - 1, 0, total - 1)
    indices = np.unique(indices)                 # a low-rate source sampled densely repeats frames
    try:
        frames = reader.get_batch(indices.tolist()).asnumpy()
    except Exception as e:
        raise DecodeError(_plain(e, path)) from e
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1:3] != (size[1], size[0]):
        raise DecodeError(f"the decoder returned malformed frames {tuple(frames.shape)} for a {w}×{h} video")
    return Decoded(frames=frames, timestamps=starts[indices], indices=indices.astype(np.int64),
                   source_fps=source_fps, duration=duration, window=(start, end), source_size=(int(w), int(h)),
                   size=size, seconds=time.perf_counter() - t0)
