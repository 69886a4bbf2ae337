"""What a patched call did: token counts per image/video through the stages (``model.vlmcompress.report``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ItemReport:
    """Token counts of one image or video through the stages."""

    modality: str
    row: int
    placeholders: int      # tokens the processor reserved (what the LLM would read unpatched)
    after_vision: int      # tokens leaving the vision tower + projector (stage A)
    after_compress: int    # tokens reaching the LLM (stage B)
    grid: tuple | None = None           # (T, H, W) LLM-token grid of the item, when it has one
    source: torch.Tensor | None = None  # [placeholders] int64: which LLM token holds each original token (-1: dropped)
    size: torch.Tensor | None = None    # [after_compress] how many original tokens each one stands for
    skipped_frames: list[int] | None = None  # temporal units never encoded (FrameSkip before the tower)

    @property
    def kept_ratio(self) -> float:
        return self.after_compress / self.placeholders


@dataclass
class CompressionReport:
    """What the last patched call did; ``model.vlmcompress.report`` after a call."""

    items: list[ItemReport] = field(default_factory=list)
    prefill_before: list[int] = field(default_factory=list)   # per row, real (unpadded) tokens
    prefill_after: list[int] = field(default_factory=list)
    # [B, L'] float32, per token of the packed prompt: how many original tokens it stands for (1 for text
    # and padding). What proportional attention in the LLM adds log() of (adapters/llm_attention.py).
    token_size: torch.Tensor | None = None

    @property
    def visual_before(self) -> int:
        return sum(i.placeholders for i in self.items)

    @property
    def visual_after(self) -> int:
        return sum(i.after_compress for i in self.items)

    def summary(self) -> str:
        lines = [f"visual tokens {self.visual_before} -> {self.visual_after}; prefill per row "
                 f"{self.prefill_before} -> {self.prefill_after}"]
        for it in self.items:
            skipped = f", frames {it.skipped_frames} skipped before the tower" if it.skipped_frames else ""
            lines.append(f"  {it.modality} (row {it.row}): {it.placeholders} -> {it.after_vision} (vision) "
                         f"-> {it.after_compress} (LLM){skipped}")
        return "\n".join(lines)
