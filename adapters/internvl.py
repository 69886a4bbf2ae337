"""InternVL 3.x in Hugging Face format (``internvl``): InternViT, pixel shuffle, MLP projector, Qwen2/Llama LLM.

What the processor writes (transformers 5.x):

- An image is cut into tiles (``crop_to_patches``; a thumbnail tile is added when there are several)
  and written as ``<img>`` + ``image_seq_length · tiles`` × ``<IMG_CONTEXT>`` + ``</img>``. Every tile
  gives ``s×s`` tokens (the ViT's patch grid after the 2×2 pixel shuffle, rows in raster order), so the
  features of a block are ``tiles`` separate ``s×s`` grids.
- A video of ``T`` frames is written as the lines ``Frame{i}: <img>`` + ``s²`` × ``<IMG_CONTEXT>`` +
  ``</img>`` and its frames are merged into ``pixel_values``: the model sees every frame as a one-tile
  **image** (``image_token_id``, ``get_image_features``); there is no video token in the model.
- ``forward`` reads ``mm_encoder_outputs["image"].pooler_output`` as one tensor and scatters its rows,
  flattened, into the ``<IMG_CONTEXT>`` slots.

How the items reach the pipeline:

- a one-tile image: grid ``(1, s, s)``: pooling applies;
- a multi-tile image: ``grid=None``, merged to the budget by bipartite matching (pooling the tiles as if
  they were frames would average different parts of the picture, and the thumbnail with them);
- a video: when the processor is known (``patch(model, config, processor=processor)``), consecutive
  one-tile blocks of a row that are separated exactly by the processor's ``</img>\\nFrame{i}: <img>``
  text form one item with grid ``(T, s, s)``, so temporal merging works across frames (a compressed
  token goes to the block of its first source frame, each frame keeps its own ``<img>`` block). Without
  the processor the adapter cannot tell frames from separate images and every frame is compressed on
  its own, as a one-tile image (pooling applies, temporal merging does not).

The compressed features are handed over as one ``[ΣM, 1, C]`` tensor (one row per token), which
``forward`` flattens as it does its own output and which ``generate()`` can split per sample when it
repeats rows for ``num_beams`` / ``num_return_sequences``. Positions are the LLM's own 1-D positions.
Reports list video frames under the modality ``"image"``, as the model does.

Stage A (merging inside the ViT) runs tower-only: see ``VISION_MERGE_NOTE``.
"""
from __future__ import annotations

import math

import torch

from .base import EncodedItems, FamilyAdapter
from .registry import register
from .vision_merge import TowerOnlyMerge

VISION_MERGE_NOTE = (
    "InternVL's ViT merges tokens (stage A) but its output is spread back to every patch before the "
    "model pixel-shuffles each 2×2 block of neighbouring patches into one token (the shuffle needs the full "
    "grid): the ViT runs on fewer tokens, the LLM reads the usual count. Compress after the projector "
    "(keep_ratio, token_budget, temporal merging) to shorten the LLM's input."
)


