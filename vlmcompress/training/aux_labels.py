"""Deep supervision for the vision tower: what is drawn in each patch, from the scene's known layout.

The answer loss alone reaches the tower through the LLM's attention, which first has to find the
right tokens; it taught colour quickly but not shape or digit identity. This head reads the
projected patch features (OneVision: the projector's output, 8×8 per frame, before the model pools
them; Qwen2-VL: the merger's output, 4×4 per pair of frames) and predicts, per cell, the shape,
colour and digit drawn at the cell's centre (or nothing). It exists only during training.

A second linear head predicts each cell's row and column in its frame. Nothing else asks the
OneVision tower to keep where a patch is (its 1-D RoPE LLM cannot tell a frame's columns apart), and
after 3,500 steps a linear probe read a token's column from its LLM input at 33 % (chance 25 %), so no
token could tell which way the object moved. Qwen2-VL gets rows and columns from M-RoPE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..synthetic import COLOURS, SHAPES
from .heads import HookedHeads

__all__ = ["AuxHead", "cell_labels"]

_COLOURS = tuple(COLOURS)
_N = {"shape": 1 + len(SHAPES), "colour": 1 + len(_COLOURS), "digit": 11}
_MAX_CELLS = 8  # cells per side at 64-px frames (OneVision 8, Qwen2-VL 4)


def _elements(scene, t: int) -> list[tuple[tuple[int, int, int, int], dict]]:
    """``(box, labels)`` of everything drawn in frame `t` of `scene`."""
    f = scene.facts
    if scene.kind == "object":
        return [(f["object_boxes"][t], {"shape": f["shape"], "colour": f["colour"]}),
                (f["digit_box"], {"digit": f["digit"]})]
    if scene.kind == "count":
        return [(box, {"shape": s, "colour": c}) for box, s, c in zip(f["object_boxes"], f["shapes"], f["colours"])]
    if scene.kind == "needle":
        return [(f["marker_box"], {"colour": f["needle"]})] if t == f["needle_frame"] else []
    return [(box, {"colour": c}) for box, c, k in zip(f["order_boxes"], f["order_colours"], f["order_frames"]) if k == t]


def cell_labels(scene, t: int, cells: int) -> dict[str, torch.Tensor]:
    """Per-cell class indices (``[cells*cells]`` int64, 0 = nothing) of frame `t` on a ``cells × cells`` grid."""
    side = scene.frames.shape[1]
    step = side / cells
    out = {k: torch.zeros(cells * cells, dtype=torch.long) for k in _N}
    for (y, x, h, w), labels in _elements(scene, t):
        for i in range(cells):
            cy = (i + 0.5) * step
            if not y <= cy < y + h:
                continue
            for j in range(cells):
                cx = (j + 0.5) * step
                if x <= cx < x + w:
                    if "shape" in labels:
                        out["shape"][i * cells + j] = 1 + SHAPES.index(labels["shape"])
                    if "colour" in labels:
                        out["colour"][i * cells + j] = 1 + _COLOURS.index(labels["colour"])
                    if "digit" in labels:
                        out["digit"][i * cells + j] = 1 + int(labels["digit"])
    return out


class AuxHead(HookedHeads):
    """Linear heads on the patch features of `model` (forward hook): what is drawn per cell (``head``) and
    each cell's row and column (``position``, trained when ``position_weight > 0``)."""

    names = ("aux", "aux_position")

    def __init__(self, model, *, position_weight: float = 1.0):
        inner = model.model
        width = model.config.get_text_config().hidden_size
        self.kind = model.config.model_type
        if self.kind == "llava_onevision":
            module = inner.multi_modal_projector
        elif self.kind == "qwen2_vl":
            module = inner.visual.merger
        else:
            raise ValueError(f"no auxiliary labels for {self.kind!r}")
        super().__init__(module, torch.nn.Linear(width, sum(_N.values())), torch.nn.Linear(width, 2 * _MAX_CELLS),
                         position_weight)

    @property
    def position(self) -> torch.nn.Linear:
        return self.extra

    def loss(self, scenes) -> torch.Tensor | None:
        feats = self.take()
        if feats is None:
            return None
        labels: dict[str, list[torch.Tensor]] = {k: [] for k in _N}
        cells_per_frame = []
        for scene in scenes:
            t_count = scene.frames.shape[0]
            if self.kind == "llava_onevision":
                frames, cells = range(t_count), 8
            else:  # Qwen pairs frames in its temporal patch: label each pair by its first frame
                frames, cells = range(0, t_count, 2), 4
            for t in frames:
                for k, v in cell_labels(scene, t, cells).items():
                    labels[k].append(v)
                cells_per_frame.append(cells)
        target = {k: torch.cat(v) for k, v in labels.items()}
        logits = self.head(feats.reshape(-1, feats.shape[-1]))
        if logits.shape[0] != target["shape"].shape[0]:
            raise AssertionError(f"aux: {logits.shape[0]} patch features for {target['shape'].shape[0]} labels")
        parts = logits.split(list(_N.values()), dim=-1)
        total = logits.new_zeros(())
        for part, k in zip(parts, _N):
            # Most cells hold nothing: unweighted, "nothing everywhere" is a cheap minimum that teaches the
            # tower nothing about shapes (its hit rate on drawn cells stayed at 16 % after 350 steps).
            # Drawn cells get the full weight, empty ones a tenth.
            ce = F.cross_entropy(part.float(), target[k], reduction="none")
            drawn = target[k] > 0
            if drawn.any():
                total = total + ce[drawn].mean()
            total = total + 0.1 * ce[~drawn].mean()
        total = total / len(_N)
        if self.extra_weight > 0:
            where = torch.cat([torch.arange(c * c) for c in cells_per_frame])
            side = torch.cat([torch.full((c * c,), c) for c in cells_per_frame])
            pos = self.position(feats.reshape(-1, feats.shape[-1]).float())
            total = total + self.extra_weight * 0.5 * (
                F.cross_entropy(pos[:, :_MAX_CELLS], where // side) + F.cross_entropy(pos[:, _MAX_CELLS:], where % side))
        return total
