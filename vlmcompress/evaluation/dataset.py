"""What an evaluation reads: items of (frames or image, question, accepted answers, task).

Two sources:

- the synthetic benchmark (:func:`synthetic_items`): held-out split, any tasks and frame count;
- a user's JSONL file (:func:`jsonl_items`), one object per line::

      {"video": "clips/a.mp4", "question": "What colour is the car?", "answer": "red"}
      {"image": "img/b.png", "question": "How many dogs?", "answers": ["two", "2"], "task": "count", "id": "b"}

  Paths are relative to the file's folder. A malformed line raises :class:`DatasetError` naming the
  file, the line number and what was wrong.

Every setting of one evaluation reads the same items, so the same sampled frames.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["EvalItem", "DatasetError", "synthetic_items", "jsonl_items", "normalise_answer"]


class DatasetError(ValueError):
    """A dataset file or line that cannot be read, with where and why."""


@dataclass(frozen=True)
class EvalItem:
    """One question about one video (uint8 ``[T, H, W, 3]`` `frames`) or one image (``[H, W, 3]``)."""

    id: str
    task: str
    question: str
    answers: tuple[str, ...]
    frames: np.ndarray | None = None
    image: np.ndarray | None = None
    fps: float = 4.0

    @property
    def kind(self) -> str:
        return "video" if self.frames is not None else "image"


def normalise_answer(text: str) -> str:
    """Lower case, surrounding whitespace and punctuation removed: what exact match compares."""
    return text.strip().lower().strip(string.punctuation + " \n\t")


def synthetic_items(tasks: Sequence[str] | None = None, *, per_task: int = 20, frames: int = 16, size: int = 64,
                    split: str = "test", start: int = 0) -> list[EvalItem]:
    """Items of :mod:`vlmcompress.synthetic` (held-out ``test`` split by default)."""
    from ..synthetic import TASKS, benchmark

    items = []
    for s in benchmark(tasks or TASKS, per_task=per_task, split=split, frames=frames, size=size, start=start):
        items.append(EvalItem(id=f"{s.task}-{s.index}-{frames}f", task=s.task, question=s.question,
                              answers=(s.answer,), frames=s.frames, fps=s.fps))
    return items


def _fail(path: Path, line: int, why: str) -> DatasetError:
    return DatasetError(f"{path}, line {line}: {why}")


def jsonl_items(path: str | Path, *, frames: int = 16) -> list[EvalItem]:
    """Items of a JSONL file; videos are read with `frames` frames spread over their whole length."""
    from ..video import read_video

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist")
    items = []
    for n, raw in enumerate(path.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _fail(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise _fail(path, n, f"expected a JSON object, got {type(rec).__name__}")
        media = [k for k in ("video", "image") if k in rec]
        if len(media) != 1:
            raise _fail(path, n, 'needs exactly one of "video" or "image" (a path)')
        question = rec.get("question")
        if not isinstance(question, str) or not question.strip():
            raise _fail(path, n, '"question" must be a non-empty string')
        answers = rec.get("answers", rec.get("answer"))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise _fail(path, n, '"answer" must be a non-empty string (or "answers" a non-empty list of strings)')
        file = Path(rec[media[0]])
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise _fail(path, n, f"{media[0]} file {file} does not exist")
        try:
            if media[0] == "video":
                clip = read_video(file, num_frames=frames)
                item_frames, image, fps = np.asarray(clip.frames), None, float(clip.sampled_fps)
            else:
                from PIL import Image

                item_frames, image, fps = None, np.asarray(Image.open(file).convert("RGB")), 1.0
        except Exception as e:  # decoder errors come in many types; name the file and line
            raise _fail(path, n, f"cannot read {media[0]} {file}: {e}") from None
        items.append(EvalItem(id=str(rec.get("id", f"line{n}")), task=str(rec.get("task", "all")), question=question,
                              answers=tuple(answers), frames=item_frames, image=image, fps=fps))
    if not items:
        raise DatasetError(f"dataset file {path} holds no items")
    return items
