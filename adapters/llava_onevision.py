"""LLaVA-OneVision (``llava_onevision``): SigLIP tower, Qwen2 LLM, any-res images, pooled video frames.

Images are handled as in LLaVA-NeXT (``llava_next.image_items``): any-res images with row-end newline
tokens are merged to the budget (``grid=None``); an image written as a single base tile (several
images in one sample, ``batch_num_images > 1``) is a ``s×s`` grid plus one newline token kept as is.

A video is ``T`` frames of ``ceil(s/2)×ceil(s/2)`` bilinearly pooled tokens followed by **one**
``image_newline`` token for the whole video. The frames are a plain ``T×H×W`` grid (pooling and
temporal merging apply) and the newline token is kept unchanged after them (``keep_tail=1``).

Frame skipping (a :class:`vlmcompress.frame_skip.FrameSkip` first in the steps) runs before the tower:
per video, the frames it keeps are encoded (the tower's cost follows what changes, not the length) and
the skipped ones count as merged into their kept frame (:func:`vlmcompress.frame_skip.skipped_state`);
the newline token stays the video's last token, at its own position.

``forward`` reads video features as one tensor (``pooler_output.flatten(0, 1)``), so the compressed
videos are handed over stacked ``[videos, M, C]`` when they have equal lengths and concatenated
``[1, ΣM, C]`` otherwise.
"""
from __future__ import annotations

import torch

from .base import EncodedItems, FamilyAdapter
from .llava_next import base_tile_frames, frame_grid, image_items
from .registry import register
from .vision_merge import TowerOnlyMerge


@register
class LlavaOnevisionAdapter(TowerOnlyMerge, FamilyAdapter):
    model_types = ("llava_onevision",)
    vision_protected = 0     # SigLIP has no CLS token
    pixel_keys = {"image": ("pixel_values", "image_sizes", "batch_num_images"),
                  "video": ("pixel_values_videos", "image_sizes_videos")}
    trigger_keys = {"image": "pixel_values", "video": "pixel_values_videos"}

    def install(self, config) -> None:
        super().install(config)
        from vlmcompress.frame_skip import FrameSkip

        steps = config.stage_b_steps()
        self._skip = steps[0] if steps and isinstance(steps[0], FrameSkip) else None
        self.frame_skips = []        # per video of the last call: its FrameSelection

    def _encode_skipping(self, kwargs: dict) -> EncodedItems:
        """Encode only the frames ``self._skip`` keeps, video by video; see the module docstring."""
        from vlmcompress.frame_skip import frame_proxy, skipped_state
        from vlmcompress.state import TokenState

        pixels = kwargs["pixel_values_videos"]                   # [videos, T, 3, H, W]
        frames = pixels.shape[1]
        feats, grids, placeholders, states, selections = [], [], [], [], []
        for v in range(pixels.shape[0]):
            selection = self._skip.select(frame_proxy(pixels[v], cell=self._skip.cell, channels_last=False))
            out = self.base.get_video_features(
                pixel_values_videos=pixels[v:v + 1, selection.kept],
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"))
            f = out.pooler_output[0]                             # [K * h * w + 1, C]
            kept = len(selection.kept)
            grid = frame_grid(f.shape[0] - 1, kept)
            if grid is None:
                raise RuntimeError(f"LLaVA-OneVision returned {f.shape[0]} video tokens for {kept} frames; "
                                   "this is a bug in vlmcompress")
            _, h, w = grid
            head = skipped_state(f[:-1], selection, (frames, h, w))
            tail_pos = torch.tensor([[[float(frames), 0.0, 0.0]]], dtype=torch.float64, device=f.device)
            # The newline token: one more feature, holding the one last original token, at (T, 0, 0), which the
            # raster map (grid_to_positions) sends to its own position right after the last frame.
            states.append(TokenState(
                f.unsqueeze(0), torch.cat([head.size, head.size.new_ones(1, 1)], 1), torch.cat([head.pos, tail_pos], 1),
                torch.cat([head.source, head.source.new_full((1, 1), kept * h * w)], 1)))
            feats.append(f)
            grids.append(grid)
            placeholders.append(frames * h * w + 1)
            selections.append(selection)
        self.frame_skips = selections
        return EncodedItems(feats, grids, placeholders, states, keep_tail=[1] * len(feats), frame_skips=selections)

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if modality == "video" and getattr(self, "_skip", None) is not None:
            return self._encode_skipping(kwargs)
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy")
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        if modality == "image":
            out = self.base.get_image_features(
                pixel_values=kwargs["pixel_values"],
                image_sizes=kwargs["image_sizes"],
                vision_feature_layer=layer,
                vision_feature_select_strategy=strategy,
                vision_aspect_ratio=kwargs.get("vision_aspect_ratio"),
                batch_num_images=kwargs.get("batch_num_images"),
            )
            return image_items(list(out.pooler_output), side)
        pixels = kwargs["pixel_values_videos"]                   # [videos, T, 3, H, W]
        out = self.base.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy)
        feats = list(out.pooler_output)                          # each [T * h * w + 1, C]
        frames = pixels.shape[1]
        grids = [frame_grid(f.shape[0] - 1, frames) for f in feats]
        return EncodedItems(feats, grids, [f.shape[0] for f in feats], keep_tail=[1] * len(feats))

    def item_frames(self, modality: str, kwargs: dict, index: int):
        frames = base_tile_frames(self, modality, kwargs, index)
        skips = getattr(self, "frame_skips", None)
        if modality == "video" and skips and index < len(skips) and frames is not None:
            return frames[skips[index].kept]   # the frames of the tokens stage B sees
        return frames

    def encoder_output(self, modality: str, features: list[torch.Tensor], kwargs: dict):
        if modality != "video":
            return super().encoder_output(modality, features, kwargs)
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if len({f.shape[0] for f in features}) == 1:
            return BaseModelOutputWithPooling(pooler_output=torch.stack(features))
        if _expansion(self.model, kwargs) > 1:
            # generate() would repeat the single concatenated tensor as a whole ([A+B, A+B]) while it
            # repeats the rows one by one ([A, A, B, B]): the features would land in the wrong rows.
            raise ValueError(
                "LLaVA-OneVision with vlmcompress: videos compressed to different token counts "
                f"({[f.shape[0] for f in features]}) cannot be combined with num_beams/num_return_sequences > 1; "
                "generate one sample at a time, or use temporal_keep/keep_ratio (equal counts) instead of "
                "temporal_threshold")
        return BaseModelOutputWithPooling(pooler_output=torch.cat(features).unsqueeze(0))


def _expansion(model, kwargs: dict) -> int:
    """How many times ``generate()`` will repeat each row (beams × returned sequences)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    returned = kwargs.get("num_return_sequences") or getattr(config, "num_return_sequences", None) or 1
    return int(beams) * int(returned)
