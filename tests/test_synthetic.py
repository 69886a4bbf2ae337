"""The synthetic benchmark: deterministic by seed, answers right by construction, files decode back."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vlmcompress import synthetic as S
from vlmcompress.synthetic.scenes import digit_mask, shape_mask


def _near(frame: np.ndarray, colour, tol: float = 30.0) -> np.ndarray:
    """[H, W] bool: pixels within `tol` (L1 per channel, averaged) of `colour`."""
    return np.abs(frame.astype(np.int32) - np.asarray(colour)).mean(-1) < tol


def test_same_seed_same_bytes_and_splits_differ():
    a = S.make_sample("digit", 5, frames=8)
    b = S.make_sample("digit", 5, frames=8)
    assert a.frames.tobytes() == b.frames.tobytes() and a.answer == b.answer and a.caption == b.caption
    assert S.make_sample("digit", 6, frames=8).frames.tobytes() != a.frames.tobytes()
    train = S.make_sample("digit", 5, frames=8, split="train")
    assert train.frames.tobytes() != a.frames.tobytes()
    # Seeds of the two splits are distinct for every index and task (disjoint by construction).
    for task in S.TASKS:
        for i in range(50):
            assert tuple(S.scene_seed("train", task, i).generate_state(4)) != tuple(S.scene_seed("test", task, i).generate_state(4))


@pytest.mark.parametrize("index", range(6))
def test_object_answers_by_construction(index):
    s = S.make_scene("object", S.scene_seed("test", "object", index), frames=8)
    f = s.facts
    colour = S.COLOURS[f["colour"]]
    for t, (y, x, h, w) in enumerate(f["object_boxes"]):
        mask = shape_mask(f["shape"], h)
        region = s.frames[t, y:y + h, x:x + w]
        assert _near(region, colour)[mask].mean() > 0.95  # the object's pixels have the stated colour
        assert not _near(region, colour)[~mask].any()       # and nothing outside its shape does
        assert h * w <= 0.1 * s.frames.shape[1] * s.frames.shape[2]
    ys = [b[0] for b in f["object_boxes"]]
    xs = [b[1] for b in f["object_boxes"]]
    moved = {"left": xs[-1] < xs[0], "right": xs[-1] > xs[0], "up": ys[-1] < ys[0], "down": ys[-1] > ys[0]}
    assert moved[f["direction"]] and sum(moved.values()) == 1
    y, x, h, w = f["digit_box"]
    ink = s.frames[0, y:y + h, x:x + w].astype(np.int32).min(-1) > 200
    assert (ink == digit_mask(f["digit"], h // 7)).mean() > 0.97
    assert s.qa() == [(t, S.QUESTIONS[t], f[t]) for t in ("colour", "shape", "direction", "digit")]


@pytest.mark.parametrize("index", range(6))
def test_needle_is_in_the_stated_frame_only(index):
    s = S.make_sample("needle", index, frames=32)
    colour = S.COLOURS[s.answer]
    counts = [_near(frame, colour).sum() for frame in s.frames]
    k = s.facts["needle_frame"]
    y, x, h, w = s.facts["marker_box"]
    assert counts[k] >= 0.95 * h * w
    assert max(c for i, c in enumerate(counts) if i != k) == 0


@pytest.mark.parametrize("index", range(6))
def test_order_first_colour_comes_first(index):
    s = S.make_sample("order", index, frames=30)
    i, j = s.facts["order_frames"]
    first, second = s.facts["order_colours"]
    assert s.answer == first and i < j and i < 10 and j >= 20  # first third vs last third
    assert _near(s.frames[i], S.COLOURS[first]).sum() > 100
    assert _near(s.frames[j], S.COLOURS[second]).sum() > 100


@pytest.mark.parametrize("index", range(8))
def test_count_matches_the_objects_drawn(index):
    s = S.make_sample("count", index, frames=2)
    n = S.ANSWERS["count"].index(s.answer) + 1
    boxes = s.facts["object_boxes"]
    assert len(boxes) == n
    for (y, x, h, w), colour in zip(boxes, s.facts["colours"]):
        assert _near(s.frames[0, y:y + h, x:x + w], S.COLOURS[colour]).mean() > 0.3
    for a in range(n):  # no two objects touch
        for b in range(a + 1, n):
            (ya, xa, h, w), (yb, xb, _, _) = boxes[a], boxes[b]
            assert abs(ya - yb) >= h or abs(xa - xb) >= w


@settings(max_examples=25, deadline=None)
@given(task=st.sampled_from(S.TASKS), index=st.integers(0, 10_000), frames=st.integers(2, 64),
       size=st.sampled_from([32, 48, 64, 96]))
def test_any_task_frames_and_size(task, index, frames, size):
    s = S.make_sample(task, index, frames=frames, size=size)
    assert s.frames.shape == (frames, size, size, 3) and s.frames.dtype == np.uint8
    assert s.answer in S.ANSWERS[task] and s.question == S.QUESTIONS[task]
    assert isinstance(s.caption, str) and s.caption


def test_background_and_noise_are_distractors():
    s = S.make_sample("needle", 0, frames=4)
    # Frames without the needle are not identical (camera noise) and not one flat colour (texture).
    others = [f for i, f in enumerate(s.frames) if i != s.facts["needle_frame"]]
    assert not np.array_equal(others[0], others[1])
    assert others[0].reshape(-1, 3).std(0).min() > 5


def test_benchmark_iterates_tasks_and_checks_arguments():
    items = list(S.benchmark(["colour", "needle"], per_task=3, frames=4))
    assert [i.task for i in items] == ["colour"] * 3 + ["needle"] * 3
    assert [i.index for i in items] == [0, 1, 2] * 2
    with pytest.raises(ValueError, match="tasks must be"):
        list(S.benchmark(["colour", "smell"]))
    with pytest.raises(ValueError, match="frames must be an int >= 2"):
        S.make_sample("direction", 0, frames=1)
    with pytest.raises(ValueError, match="multiple of 16"):
        S.make_sample("colour", 0, size=50)
    with pytest.raises(ValueError, match="split must be"):
        S.make_sample("colour", 0, split="val")
    with pytest.raises(ValueError, match="index must be"):
        S.make_sample("colour", -1)


def test_write_video_round_trip(tmp_path):
    from vlmcompress.video import read_video

    s = S.make_sample("digit", 1, frames=8)
    path = S.write_video(s.frames, tmp_path / "digit.mp4", fps=s.fps)
    clip = read_video(path, num_frames=8)
    assert clip.frames.shape == s.frames.shape
    assert np.abs(clip.frames.astype(int) - s.frames.astype(int)).mean() < 4
    with pytest.raises(ValueError, match="uint8"):
        S.write_video(s.frames.astype(np.float32), tmp_path / "x.mp4")
