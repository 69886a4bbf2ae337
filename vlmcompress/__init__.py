"""vlmcompress: make vision-language models read fewer visual tokens, training-free.

Operators (pure functions on tensors, each with a plain PyTorch reference):
    TokenState, bipartite_soft_matching, temporal_matching, MergePlan, merge_schedule, tokens_after,
    size_log_bias, proportional_attention, prompt_guided_pool, grid_for_budget, relevance_from_embeddings,
    stretch_positional_embedding, v2pe_position_ids, rotary_cos_sin, merge_colors.
Stage B as plans (DESIGN.md §9; a step is ``step(state, grid, ctx) -> (Plan, grid or None)``):
    Plan, StepContext, apply_steps, PromptGuidedPool, MergeToBudget, TemporalMerge, UniformPool, RandomDrop;
    run any list of steps with ``CompressionConfig.from_steps(...)`` / ``CompressionConfig(steps=...)``.
Adapters (patch Hugging Face models in place):
    CompressionConfig, patch, unpatch, compressed, supported_model_types.

Heavy modules (transformers, open_clip, decord) are imported on first use, so ``import vlmcompress``
stays fast and a missing extra gives a clear message only where it is needed.
"""
from __future__ import annotations

import importlib

from .config import PRESETS, CompressionConfig
from .state import TokenState, grid_positions

__version__ = "0.1.0"

_LAZY = {
    # merging
    **dict.fromkeys(["MergePlan", "bipartite_soft_matching", "temporal_matching", "temporal_tokens_after",
                     "tome_merge", "unmerge_to_source"], "vlmcompress.merge"),
    **dict.fromkeys(["merge_schedule", "tokens_after"], "vlmcompress.schedule"),
    **dict.fromkeys(["size_log_bias", "combine_masks", "proportional_attention", "proportional_sdpa"],
                    "vlmcompress.attention"),
    **dict.fromkeys(["merge_colors", "palette"], "vlmcompress.visualize"),
    # pooling and relevance
    **dict.fromkeys(["prompt_guided_pool", "pool_bins", "grid_for_budget",
                     "pool_partition", "pool_plan"], "vlmcompress.pool"),
    **dict.fromkeys(["relevance_from_embeddings", "resize_relevance", "ClipRelevanceScorer", "tiny_clip_scorer"],
                    "vlmcompress.relevance"),
    **dict.fromkeys(["stretch_positional_embedding", "apply_long_context"], "vlmcompress.long_clip"),
    # positions
    **dict.fromkeys(["v2pe_position_ids", "v2pe_delta_for", "V2PE_DELTAS", "raster_offsets", "rotary_cos_sin",
                     "scale_visual_blocks"], "vlmcompress.positions"),
    # video
    **dict.fromkeys(["read_video", "iter_video_chunks", "VideoClip", "sample_frame_indices"], "vlmcompress.video"),
    # stage B as plans
    "Plan": "vlmcompress.plan",
    **dict.fromkeys(["StepContext", "apply_steps", "PromptGuidedPool", "MergeToBudget", "TemporalMerge", "UniformPool",
                     "RandomDrop"], "vlmcompress.steps"),
    **dict.fromkeys(["FrameSkip", "FrameSelection", "select_frames", "frame_proxy"], "vlmcompress.frame_skip"),
    # adapters
    **dict.fromkeys(["patch", "unpatch", "compressed", "is_patched", "supported_model_types", "CompressionReport",
                     "ItemReport"], "vlmcompress.adapters"),
}

# Subpackages reachable as attributes (``vc.models.load(...)``), imported on first use.
_SUBMODULES = ("models", "synthetic", "evaluation")
_LAZY["evaluate"] = "vlmcompress.evaluation"

__all__ = ["PRESETS", "CompressionConfig", "TokenState", "grid_positions", *_LAZY, *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        module = importlib.import_module(f"vlmcompress.{name}")
        globals()[name] = module
        return module
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmcompress' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
