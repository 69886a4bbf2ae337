"""Synthetic video QA: scenes with exactly known answers, one task per kind of information that
compression can destroy.

| task | what the video shows | what compression can destroy |
|---|---|---|
| ``colour`` | a small shape (S/4 across) crossing the frame | spatial detail of a small object |
| ``shape`` | the same scene | fine spatial structure |
| ``direction`` | the same scene | temporal order |
| ``digit`` | the same scene, plus a small white digit | OCR-like fine detail (most fragile) |
| ``count`` | 1–5 small static shapes | merging similar tokens fuses objects |
| ``needle`` | a marker (S/2 across) in one frame of a long video | uniform temporal pooling averages it away |
| ``order`` | two markers of different colours, one in the first third, one in the last | far-apart temporal order |

Every scene has a textured, low-saturation background and per-frame camera noise, so no global colour
gives an answer away. Answers are single words from a closed set (:data:`ANSWERS`), so accuracy is an
exact match. Everything is deterministic by seed: a sample is drawn from
``SeedSequence([split, task, index])``, so the train and test splits never share a seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .scenes import COLOURS, DIRECTIONS, SHAPES, add_noise, background, digit_mask, paint, shape_mask

__all__ = [
    "TASKS", "SCENE_TASKS", "ANSWERS", "QUESTIONS", "SPLITS", "Sample", "Scene",
    "make_scene", "make_sample", "benchmark", "scene_seed",
]

TASKS = ("colour", "shape", "direction", "count", "needle", "digit", "order")
# Which scene kind each task is asked about; one "object" scene answers four tasks.
SCENE_TASKS: dict[str, tuple[str, ...]] = {
    "object": ("colour", "shape", "direction", "digit"),
    "count": ("count",),
    "needle": ("needle",),
    "order": ("order",),
}
_TASK_SCENE = {task: kind for kind, tasks in SCENE_TASKS.items() for task in tasks}
_COUNT_WORDS = ("one", "two", "three", "four", "five")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "direction": DIRECTIONS,
    "count": _COUNT_WORDS,
    "needle": tuple(COLOURS),
    "digit": tuple("0123456789"),
    "order": tuple(COLOURS),
}
QUESTIONS: dict[str, str] = {
    "colour": "What colour is the moving shape?",
    "shape": "What shape is moving?",
    "direction": "Which way does the shape move?",
    "count": "How many shapes are there?",
    "needle": "What colour was the flash?",
    "digit": "What digit is shown?",
    "order": "Which colour flashed first?",
}
SPLITS = {"train": 0, "test": 1}
_MIN_FRAMES = {"object": 2, "count": 1, "needle": 1, "order": 2}


@dataclass(frozen=True)
class Scene:
    """One generated video and the facts it was drawn from.

    `frames` is uint8 ``[T, H, W, 3]`` RGB; `facts` maps each task the scene answers to its answer,
    plus drawing details (`needle_frame`, `order_frames`, `object_boxes`, `digit_box`, ...).
    """

    kind: str
    frames: np.ndarray
    facts: dict
    caption: str
    fps: float

    def qa(self) -> list[tuple[str, str, str]]:
        """``(task, question, answer)`` for every task this scene answers."""
        return [(t, QUESTIONS[t], self.facts[t]) for t in SCENE_TASKS[self.kind]]


@dataclass(frozen=True)
class Sample:
    """One benchmark item: a video, one question, its one-word answer."""

    task: str
    question: str
    answer: str
    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float
    caption: str
    facts: dict = field(repr=False)
    index: int = 0
    split: str = "test"

    @property
    def choices(self) -> tuple[str, ...]:
        return ANSWERS[self.task]


def scene_seed(split: str, key: str, index: int) -> np.random.SeedSequence:
    """The seed of item `index` of `key` (a task or scene kind) in `split` (disjoint across splits)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    names = TASKS + tuple(SCENE_TASKS)
    if key not in names:
        raise ValueError(f"task must be one of {TASKS}, got {key!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be an int >= 0, got {index!r}")
    return np.random.SeedSequence([SPLITS[split], names.index(key), int(index)])