@register
class InternVLAdapter(TowerOnlyMerge, FamilyAdapter):
    model_types = ("internvl",)
    pixel_keys = {"image": ("pixel_values",)}
    trigger_keys = {"image": "pixel_values"}

    def __init__(self, model) -> None:
        super().__init__(model)
        self._markers: dict[int, list[int]] = {}     # frame number -> ids between frames (for _marker_owner)
        self._marker_owner = None

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if modality != "image":
            raise ValueError(f"{type(self.model).__name__} takes images (video frames arrive as images), "
                             f"got {modality!r} inputs")
        out = self.base.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            return_dict=True,
        )
        tiles = out.pooler_output                                    # [tiles, s², C]
        per_tile = tiles.shape[1]
        flat = tiles.reshape(-1, tiles.shape[-1])
        blocks = self._blocks(kwargs)
        if sum(n for _, _, n in blocks) != flat.shape[0]:
            raise ValueError(f"input_ids hold {sum(n for _, _, n in blocks)} image tokens (id "
                             f"{self.token_id('image')}) but pixel_values give {flat.shape[0]} features "
                             f"({tiles.shape[0]} tiles × {per_tile}): pass the processor outputs unchanged")
        side = math.isqrt(per_tile)
        square = side * side == per_tile
        items = self._group_frames(kwargs["input_ids"], blocks, per_tile)
        feats, grids, counts = [], [], []
        start = 0
        for group in items:
            n = sum(blocks[k][2] for k in group)
            feats.append(flat[start:start + n])
            start += n
            counts.append(n)
            # Frames (and one-tile images) are s×s grids; several tiles of one image are not one grid.
            one_tile = all(blocks[k][2] == per_tile for k in group)
            grids.append((len(group), side, side) if square and one_tile else None)
        return EncodedItems(feats, grids, counts)

    def item_frames(self, modality: str, kwargs: dict, index: int):
        """Tiles of item ``index`` from ``pixel_values [tiles, 3, H, W]``: a video's frames (one tile each),
        a one-tile image's tile, or a multi-tile image's last tile (the processor's thumbnail of the whole
        image; such items have no grid, so no scorer reads it today)."""
        from .frames import denormalise, pixel_processor

        pixels = kwargs.get("pixel_values")
        if modality != "image" or not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
            return None
        blocks = self._blocks(kwargs)
        total = sum(n for _, _, n in blocks)
        if total % pixels.shape[0]:
            return None
        per_tile = total // pixels.shape[0]
        first = [0]
        for _, _, n in blocks:
            first.append(first[-1] + n // per_tile)
        group = self._group_frames(kwargs["input_ids"], blocks, per_tile)[index]
        if len(group) == 1 and first[group[0] + 1] - first[group[0]] > 1:
            tiles = [first[group[0] + 1] - 1]
        else:
            tiles = [first[k] for k in group]
        # A group of several frames is a video: its frames went through the processor's video_processor.
        which = "video" if len(group) > 1 else "image"
        return denormalise(pixels[tiles], pixel_processor(self.processor, which), what=f"image {index}")

    def encoder_output(self, modality: str, features: list[torch.Tensor], kwargs: dict):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        # One row per token: `forward` flattens it, and generate()'s expansion for beams/returned sequences
        # finds every sample's boundary in the running token count (it splits pooler_output by rows).
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features).unsqueeze(1))

    # --- placeholder layout ----------------------------------------------------------------------
    def _blocks(self, kwargs: dict) -> list[tuple[int, int, int]]:
        """``(row, first column, length)`` of every run of ``<IMG_CONTEXT>`` among the real tokens, in
        placeholder order (the order of the tiles in ``pixel_values``)."""
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        hits = ids == self.token_id("image")
        if mask is not None:
            hits &= mask.bool()
        edge = torch.zeros(ids.shape[0], 1, dtype=torch.int8, device=ids.device)
        step = torch.diff(hits.to(torch.int8), prepend=edge, append=edge)   # +1 where a run starts, -1 after it
        out = []
        for row in range(ids.shape[0]):
            starts = torch.nonzero(step[row] == 1)[:, 0].tolist()
            ends = torch.nonzero(step[row] == -1)[:, 0].tolist()
            out += [(row, s, e - s) for s, e in zip(starts, ends)]
        return out

    def _group_frames(self, ids: torch.Tensor, blocks, per_tile: int) -> list[list[int]]:
        """Indices of ``blocks`` per item: the frames of one video together (see the module notes),
        every other block alone."""
        processor = self._processor()
        if processor is None:
            self._warn_frames_alone(blocks, per_tile)
        groups: list[list[int]] = []
        for k, (row, col, n) in enumerate(blocks):
            if groups and processor is not None and n == per_tile:
                prev = blocks[groups[-1][-1]]
                if prev[0] == row and prev[2] == per_tile:
                    gap = ids[row, prev[1] + prev[2]:col].tolist()
                    if gap == self._marker(processor, len(groups[-1]) + 1):
                        groups[-1].append(k)
                        continue
            groups.append([k])
        return groups

    def _warn_frames_alone(self, blocks, per_tile: int) -> None:
        """One warning per patched model (issue 9, defect 8): without the processor, frames cannot be grouped
        into a video, so a configured temporal merge would silently do nothing."""
        handle = getattr(self.model, "vlmcompress", None)
        config = getattr(handle, "config", None)
        if config is None or getattr(self, "_warned_frames", False):
            return
        from vlmcompress.steps import TemporalMerge

        rows = [row for row, _, n in blocks if n == per_tile]
        if any(isinstance(s, TemporalMerge) for s in config.stage_b_steps()) and len(rows) != len(set(rows)):
            self._warned_frames = True
            import warnings

            warnings.warn("InternVL: temporal merging is configured but the model was patched without "
                          "processor=, so video frames cannot be told from separate images and each frame is "
                          "compressed alone (no temporal merging). Use vlmcompress.patch(model, config, "
                          "processor=processor).", stacklevel=2)

    def _processor(self):
        """The processor given to ``patch(..., processor=)`` when it can write InternVL's frame text."""
        processor = self.processor
        if processor is None:
            return None
        tok = getattr(processor, "tokenizer", processor)
        for name in ("start_image_token", "end_image_token"):
            if getattr(processor, name, None) is None and getattr(tok, name, None) is None:
                return None
        return processor

    def _marker(self, processor, frame: int) -> list[int]:
        """Token ids between two frames of a video as InternVLProcessor writes them:
        ``</img>\\nFrame{frame}: <img>`` (special tokens split the text, so the piece between is tokenized
        on its own, as here)."""
        if processor is not self._marker_owner:
            self._markers, self._marker_owner = {}, processor
        if frame not in self._markers:
            tok = getattr(processor, "tokenizer", processor)
            start = getattr(processor, "start_image_token", None) or tok.start_image_token
            end = getattr(processor, "end_image_token", None) or tok.end_image_token
            self._markers[frame] = tok(f"{end}\nFrame{frame}: {start}", add_special_tokens=False)["input_ids"]
        return self._markers[frame]
