"""vlmcompress: make vision-language models read fewer visual tokens, training-free.

Operators (pure functions on tensors, each with a plain PyTorch reference):
    TokenState, bipartite_soft_matching, temporal_matching, MergePlan, merge_schedule, tokens_after,
    size_log_bias, proportional_attention, prompt_guided_pool, grid_for_budget, relevance_from_embeddings,
    stretch_positional_embedding, v2pe_position_ids, rotary_cos_sin, merge_colors.
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
    "MergePlan": "vlmcompress.merge",
    "bipartite_soft_matching": "vlmcompress.merge",
    "temporal_matching": "vlmcompress.merge",
    "unmerge_to_source": "vlmcompress.merge",
    "merge_schedule": "vlmcompress.schedule",
    "tokens_after": "vlmcompress.schedule",
    "size_log_bias": "vlmcompress.attention",
    "proportional_attention": "vlmcompress.attention",
    "merge_colors": "vlmcompress.visualize",
    # pooling and relevance
    "prompt_guided_pool": "vlmcompress.pool",
    "pool_kernel_stride": "vlmcompress.pool",
    "grid_for_budget": "vlmcompress.pool",
    "relevance_from_embeddings": "vlmcompress.relevance",
    "resize_relevance": "vlmcompress.relevance",
    "ClipRelevanceScorer": "vlmcompress.relevance",
    "stretch_positional_embedding": "vlmcompress.long_clip",
    # positions
    "v2pe_position_ids": "vlmcompress.positions",
    "rotary_cos_sin": "vlmcompress.positions",
    "scale_visual_blocks": "vlmcompress.positions",
    # video
    "read_video": "vlmcompress.video",
    "iter_video_chunks": "vlmcompress.video",
    # adapters
    "patch": "vlmcompress.adapters",
    "unpatch": "vlmcompress.adapters",
    "compressed": "vlmcompress.adapters",
    "is_patched": "vlmcompress.adapters",
    "supported_model_types": "vlmcompress.adapters",
    "CompressionReport": "vlmcompress.adapters",
}

__all__ = ["PRESETS", "CompressionConfig", "TokenState", "grid_positions", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vlmcompress' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
