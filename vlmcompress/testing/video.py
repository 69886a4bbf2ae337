"""Small deterministic test videos, generated with the ``ffmpeg`` command-line tool.

``synthetic_frames`` draws the frames (uint8 ``[T, H, W, 3]``); ``make_test_video`` encodes the same
frames to a file, so a test can compare what a reader decodes with what was drawn. The content is
smooth (colour gradients plus one flat square) because codecs are lossy: with H.264 at CRF 12 the
decoded frames differ from the drawn ones by about 2.5 grey levels on average (yuv420p halves the
chroma resolution, which blurs the square's edges a little).

Patterns:

- ``"moving_square"``: a static gradient background with a square sliding left to right, one step
  per frame (temporal merging should keep the square's tokens and collapse the background);
- ``"static"``: the same frame repeated (everything should collapse);
- ``"scene_cut"``: two different scenes, the cut at frame ``T // 2``.
"""
from __future__ import annotations

import shutil
import subprocess
from numbers import Real
from pathlib import Path

import numpy as np

__all__ = ["PATTERNS", "make_test_video", "synthetic_frames"]

PATTERNS = ("moving_square", "static", "scene_cut")


def _check_args(frames, size, pattern) -> tuple[int, int, int]:
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an int >= 1, got {frames!r}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in size)):
        raise ValueError(f"size must be a (width, height) pair of ints, got {size!r}")
    width, height = size
    # yuv420p (what every player and decord reads) needs even sizes; 8 leaves room for the square.
    if width < 8 or height < 8 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least (8, 8) (yuv420p needs even sizes), got {tuple(size)}")
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    return frames, width, height


def _background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """``[H, W, 3]`` float: a smooth gradient between random corner colours."""
    corners = rng.uniform(30, 200, size=(4, 3))  # top-left, top-right, bottom-left, bottom-right
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    top = corners[0] * (1 - x) + corners[1] * x
    bottom = corners[2] * (1 - x) + corners[3] * x
    return top * (1 - y) + bottom * y


def synthetic_frames(
    *,
    frames: int = 16,
    size: tuple[int, int] = (64, 48),
    pattern: str = "moving_square",
    seed: int = 0,
) -> np.ndarray:
    """The frames :func:`make_test_video` encodes.

    Args:
        frames: number of frames ``T``.
        size: ``(width, height)``, even, at least 8 each.
        pattern: one of :data:`PATTERNS`.
        seed: picks the colours; the same seed gives the same frames.

    Returns:
        ``[T, H, W, 3]`` uint8 RGB.
    """
    t_count, width, height = _check_args(frames, size, pattern)
    rng = np.random.default_rng(seed)
    scenes = [_background(width, height, rng)]
    colour = rng.uniform(0, 255, size=3)
    colour = np.where(colour > 127, 245.0, 10.0)  # saturated, far from the mid-range background
    if pattern == "scene_cut":
        scenes.append(255.0 - scenes[0][::-1])  # flipped and inverted: every patch changes
    side = max(4, min(width, height) // 3)
    top = (height - side) // 2
    out = np.empty((t_count, height, width, 3), dtype=np.uint8)
    for t in range(t_count):
        if pattern == "moving_square":
            left = round(t * (width - side) / max(t_count - 1, 1))
        elif pattern == "scene_cut":
            left = 1 if t < t_count // 2 else width - side - 1
        else:
            left = (width - side) // 2
        scene = scenes[-1] if pattern == "scene_cut" and t >= t_count // 2 else scenes[0]
        frame = scene.copy()
        frame[top:top + side, left:left + side] = colour
        out[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def make_test_video(
    path,
    *,
    frames: int = 16,
    size: tuple[int, int] = (64, 48),
    fps: float = 8,
    pattern: str = "moving_square",
    seed: int = 0,
    codec: str = "libx264",
    ffmpeg: str = "ffmpeg",
) -> Path:
    """Encode :func:`synthetic_frames` to ``path`` with ffmpeg; returns ``path`` as a ``Path``.

    The container follows the suffix (``.mp4``, ``.mkv``, ``.avi``). ``codec="libx264"`` (H.264,
    CRF 12, yuv420p) falls back to ``"mpeg4"`` when this ffmpeg was built without x264. Encoding a
    16-frame 64×48 clip takes ~0.1 s.

    Raises:
        RuntimeError: ``ffmpeg`` is not installed, or the encode failed (its message is included).
        ValueError: bad ``frames``, ``size``, ``fps`` or ``pattern``.
    """
    data = synthetic_frames(frames=frames, size=size, pattern=pattern, seed=seed)
    if isinstance(fps, bool) or not isinstance(fps, Real) or not (0 < fps < 1000):
        raise ValueError(f"fps must be a number in (0, 1000), got {fps!r}")
    exe = shutil.which(ffmpeg)
    if exe is None:
        raise RuntimeError(
            f"the ffmpeg command-line tool was not found (looked for {ffmpeg!r}); install it "
            "(Debian/Ubuntu: apt-get install ffmpeg) to generate test videos"
        )
    path = Path(path)
    width, height = size
    codecs = [codec] + (["mpeg4"] if codec == "libx264" else [])
    for attempt, name in enumerate(codecs):
        quality = ["-preset", "ultrafast", "-crf", "12"] if name.startswith("libx264") else ["-q:v", "2"]
        cmd = [
            exe, "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", f"{float(fps):g}",
            "-i", "-",
            "-c:v", name, *quality, "-pix_fmt", "yuv420p", "-threads", "1",
            str(path),
        ]
        done = subprocess.run(cmd, input=data.tobytes(), capture_output=True, check=False)
        if done.returncode == 0:
            return path
        message = done.stderr.decode(errors="replace").strip()
        if attempt + 1 < len(codecs) and "encoder" in message.lower():
            continue  # this ffmpeg lacks the encoder; try the next one
        raise RuntimeError(f"ffmpeg could not write {path} with codec {name!r}: {message[-500:]}")
    raise AssertionError("unreachable")
