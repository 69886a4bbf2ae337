"""Video reading (vlmcompress.video) and synthetic test videos (vlmcompress.testing.video)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from vlmcompress.testing.video import PATTERNS, make_test_video, synthetic_frames
from vlmcompress.video import VideoClip, iter_video_chunks, read_video, sample_frame_indices

FRAMES, SIZE, FPS = 16, (64, 48), 8

@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One 16-frame 64x48 clip at 8 fps per pattern (~0.1 s each to encode)."""
    root = tmp_path_factory.mktemp("videos")
    return {p: make_test_video(root / f"{p}.mp4", frames=FRAMES, size=SIZE, fps=FPS, pattern=p) for p in PATTERNS}


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- synthetic frames


def test_synthetic_frames_shape_and_determinism():
    a = synthetic_frames(frames=5, size=(32, 16), seed=3)
    assert a.shape == (5, 16, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_frames(frames=5, size=(32, 16), seed=3))
    assert not np.array_equal(a, synthetic_frames(frames=5, size=(32, 16), seed=4))


def test_synthetic_patterns_move_stay_and_cut():
    moving = synthetic_frames(pattern="moving_square").astype(np.int16)
    static = synthetic_frames(pattern="static")
    cut = synthetic_frames(pattern="scene_cut").astype(np.int16)
    assert all(np.array_equal(static[0], f) for f in static)
    steps = np.abs(np.diff(moving, axis=0)).mean(axis=(1, 2, 3))
    assert (steps > 0).all()  # the square moves every frame
    assert (np.abs(moving[1:] - moving[:1]).max(axis=-1) == 0).mean() > 0.5  # most of the background stays
    change = np.abs(np.diff(cut, axis=0)).mean(axis=(1, 2, 3))
    assert change.argmax() == FRAMES // 2 - 1 and change.max() > 20 and np.delete(change, FRAMES // 2 - 1).max() == 0


def test_synthetic_frames_bad_arguments():
    with pytest.raises(ValueError, match="pattern"):
        synthetic_frames(pattern="spiral")
    with pytest.raises(ValueError, match="size"):
        synthetic_frames(size=(63, 48))
    with pytest.raises(ValueError, match="frames"):
        synthetic_frames(frames=0)


def test_make_test_video_without_ffmpeg_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="ffmpeg"):
        make_test_video(tmp_path / "x.mp4", ffmpeg="/nonexistent/ffmpeg")
    with pytest.raises(ValueError, match="fps"):
        make_test_video(tmp_path / "x.mp4", fps=0)


# ---------------------------------------------------------------- read_video


@pytest.mark.parametrize("pattern", PATTERNS)
def test_read_all_frames_matches_what_was_drawn(videos, pattern):
    clip = read_video(videos[pattern])
    assert isinstance(clip, VideoClip)
    assert clip.frames.shape == (FRAMES, SIZE[1], SIZE[0], 3) and clip.frames.dtype == np.uint8
    assert clip.num_frames == FRAMES and clip.fps == pytest.approx(FPS)
    assert clip.duration == pytest.approx(FRAMES / FPS)
    assert np.array_equal(clip.indices, np.arange(FRAMES))
    np.testing.assert_allclose(clip.timestamps, np.arange(FRAMES) / FPS, atol=1e-3)
    # H.264 + yuv420p is lossy: ~2.5 grey levels on average; a wrong or shifted frame is ~10+.
    drawn = synthetic_frames(frames=FRAMES, size=SIZE, pattern=pattern)
    assert mean_abs_diff(clip.frames, drawn) < 5
    if pattern == "moving_square":
        assert mean_abs_diff(clip.frames[1:], drawn[:-1]) > 2 * mean_abs_diff(clip.frames, drawn)


def test_uniform_sampling(videos):
    clip = read_video(videos["moving_square"], num_frames=4)
    assert clip.indices.tolist() == [0, 5, 10, 15]
    assert clip.frames.shape[0] == 4 and (np.diff(clip.timestamps) > 0).all()
    np.testing.assert_allclose(clip.timestamps, clip.indices / FPS, atol=1e-3)
    whole = read_video(videos["moving_square"])
    assert mean_abs_diff(clip.frames, whole.frames[clip.indices]) == 0
    # More frames than the video has: every frame once, never repeated.
    assert read_video(videos["moving_square"], num_frames=100).indices.tolist() == list(range(FRAMES))


