"""Deep supervision inside the LLM: which way the object moves and how many shapes there are, read off
the visual tokens' hidden states.

Direction and count are relations between tokens (the object's place now against its places in earlier
frames; distinct objects among many cells), so the answer loss alone has to grow a comparison circuit
from one scalar per question; after 2,000 steps both shipped models still answered direction at chance.
This head gives that circuit a dense target. A linear head on the output of the LLM's middle layer
predicts, for

- an *object* scene: at each visual token of the second half of the video whose cell the object
  overlaps, the direction of motion (every earlier place of the object lies on the opposite side, so
  one attention read over the earlier frames plus the token's own place answers it);
- a *count* scene: at the last token of the first frame (or temporal patch) and every token after it,
  the number of shapes (each of them can attend to a whole frame);
- an *object* scene, every frame: at the tokens the object overlaps, its shape. The Qwen2-VL tower knew
  the shape (a probe voting over the object's cells: 83 %) while the answers stayed near 55 %: the LLM
  did not read it out of the partial views that four 16-px cells give of a 16-px shape.

Visual tokens are laid out frame by frame, 4×4 cells each (OneVision: the model's 2×2-pooled grid, then
one newline token per video; Qwen2-VL: the merger's grid per pair of frames). Like :mod:`.aux_labels`,
the head exists only during training; the shipped model is the plain HF model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..synthetic import ANSWERS, DIRECTIONS, SHAPES
from .heads import HookedHeads

__all__ = ["SceneHead", "scene_token_labels"]

_COUNTS = len(ANSWERS["count"])
_GRID = 4  # cells per side of a frame's (or frame pair's) visual tokens at 64-px frames


def _overlaps(box, cell: int, step: float, min_frac: float = 0.25) -> bool:
    y, x, h, w = box
    i, j = divmod(cell, _GRID)
    oy = max(0.0, min(y + h, (i + 1) * step) - max(y, i * step))
    ox = max(0.0, min(x + w, (j + 1) * step) - max(x, j * step))
    return oy * ox >= min_frac * step * step


def scene_token_labels(scene, frames_per_slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(direction, count, shape)`` int64 targets, one per visual token of `scene` (``-100`` = no target).

    `frames_per_slot` is 1 for OneVision and 2 for Qwen2-VL (temporal patch); a slot is the 4×4 grid of
    tokens of one frame or one pair of frames. The trailing newline token of OneVision is not included.
    """
    t_count = scene.frames.shape[0]
    slots = t_count // frames_per_slot
    cells = _GRID * _GRID
    step = scene.frames.shape[1] / _GRID
    direction = torch.full((slots * cells,), -100, dtype=torch.long)
    count = torch.full((slots * cells,), -100, dtype=torch.long)
    shape = torch.full((slots * cells,), -100, dtype=torch.long)
    f = scene.facts
    if scene.kind == "object":
        d = DIRECTIONS.index(f["direction"])
        for s in range(slots):
            frames = range(s * frames_per_slot, (s + 1) * frames_per_slot)
            for c in range(cells):
                if any(_overlaps(f["object_boxes"][t], c, step) for t in frames):
                    shape[s * cells + c] = SHAPES.index(f["shape"])
                    if frames[-1] >= t_count // 2:
                        direction[s * cells + c] = d
    elif scene.kind == "count":
        # The last token of the first slot is the first to have seen a whole frame; a video merged or
        # skipped down to one slot (a static scene) has only that one.
        count[cells - 1:] = ANSWERS["count"].index(f["count"])
    return direction, count, shape


class SceneHead(HookedHeads):
    """Linear heads on the visual tokens' hidden states after the LLM's middle layer (forward hook):
    direction and count (``head``), the object's shape (``shape_head``, when ``shape_weight > 0``)."""

    names = ("scene", "scene_shape")

    def __init__(self, model, visual_token_id: int, *, shape_weight: float = 1.0):
        self.kind = model.config.model_type
        if self.kind not in ("llava_onevision", "qwen2_vl"):
            raise ValueError(f"no scene labels for {self.kind!r}")
        layers = model.model.language_model.layers
        width = model.config.get_text_config().hidden_size
        self.visual_token_id = visual_token_id
        super().__init__(layers[len(layers) // 2], torch.nn.Linear(width, len(DIRECTIONS) + _COUNTS),
                         torch.nn.Linear(width, len(SHAPES)), shape_weight)

    @property
    def shape_head(self) -> torch.nn.Linear:
        return self.extra

    def loss(self, scenes, input_ids: torch.Tensor) -> torch.Tensor | None:
        hidden = self.take()
        if hidden is None:
            return None
        per_slot = 1 if self.kind == "llava_onevision" else 2
        feats, dirs, counts, shapes = [], [], [], []
        for b, scene in enumerate(scenes):
            d, c, s = scene_token_labels(scene, per_slot)
            where = (input_ids[b] == self.visual_token_id).nonzero().squeeze(1)[: d.shape[0]]
            if where.shape[0] != d.shape[0]:
                raise AssertionError(f"scene head: {where.shape[0]} visual tokens for {d.shape[0]} labels")
            feats.append(hidden[b, where])
            dirs.append(d)
            counts.append(c)
            shapes.append(s)
        feats = torch.cat(feats).float()
        logits = self.head(feats)
        dirs, counts, shapes = torch.cat(dirs), torch.cat(counts), torch.cat(shapes)
        total = logits.new_zeros(())
        parts = [(logits[:, :len(DIRECTIONS)], dirs, 1.0), (logits[:, len(DIRECTIONS):], counts, 1.0)]
        if self.extra_weight > 0:
            parts.append((self.shape_head(feats), shapes, self.extra_weight))
        for part, target, weight in parts:
            if (target >= 0).any():
                total = total + weight * F.cross_entropy(part, target, ignore_index=-100)
        return total
