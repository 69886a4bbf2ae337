"""LLaVA-NeXT (``llava_next``) and LLaVA-NeXT-Video (``llava_next_video``).

Images are any-res: a base tile (a plain ``s×s`` grid) followed by the unpadded high-resolution tiles
with one ``image_newline`` token at the end of every row. That is no plain grid, so images go to the
pipeline with ``grid=None`` and are merged to the budget by bipartite matching (the identical newline
tokens are the first to merge with each other). LLaVA-NeXT-Video videos are a plain ``T×s'×s'`` grid
(each frame avg-pooled by the model's ``vision_resampler``, no newline tokens): pooling and temporal
merging apply directly. Positions are the LLM's own 1-D positions (Llama/Mistral/Vicuna RoPE).
"""
from __future__ import annotations

import math

import torch

from .base import EncodedItems, FamilyAdapter
from .registry import register
from .vision_merge import TowerOnlyMerge


@register
class LlavaNextAdapter(TowerOnlyMerge, FamilyAdapter):
    model_types = ("llava_next",)
    pixel_keys = {"image": ("pixel_values", "image_sizes")}
    trigger_keys = {"image": "pixel_values"}

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if modality != "image":
            raise ValueError(f"{type(self.model).__name__} takes images only, got {modality!r} inputs")
        out = self.base.get_image_features(
            pixel_values=kwargs["pixel_values"],
            image_sizes=kwargs["image_sizes"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
        )
        return image_items(list(out.pooler_output), self.tile_side())

    def item_frames(self, modality: str, kwargs: dict, index: int):
        return base_tile_frames(self, modality, kwargs, index)

    def tile_side(self) -> int:
        """Patches per side of one tile (``image_size // patch_size``)."""
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size


@register
class LlavaNextVideoAdapter(LlavaNextAdapter):
    model_types = ("llava_next_video",)
    pixel_keys = {"image": ("pixel_values", "image_sizes"), "video": ("pixel_values_videos",)}
    trigger_keys = {"image": "pixel_values", "video": "pixel_values_videos"}

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if modality == "image":
            return super().encode(modality, kwargs)
        pixels = kwargs["pixel_values_videos"]                   # [videos, T, 3, H, W]
        out = self.base.get_video_features(
            pixel_values_videos=pixels,
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
        )
        feats = list(out.pooler_output)                          # each [T * s'^2, C]
        frames = pixels.shape[1]
        return EncodedItems(feats, [frame_grid(f.shape[0], frames) for f in feats], [f.shape[0] for f in feats])


def base_tile_frames(adapter: FamilyAdapter, modality: str, kwargs: dict, index: int):
    """``FamilyAdapter.item_frames`` for any-res images ``pixel_values [N, tiles, 3, H, W]``: the base tile
    (tile 0, the whole image resized), the one picture of the full view; videos as the default."""
    pixels = kwargs.get("pixel_values")
    if modality == "image" and isinstance(pixels, torch.Tensor) and pixels.ndim == 5:
        kwargs = {**kwargs, "pixel_values": pixels[:, 0]}
    return FamilyAdapter.item_frames(adapter, modality, kwargs, index)


def image_items(feats: list[torch.Tensor], side: int) -> EncodedItems:
    """Any-res image features: ``grid=None`` (merged to the budget), except a single tile written as
    ``side×side`` grid tokens + one newline token, which is a grid with a kept tail."""
    grids, tails = [], []
    for f in feats:
        single = f.shape[0] == side * side + 1
        grids.append((1, side, side) if single else None)
        tails.append(1 if single else 0)
    return EncodedItems(feats, grids, [f.shape[0] for f in feats], keep_tail=tails)


def frame_grid(n: int, frames: int):
    """``(T, s, s)`` when ``n`` tokens are ``frames`` square frames in raster order, else ``None``."""
    if frames < 1 or n % frames:
        return None
    side = math.isqrt(n // frames)
    return (frames, side, side) if side * side * frames == n else None
