"""What the adapters assume about ``transformers`` beyond its documented API, and the versions tested.

The adapters attach to models as they are loaded, without forking them, so they rely on internals that a
release may change without notice. Each is listed in :data:`BEHAVIOURS` with where we rely on it and a
cheap *probe* (``probe() -> True`` when the installed release still behaves so; ``None`` where only the
adapter tests can tell). :func:`check_transformers_version` warns once per process when the installed
release is outside :data:`TESTED`; ``make test-newest-transformers`` runs the adapter tests (this module's
probes included, ``tests/test_compat.py``) against the newest release: an optional job, allowed to fail.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable

#: ``[low, high)`` of the transformers releases the adapter tests pass on.
TESTED = ("5.24.0", "5.25.0")


@dataclass(frozen=True)
class Behaviour:
    name: str
    used_by: str
    assumption: str
    probe: Callable[[], bool] | None = None


def _has(module: str, *path: str) -> Callable[[], bool]:
    """A probe: ``module`` imports and has attribute ``path[0].path[1]...``."""
    def probe() -> bool:
        try:
            obj = importlib.import_module(module)
        except ImportError:
            return False
        for name in path:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return probe


def _params(module: str, cls: str, method: str, *names: str) -> Callable[[], bool]:
    """A probe: ``cls.method`` takes every parameter in ``names``."""
    def probe() -> bool:
        import inspect

        try:
            fn = getattr(getattr(importlib.import_module(module), cls), method)
        except (ImportError, AttributeError):
            return False
        params = inspect.signature(fn).parameters
        return all(n in params for n in names)
    return probe


_LLAVA = "transformers.models.llava.modeling_llava"
_QWEN2 = "transformers.models.qwen2_vl.modeling_qwen2_vl"
_QWEN3 = "transformers.models.qwen3_vl.modeling_qwen3_vl"

BEHAVIOURS: tuple[Behaviour, ...] = (
    Behaviour("mm_encoder_outputs", "pipeline.prepare_inputs, every adapter's encoder_output",
              "the VLM forward accepts mm_encoder_outputs={'image'|'video': output with pooler_output} and "
              "scatters those features into the placeholders itself",
              _params(_LLAVA, "LlavaForConditionalGeneration", "forward", "mm_encoder_outputs")),
    Behaviour("generate pre-encodes pixels", "patching.generate",
              "generate() encodes pixel inputs into mm_encoder_outputs once before decoding, and slices them "
              "per row when it repeats rows (beams, num_return_sequences)"),
    Behaviour("get_placeholder_mask raises", "pipeline (placeholder runs shrink to the feature count)",
              "get_placeholder_mask raises when placeholder tokens and features differ in number",
              _has(_LLAVA, "LlavaModel", "get_placeholder_mask")),
    Behaviour("get_image_features / get_video_features", "adapters' encode",
              "base_model.get_image_features(...) / get_video_features(...) return an output whose "
              "pooler_output holds the projected features per item",
              _has(_LLAVA, "LlavaModel", "get_image_features")),
    Behaviour("get_rope_index signature", "qwen_vl.original_positions",
              "Qwen-VL get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, "
              "attention_mask) returns (positions [3, B, L], rope_deltas)",
              _params(_QWEN2, "Qwen2VLModel", "get_rope_index", "input_ids", "mm_token_type_ids",
                      "image_grid_thw", "video_grid_thw", "attention_mask")),
    Behaviour("rope_deltas", "qwen_vl.position_kwargs (manual decoding)",
              "Qwen-VL keeps model.model.rope_deltas between prefill and decoding and continues positions "
              "from it when no position_ids are passed"),
    Behaviour("4-row position_ids", "qwen_vl.position_kwargs",
              "Qwen-VL forward takes position_ids [4, B, L]: row 0 text positions, rows 1-3 t/h/w"),
    Behaviour("generate continues position_ids", "pipeline (1-D families), positions after prefill",
              "generate() continues given position_ids by last + 1 per decoding step"),
    Behaviour("float rotary positions", "stage C (V2PE)",
              "rotary embeddings multiply float position_ids by inv_freq without rounding them"),
    Behaviour("config._attn_implementation", "llm_attention, vision_merge",
              "config._attn_implementation names the attention back-end ('eager', 'sdpa', ...)",
              lambda: _config_attr("_attn_implementation")),
    Behaviour("accelerate _hf_hook / _old_forward", "vision_merge (towers split by device_map)",
              "accelerate's device hooks keep the original forward as module._old_forward next to _hf_hook"),
    Behaviour("CLIP/SigLIP encoder-layer forward", "vision_merge (stage A)",
              "CLIPEncoderLayer / SiglipEncoderLayer keep their pre-norm layout (layer_norm1, self_attn, "
              "layer_norm2, mlp) that the merging forward re-states",
              _has("transformers.models.clip.modeling_clip", "CLIPEncoderLayer")),
    Behaviour("InternVL encoder-layer forward", "vision_merge (stage A, InternVL)",
              "InternVLVisionLayer keeps layernorm_before/attention/lambda_1/layernorm_after/mlp/lambda_2",
              _has("transformers.models.internvl.modeling_internvl", "InternVLVisionLayer")),
    Behaviour("cache API", "llm_attention (decoding steps), tests' manual decoding",
              "the cache object's get_seq_length() gives the tokens already cached",
              _has("transformers.cache_utils", "DynamicCache", "get_seq_length")),
    Behaviour("all-ones mask dropped", "pipeline (1-D families, use_cache=False)",
              "transformers may drop an all-ones attention_mask; with position_ids that have gaps and no mask "
              "it then guesses packed sequences from the position gaps (issue 9, defect 3)"),
    Behaviour("Qwen3-VL DeepStack output", "qwen_vl (extras)",
              "Qwen3-VL's video/image features carry deepstack_features per tower tap",
              _has(_QWEN3, "BaseModelOutputWithDeepstackFeatures")),
)


def _config_attr(name: str) -> bool:
    try:
        from transformers import LlamaConfig
    except ImportError:
        return False
    return hasattr(LlamaConfig(), name)


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
        if not part.isdigit():       # 5.25.0.dev0, 5.25.0rc1: stop at the pre-release part
            break
    return tuple(out)


def in_tested_range(version: str) -> bool:
    low, high = (_version_tuple(v) for v in TESTED)
    return low <= _version_tuple(version) < high


_WARNED: set[str] = set()


def check_transformers_version(version: str | None = None) -> bool:
    """``True`` when ``version`` (default: the installed transformers) is in :data:`TESTED`; otherwise warn
    once per version per process, naming the range and this module, and return ``False``."""
    if version is None:
        import transformers

        version = transformers.__version__
    if in_tested_range(version):
        return True
    if version not in _WARNED:
        _WARNED.add(version)
        warnings.warn(f"vlmcompress was tested with transformers >={TESTED[0]},<{TESTED[1]}, found {version}: the "
                      f"adapters rely on {len(BEHAVIOURS)} undocumented behaviours (vlmcompress.adapters.compat."
                      "BEHAVIOURS); check the outputs, or run `make test-newest-transformers`.", stacklevel=3)
    return False
