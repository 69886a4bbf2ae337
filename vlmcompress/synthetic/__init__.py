"""A synthetic video QA benchmark with exactly known answers (see :mod:`.tasks` for the task list).

    from vlmcompress import synthetic
    for s in synthetic.benchmark(["needle", "digit"], per_task=10, frames=64):
        print(s.question, s.answer, s.frames.shape)
    synthetic.write_video(s.frames, "needle.mp4", fps=s.fps)
"""
from .files import ffmpeg_binary, write_video
from .scenes import COLOURS, DIRECTIONS, SHAPES
from .tasks import (ANSWERS, QUESTIONS, SCENE_TASKS, SPLITS, TASKS, Sample, Scene, benchmark, make_sample,
                    make_scene, scene_seed)

__all__ = ["ANSWERS", "COLOURS", "DIRECTIONS", "QUESTIONS", "SCENE_TASKS", "SHAPES", "SPLITS", "TASKS", "Sample",
           "Scene", "benchmark", "ffmpeg_binary", "make_sample", "make_scene", "scene_seed", "write_video"]
