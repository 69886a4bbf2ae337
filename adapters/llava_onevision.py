"""LLaVA-OneVision (``llava_onevision``): SigLIP tower, Qwen2 LLM, any-res images, pooled video frames.

Images are handled as in LLaVA-NeXT (``llava_next.image_items``): any-res images with row-end newline
tokens are merged to the budget (``grid=None``); an image written as a single base tile (several
images in one sample, ``batch_num_images > 1``) is a ``s×s`` grid plus one newline token kept as is.

A video is ``T`` frames of ``ceil(s/2)×ceil(s/2)`` bilinearly pooled tokens followed by **one**
``image_newline`` token for the whole video. The frames are a plain ``T×H×W`` grid (pooling and
temporal merging apply) and the newline token is kept unchanged after them (``keep_tail=1``).

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

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
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
        return base_tile_frames(self, modality, kwargs, index)

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