def _check_video_args(kind: str, frames, size, fps) -> None:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < _MIN_FRAMES[kind]:
        raise ValueError(f"frames must be an int >= {_MIN_FRAMES[kind]} for {kind!r} scenes, got {frames!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 32 or size % 16:
        raise ValueError(f"size must be a multiple of 16 and >= 32 (pixels per side), got {size!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")


def _object_scene(rng, t_count: int, side: int):
    obj = side // 4
    margin = side // 16
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    direction = str(rng.choice(DIRECTIONS))
    digit = str(rng.integers(0, 10))
    far = side - obj - margin
    scale = max(1, side * 3 // 64)  # 15×21 px at 64: 7.7 % of the frame, strokes of 3 px
    dmask = digit_mask(digit, scale)
    dh, dw = dmask.shape
    horizontal = direction in ("left", "right")
    across = dh if horizontal else dw  # the digit's extent across the object's lane
    # The digit sits beside the object's lane (2 px apart), so the two never overlap: pick a lane that
    # leaves room on at least one side, then a side with room, then a place on that side.
    lanes = [l for l in range(margin, far + 1)
             if l - 2 - margin >= across or side - margin - (l + obj + 2) >= across]
    lane = int(rng.choice(lanes))
    sides = [(margin, lane - 2 - across)] if lane - 2 - margin >= across else []
    if side - margin - (lane + obj + 2) >= across:
        sides.append((lane + obj + 2, side - margin - across))
    lo, hi = sides[int(rng.integers(0, len(sides)))]
    along = int(rng.integers(margin, side - margin - (dw if horizontal else dh) + 1))
    cross = int(rng.integers(lo, hi + 1))
    top, left = (cross, along) if horizontal else (along, cross)
    travel = np.linspace(margin, far, t_count) if direction in ("right", "down") else np.linspace(far, margin, t_count)
    path = [(lane, int(round(v))) if horizontal else (int(round(v)), lane) for v in travel]
    bg = background(rng, side)
    video = np.repeat(bg[None], t_count, axis=0)
    mask = shape_mask(shape, obj)
    for t, (top_o, left_o) in enumerate(path):
        paint(video[t], dmask, top, left, (250, 250, 250))
        paint(video[t], mask, top_o, left_o, COLOURS[colour])
    facts = dict(colour=colour, shape=shape, direction=direction, digit=digit,
                 object_boxes=[(y, x, obj, obj) for y, x in path], digit_box=(top, left, dh, dw))
    caption = f"a {colour} {shape} moves {direction}; the digit {digit}"
    return video, facts, caption


def _count_scene(rng, t_count: int, side: int):
    n = int(rng.integers(1, 6))
    obj = max(6, side * 10 // 64)
    gap = max(2, side // 16)
    same = bool(rng.random() < 0.5)  # same-coloured shapes are what token merging may fuse
    base = str(rng.choice(list(COLOURS)))
    boxes: list[tuple[int, int]] = []
    tries = 0
    while len(boxes) < n:
        tries += 1
        if tries % 200 == 0:  # the boxes so far leave no room: start the layout again
            boxes = []
        y, x = (int(v) for v in rng.integers(gap, side - obj - gap + 1, size=2))
        if all(abs(y - by) >= obj + gap or abs(x - bx) >= obj + gap for by, bx in boxes):
            boxes.append((y, x))
    video = np.repeat(background(rng, side)[None], t_count, axis=0)
    colours, shapes = [], []
    for y, x in boxes:
        colour = base if same else str(rng.choice(list(COLOURS)))
        colours.append(colour)
        shapes.append(str(rng.choice(SHAPES)))
        mask = shape_mask(shapes[-1], obj)
        for t in range(t_count):
            paint(video[t], mask, y, x, COLOURS[colour])
    word = _COUNT_WORDS[n - 1]
    facts = dict(count=word, object_boxes=[(y, x, obj, obj) for y, x in boxes], colours=colours, shapes=shapes)
    return video, facts, f"{word} shape{'s' if n > 1 else ''}"


def _marker(rng, side: int):
    m = side // 2
    return m, int(rng.integers(0, side - m + 1)), int(rng.integers(0, side - m + 1))


def _needle_scene(rng, t_count: int, side: int):
    colour = str(rng.choice(list(COLOURS)))
    k = int(rng.integers(0, t_count))
    video = np.repeat(background(rng, side)[None], t_count, axis=0)
    m, y, x = _marker(rng, side)
    paint(video[k], np.ones((m, m), dtype=bool), y, x, COLOURS[colour])
    return video, dict(needle=colour, needle_frame=k, marker_box=(y, x, m, m)), f"a {colour} flash"


def _order_scene(rng, t_count: int, side: int):
    first, second = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    third = max(1, t_count // 3)
    i = int(rng.integers(0, third))
    j = int(rng.integers(max(i + 1, t_count - third), t_count))
    video = np.repeat(background(rng, side)[None], t_count, axis=0)
    boxes = []
    for frame, colour in ((i, first), (j, second)):
        m, y, x = _marker(rng, side)
        paint(video[frame], np.ones((m, m), dtype=bool), y, x, COLOURS[colour])
        boxes.append((y, x, m, m))
    return video, dict(order=first, order_frames=(i, j), order_colours=(first, second), order_boxes=boxes), \
        f"a {first} flash, then a {second} flash"


_DRAW = {"object": _object_scene, "count": _count_scene, "needle": _needle_scene, "order": _order_scene}


def make_scene(kind: str, seed, *, frames: int = 16, size: int = 64, fps: float = 4.0, noise: float = 5.0) -> Scene:
    """Draw one scene of `kind` (a key of :data:`SCENE_TASKS`) from `seed` (int or SeedSequence).

    `frames` frames of ``size × size`` pixels; the same arguments give the same bytes. The object's
    path spans the whole video whatever its length, so a 64-frame video shows the same motion as a
    16-frame one, more finely sampled.
    """
    if kind not in _DRAW:
        raise ValueError(f"kind must be one of {tuple(_DRAW)}, got {kind!r}")
    _check_video_args(kind, frames, size, fps)
    rng = np.random.default_rng(seed)
    video, facts, caption = _DRAW[kind](rng, int(frames), int(size))
    return Scene(kind=kind, frames=add_noise(video, rng, noise), facts=facts, caption=caption, fps=float(fps))


def make_sample(task: str, index: int, *, split: str = "test", frames: int = 16, size: int = 64,
                fps: float = 4.0) -> Sample:
    """Item `index` of `task` in `split`: a fresh scene (its own seed) and the task's question."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    scene = make_scene(_TASK_SCENE[task], scene_seed(split, task, index), frames=frames, size=size, fps=fps)
    return Sample(task=task, question=QUESTIONS[task], answer=scene.facts[task], frames=scene.frames,
                  fps=scene.fps, caption=scene.caption, facts=scene.facts, index=index, split=split)


def benchmark(tasks: Sequence[str] = TASKS, *, per_task: int = 20, split: str = "test", frames: int = 16,
              size: int = 64, fps: float = 4.0, start: int = 0) -> Iterator[Sample]:
    """Items ``start .. start + per_task - 1`` of every task in `tasks`, task by task (lazily drawn)."""
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(tasks)}")
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise ValueError(f"per_task must be an int >= 1, got {per_task!r}")
    for task in tasks:
        for i in range(start, start + per_task):
            yield make_sample(task, i, split=split, frames=frames, size=size, fps=fps)
