"""LLaVA 1.5 (``llava``): CLIP tower, MLP projector, one run of ``<image>`` tokens per image.

Stage A (``vision_keep < 1``) merges tokens inside the CLIP tower (:mod:`.vision_merge`) up to the
layer LLaVA reads (``vision_feature_layer``, -2); the projector then sees fewer tokens, and
``encode`` hands the merge record (size, patch-grid position, source) to the pipeline while the
placeholder counts stay what the processor wrote (576 for LLaVA-1.5 at 336 px).
"""
from __future__ import annotations

import math

from .base import EncodedItems, FamilyAdapter
from .registry import register


@register
class LlavaAdapter(FamilyAdapter):
    model_types = ("llava",)
    pixel_keys = {"image": ("pixel_values", "image_sizes")}
    trigger_keys = {"image": "pixel_values"}
    supports_vision_merge = True

    def __init__(self, model) -> None:
        super().__init__(model)
        self._vision = None      # the VisionMerge handle while stage A is installed
        self._patch_grid = None  # (1, H, W) patch grid of the last stage-A encode

    def install(self, config) -> None:
        super().install(config)
        if config.compresses_vision:
            from .vision_merge import install_vision_merge

            cfg = self.model.config
            # A CLS token leads CLIP's sequence; it never merges (ToMe protects it too).
            self._vision = install_vision_merge(self.base.vision_tower, config, protected=1,
                                                feature_layer=cfg.vision_feature_layer)

    def uninstall(self) -> None:
        if self._vision is not None:
            self._vision.remove()
            self._vision = None

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        cfg = self.model.config
        layer = kwargs.get("vision_feature_layer")
        strategy = kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
        if self._vision is not None:
            if strategy != "default" or kwargs.get("image_sizes") is not None:
                raise ValueError("vision_keep < 1 on LLaVA needs vision_feature_select_strategy='default' (CLS dropped) "
                                 "and no image_sizes; use keep_ratio / token_budget instead")
            self._vision.feature_layer = cfg.vision_feature_layer if layer is None else layer
        out = self.base.get_image_features(
            pixel_values=kwargs["pixel_values"],
            vision_feature_layer=layer,
            vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
            image_sizes=kwargs.get("image_sizes"),
        )
        feats = list(out.pooler_output)
        if self._vision is None:
            return EncodedItems(feats, [square_grid(f.shape[0]) for f in feats], [f.shape[0] for f in feats])
        # Merged features are no raster grid (grids None, so stage B merges rather than pools); the
        # merge record's positions are in the tower's patch grid, which grid_to_positions needs.
        states = self._vision.states
        self._patch_grid = self._vision.grid
        return EncodedItems(feats, [None] * len(feats), [s.source.shape[1] for s in states], states)

    def grid_to_positions(self, item_positions, grid_pos, grid):
        return super().grid_to_positions(item_positions, grid_pos, self._patch_grid if grid is None else grid)


def square_grid(n: int):
    """``(1, s, s)`` when ``n`` patch tokens form a square grid (CLS dropped), else ``None``."""
    side = math.isqrt(n)
    return (1, side, side) if side * side == n else None
