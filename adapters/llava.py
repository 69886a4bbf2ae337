"""LLaVA 1.5 (``llava``): CLIP tower, MLP projector, one run of ``<image>`` tokens per image."""
from __future__ import annotations

import math

from .base import EncodedItems, FamilyAdapter
from .registry import register


@register
class LlavaAdapter(FamilyAdapter):
    model_types = ("llava",)
    pixel_keys = {"image": ("pixel_values", "image_sizes")}
    trigger_keys = {"image": "pixel_values"}

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        out = self.base.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=kwargs.get("vision_feature_layer"),
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            image_sizes=kwargs.get("image_sizes"),
        )
        feats = list(out.pooler_output)
        return EncodedItems(feats, [square_grid(f.shape[0]) for f in feats], [f.shape[0] for f in feats])


def square_grid(n: int):
    """``(1, s, s)`` when ``n`` patch tokens form a square grid (CLS dropped), else ``None``."""
    side = math.isqrt(n)
    return (1, side, side) if side * side == n else None