def test_fps_sampling_and_max_frames(videos):
    clip = read_video(videos["static"], fps=2)
    assert clip.indices.tolist() == [0, 4, 8, 12]
    np.testing.assert_allclose(clip.timestamps, [0.0, 0.5, 1.0, 1.5], atol=1e-3)
    capped = read_video(videos["static"], fps=4, max_frames=3)
    assert capped.indices.tolist() == [0, 8, 14]  # a uniform subset of 0, 2, ..., 14
    assert read_video(videos["static"], fps=100).num_frames == FRAMES  # above the source rate: every frame


def test_resize_while_decoding(videos):
    clip = read_video(videos["moving_square"], num_frames=2, size=(32, 24))
    assert clip.frames.shape == (2, 24, 32, 3)


def test_sample_frame_indices_pure():
    assert sample_frame_indices(10, 30.0, num_frames=1).tolist() == [0]
    assert sample_frame_indices(100, 29.97, fps=1).tolist() == [0, 29, 59, 89]
    assert sample_frame_indices(10, 3.0, fps=1).tolist() == [0, 3, 6, 9]
    assert sample_frame_indices(7, 1.0).tolist() == list(range(7))
    idx = sample_frame_indices(1000, 30.0, num_frames=37)
    assert idx.size == 37 and idx[0] == 0 and idx[-1] == 999 and (np.diff(idx) > 0).all()


# ---------------------------------------------------------------- streaming


@pytest.mark.parametrize("fps", [None, 4.0], ids=["every-frame", "fps4"])
def test_chunks_concatenate_to_the_whole_read(videos, fps):
    path = videos["scene_cut"]
    chunks = list(iter_video_chunks(path, chunk_frames=5, fps=fps))
    whole = read_video(path, fps=fps)
    sizes = [c.num_frames for c in chunks]
    assert max(sizes) <= 5 and sum(sizes) == whole.num_frames and all(s == 5 for s in sizes[:-1])
    assert np.array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)
    assert np.array_equal(np.concatenate([c.timestamps for c in chunks]), whole.timestamps)
    assert np.array_equal(np.concatenate([c.indices for c in chunks]), whole.indices)
    assert all(c.duration == whole.duration and c.fps == whole.fps for c in chunks)


# ---------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(missing)
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        iter_video_chunks(missing, chunk_frames=4)


def test_not_a_video_names_the_path(tmp_path):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("this is not a video")
    with pytest.raises(ValueError, match="notes.mp4"):
        read_video(bogus)
    with pytest.raises(ValueError, match="not a file"):
        read_video(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_frames=0), "num_frames"),
        (dict(num_frames=-3), "num_frames"),
        (dict(num_frames=2.5), "num_frames"),
        (dict(fps=0.0), "fps"),
        (dict(fps=float("nan")), "fps"),
        (dict(max_frames=0), "max_frames"),
        (dict(num_frames=4, fps=2.0), "not both"),
        (dict(size=(32,)), "size"),
    ],
    ids=["frames0", "frames-neg", "frames-float", "fps0", "fps-nan", "max0", "both", "size"],
)
def test_bad_sampling_arguments(videos, kwargs, match):
    with pytest.raises(ValueError, match=match):
        read_video(videos["static"], **kwargs)


def test_bad_chunk_size(videos):
    with pytest.raises(ValueError, match="chunk_frames"):
        iter_video_chunks(videos["static"], chunk_frames=0)


def test_missing_decord_says_how_to_install(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # makes `import decord` raise ImportError
    with pytest.raises(ImportError, match=r"vlmcompress\[video\]"):
        read_video(videos["static"])


def test_sampled_fps_spreads_the_clip_over_the_whole_video(tmp_path):
    path = make_test_video(tmp_path / "v.mp4", frames=16, fps=8)
    clip = read_video(path, num_frames=4)
    assert clip.duration == pytest.approx(2.0, abs=0.2)
    assert clip.sampled_fps == pytest.approx(4 / clip.duration)
