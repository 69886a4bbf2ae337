"""Writing synthetic videos to files with the ffmpeg command-line tool (lossless-looking H.264)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

__all__ = ["ffmpeg_binary", "write_video"]


def ffmpeg_binary() -> str:
    """The ffmpeg executable: the one on PATH, else the binary the `imageio-ffmpeg` wheel ships."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError as exc:
        raise RuntimeError("ffmpeg is needed to write videos: install it (apt-get install ffmpeg) "
                           "or `pip install imageio-ffmpeg`") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def write_video(frames: np.ndarray, path: str | Path, *, fps: float = 4.0, crf: int = 4) -> Path:
    """Encode uint8 ``[T, H, W, 3]`` RGB `frames` to `path` (H.264, yuv444p at a high quality so small
    digits and colours survive; ``.mkv``/``.mp4``/``.avi`` by suffix). Returns `path`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    cmd = [ffmpeg_binary(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", f"{fps}", "-i", "-", "-c:v", "libx264", "-preset", "veryfast",
           "-crf", str(int(crf)), "-pix_fmt", "yuv444p", str(path)]
    proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path}: {proc.stderr.decode(errors='replace').strip()}")
    return path
