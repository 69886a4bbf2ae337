"""Tiny, randomly initialised Hugging Face VLMs and matching processors, built entirely offline.

For the adapter tests, the demo's "tiny-random" model and the captioning command. Each family uses its
real `...ForConditionalGeneration` class, its real vision tower and its real processor classes, just
shrunk: LLM hidden 64 (4 heads of 16, 2 KV heads, 2 layers), vision hidden 32 (4 heads, 2 layers),
vocabulary ~576, images of 48–64 px with 8-px patches. Forward + generate take a few ms to ~0.1 s.
The tokenizer is a byte-level BPE trained locally (`vlmcompress.testing.tokenizer`). The weights are
random, so generated text is gibberish; the token bookkeeping is what these models are for.

    model, processor = tiny_model_and_processor("qwen2_vl")
    inputs = tiny_inputs("qwen2_vl", processor, kind="video", batch=2)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)

Per-family facts (transformers 5.24; "tokens" = placeholder tokens in `input_ids` = rows of features
that the model's own `get_image_features` / `get_video_features` returns):

- ``llava`` (LLaVA 1.5): CLIP tower, 48 px, patch 8 → 6×6 = 36 tokens per image at any input size
  (resize + centre crop). `vision_feature_select_strategy="default"` drops CLS, so the processor needs
  `num_additional_image_tokens=1` (as the real llava-hf checkpoints have); otherwise it writes one
  placeholder too few. `vision_feature_layer=-2`. Image token ``<image>``. **No video** in HF.
- ``llava_next`` (LLaVA-NeXT): CLIP tower, 48 px tiles, patch 8, anyres with
  pinpoints ``[[48, 96], [96, 48], [96, 96]]`` (H, W): a 48×48 image picks 48×96 (least waste), i.e.
  base tile + 1×2 tiles → 36 (base) + 6×6 (grid after removing the padding) + 6 (one
  ``image_newline`` per row) = 78 tokens; a 48×96 image gives 36 + 6×12 + 6 = 114. The count depends
  on the input image's size and aspect (the processor and model agree on it).
  `pixel_values` is ``[n_images, max_tiles, 3, 48, 48]`` plus `image_sizes`. **No video** in HF.
- ``llava_next_video``: as ``llava_next`` for images; a video of T frames is T × (6×6 avg-pooled by
  stride 2 → 3×3) = 9·T ``<video>`` tokens, no newline tokens. `pixel_values_videos` is
  ``[B, T, 3, 48, 48]``.
- ``llava_onevision``: SigLIP tower (no CLS, strategy "full", layer -1), 48 px, patch 8, anyres_max_9
  with pinpoints ``[[48, 48], [48, 96], [96, 48], [96, 96]]``: a 48×48 image gives 36 + 36 + 6 = 78
  tokens, a 48×96 image 114. A video of T frames gives T × 3×3 (bilinear pooling to ceil(6/2))
  **+ 1** trailing ``image_newline`` token for the whole video = 9·T + 1 ``<video>`` tokens.
- ``qwen2_vl`` / ``qwen2_5_vl``: Qwen2-VL / Qwen2.5-VL vision towers with patch 8, temporal patch 2,
  2×2 spatial merge (so sizes snap to multiples of 16 px; pixel limits 32²…96² per image/frame).
  A 64×64 image gives 8×8 patches → 16 tokens; a 48×80 image 15 tokens. A T-frame 48×48 video gives
  T/2 × 9 tokens (frames are paired by the temporal patch). Inputs carry ``image_grid_thw`` /
  ``video_grid_thw`` and **``mm_token_type_ids``** (0 text, 1 image, 2 video): 5.x refuses M-RoPE
  without it. Text `mrope_section` = [2, 3, 3] (sums to head_dim/2 = 8). Prompt layout:
  ``<|vision_start|>`` + N × ``<|image_pad|>`` (or ``<|video_pad|>``) + ``<|vision_end|>``.
  `pixel_values` / `pixel_values_videos` are flattened patches ``[Σ t·h·w, 3·2·8·8 = 384]``. In
  `get_rope_index`, each contiguous run of non-zero `mm_token_type_ids` consumes the next
  `*_grid_thw` row, so a shortened run needs the position function wrapped, not just the ids cut.
  Qwen2.5-VL's tower uses window attention (window 64 px = 4×4 merged tokens) in layer 0 and full
  attention in layer 1 (`fullatt_block_indexes=[1]`); its features come out in window order and are
  reordered back to raster order by the tower itself.
- ``qwen3_vl``: Qwen3-VL tower, patch 8 (real: 16), learned position table of 8×8 interpolated to
  the grid, one DeepStack layer (`deepstack_visual_indexes=[0]`): `get_image_features` also returns
  `deepstack_features`, per-token features that are *added* to the LLM hidden state after LLM layer 0
  at the visual positions — a compressor must compress them with the same indices. Text M-RoPE is
  interleaved, `mrope_section` = [4, 2, 2] with head_dim 16. Video: the processor writes each temporal
  group (2 frames) as its own ``<t seconds><|vision_start|>`` + 9 × ``<|video_pad|>`` +
  ``<|vision_end|>``, with timestamps as plain text, inside the template's outer
  vision_start/vision_end; `video_grid_thw` keeps one row per video, but the model splits it into
  per-frame rows with t=1 when computing positions. The video processor's default frame sampling
  (fps=2) is turned off here (`do_sample_frames=False`) so T frames in means T frames used.
- ``internvl`` (InternVL 3.x, HF format): InternVL ViT (CLS dropped), 64 px tiles, patch 8 → 8×8 →
  pixel shuffle 0.5 → 16 tokens per tile, each image written as ``<img>`` + 16·tiles ×
  ``<IMG_CONTEXT>`` + ``</img>``. Images are tiled (`crop_to_patches=True`, at most 4 tiles + a
  thumbnail tile when more than one): 64×64 → 1 tile (16 tokens), 64×128 → 2 tiles + thumbnail
  (48 tokens). Video: each frame is one 64×64 tile, written as ``Frame{i}: <img>`` + 16 ×
  ``<IMG_CONTEXT>`` + ``</img>`` lines; the processor merges the frames into `pixel_values`, so the
  model sees video frames as **images** (`image_token_id`, `get_image_features`); there is no
  `video_token_id` in the model config. `image_seq_length=16`.

Token ids: the BPE vocabulary has ids 0–511; the family's special tokens follow in the order of
``vlmcompress.testing.tokenizer.TOKENIZER_SPECS[family].special`` and the config's
`image_token_id` / `video_token_id` / `vision_start_token_id` ... are set from the tokenizer.
LLaVA-style families pad with ``<pad>`` and stop at ``</s>``; ChatML families pad with
``<|endoftext|>`` and stop at ``<|im_end|>``. Padding is on the left.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from .tokenizer import round_vocab, tiny_tokenizer


def _probe_hf_kernels_without_repo_root() -> None:
    """Evaluate transformers' cached ``is_kernels_available()`` with this checkout's root off `sys.path`.

    transformers probes for the optional Hugging Face ``kernels`` package with
    ``find_spec("kernels")``. When the repository root is on `sys.path` (``python -m pytest``,
    ``python -c`` or ``python -m ...`` run from the root), our top-level ``kernels/`` source folder is
    found instead, transformers imports it as a top-level package, and every config or model
    construction fails with "attempted relative import beyond top-level package". The check is
    `lru_cache`d, so answering it once without the root fixes it for the whole process.
    """
    import os
    import sys

    root = Path(__file__).resolve().parents[2]
    if not ((root / "pyproject.toml").is_file() and (root / "kernels" / "__init__.py").is_file()):
        return  # an installed package: nothing of ours can shadow `kernels`
    shadowing = [e for e in sys.path if Path(e or os.getcwd()).resolve() == root]
    if not shadowing or "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [e for e in saved if e not in shadowing]
    try:
        from transformers.utils.import_utils import is_kernels_available

        is_kernels_available()
    finally:
        sys.path[:] = saved


_probe_hf_kernels_without_repo_root()

__all__ = [
    "FAMILIES",
    "VIDEO_FAMILIES",
    "supports_video",
    "tiny_config",
    "tiny_model",
    "tiny_processor",
    "tiny_model_and_processor",
    "tiny_inputs",
    "save_tiny_checkpoint",
    "visual_feature_counts",
]

FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
)
# LLaVA 1.5 and LLaVA-NeXT have no video path in transformers (no video token, no video processor).
VIDEO_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f not in ("llava", "llava_next"))

# Sizes shared by every family.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
_VISION_HIDDEN, _VISION_HEADS, _VISION_LAYERS, _VISION_MLP = 32, 4, 2, 64
_PATCH = 8
_LLAVA_SIZE = 48  # LLaVA families: CLIP/SigLIP input side
_LLAVA_PINPOINTS = [[48, 96], [96, 48], [96, 96]]
_OV_PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]
_QWEN_MIN_PIXELS, _QWEN_MAX_PIXELS = 32 * 32, 96 * 96
_INTERNVL_SIZE = 64

# Default per-sample image sizes (H, W) used by `tiny_inputs`; sample i takes entry i % len. The second
# entry gives a different token count where the family's processing depends on size.
_IMAGE_SIZES: dict[str, list[tuple[int, int]]] = {
    "llava": [(48, 48), (60, 40)],
    "llava_next": [(48, 48), (48, 96)],
    "llava_next_video": [(48, 48), (48, 96)],
    "llava_onevision": [(48, 48), (48, 96)],
    "qwen2_vl": [(64, 64), (48, 80)],
    "qwen2_5_vl": [(64, 64), (48, 80)],
    "qwen3_vl": [(64, 64), (48, 80)],
    "internvl": [(64, 64), (64, 128)],
}
_VIDEO_SIZES: dict[str, tuple[int, int]] = {
    "llava_next_video": (48, 48),
    "llava_onevision": (48, 48),
    "qwen2_vl": (48, 48),
    "qwen2_5_vl": (48, 48),
    "qwen3_vl": (48, 48),
    "internvl": (64, 64),
}
_DEFAULT_PROMPTS = (
    "Describe this in one sentence.",
    "What is the man on the left doing, and what color is the car next to the tree?",
    "What happens?",
)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def supports_video(family: str) -> bool:
    """Whether `family` accepts video inputs in transformers (LLaVA 1.5 and LLaVA-NeXT do not)."""
    _check_family(family)
    return family in VIDEO_FAMILIES


def _ids(family: str) -> dict[str, int]:
    """Special-token ids of the family's tiny tokenizer, by token string, plus `vocab_size`."""
    tok = tiny_tokenizer(family)
    from .tokenizer import TOKENIZER_SPECS

    out = {t: tok.convert_tokens_to_ids(t) for t in TOKENIZER_SPECS[family].special}
    out["vocab_size"] = round_vocab(len(tok))
    return out


def _text_config(ids: dict[str, int], style: str, **extra: Any) -> dict[str, Any]:
    if style == "llava":
        special = dict(pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"])
    else:
        special = dict(
            pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]
        )
    return {**_TEXT, "vocab_size": ids["vocab_size"], **special, **extra}


def _clip_vision(image_size: int) -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        hidden_size=_VISION_HIDDEN,
        intermediate_size=_VISION_MLP,
        num_hidden_layers=_VISION_LAYERS,
        num_attention_heads=_VISION_HEADS,
        image_size=image_size,
        patch_size=_PATCH,
        projection_dim=_VISION_HIDDEN,
    )


@functools.lru_cache(maxsize=None)
def _cached_config(family: str):
    import transformers as tf

    ids = _ids(family)
    if family in ("llava", "llava_next", "llava_next_video"):
        kw: dict[str, Any] = dict(
            vision_config=_clip_vision(_LLAVA_SIZE),
            text_config={"model_type": "llama", **_text_config(ids, "llava")},
            image_token_index=ids["<image>"],
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            image_seq_length=(_LLAVA_SIZE // _PATCH) ** 2,
        )
        if family == "llava":
            return tf.LlavaConfig(**kw)
        kw["image_grid_pinpoints"] = _LLAVA_PINPOINTS
        if family == "llava_next":
            return tf.LlavaNextConfig(**kw)
        return tf.LlavaNextVideoConfig(
            **kw,
            video_token_index=ids["<video>"],
            spatial_pool_mode="average",
            spatial_pool_stride=2,
            video_seq_length=(_LLAVA_SIZE // _PATCH // 2) ** 2,
        )
    if family == "llava_onevision":
        return tf.LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=_VISION_HIDDEN,
                intermediate_size=_VISION_MLP,
                num_hidden_layers=_VISION_LAYERS,
                num_attention_heads=_VISION_HEADS,
                image_size=_LLAVA_SIZE,
                patch_size=_PATCH,
                vision_use_head=False,
            ),
            text_config={"model_type": "qwen2", **_text_config(ids, "chatml")},
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=_OV_PINPOINTS,
            vision_aspect_ratio="anyres_max_9",
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        qwen_ids = dict(
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        head_dim = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]
        # mrope_section splits head_dim/2 = 8 rotary pairs over (t, h, w); real [16, 24, 24]/64.
        mrope_text = _text_config(ids, "chatml", rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
        # The Qwen2.5-VL and Qwen3-VL towers share their shape; Qwen2-VL names its sizes differently.
        qwen_tower = dict(
            depth=_VISION_LAYERS,
            hidden_size=_VISION_HIDDEN,
            intermediate_size=_VISION_MLP,
            num_heads=_VISION_HEADS,
            out_hidden_size=_TEXT["hidden_size"],
            patch_size=_PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        if family == "qwen2_vl":
            return tf.Qwen2VLConfig(
                vision_config=dict(
                    depth=_VISION_LAYERS,
                    embed_dim=_VISION_HIDDEN,
                    hidden_size=_TEXT["hidden_size"],  # merger output = LLM width
                    mlp_ratio=2,
                    num_heads=_VISION_HEADS,
                    patch_size=_PATCH,
                    spatial_merge_size=2,
                    temporal_patch_size=2,
                ),
                text_config=mrope_text,
                **qwen_ids,
            )
        if family == "qwen2_5_vl":
            return tf.Qwen2_5_VLConfig(
                vision_config=dict(
                    qwen_tower,
                    window_size=4 * 2 * _PATCH,  # 4×4 merged tokens per window, as the real 112/(2·14)
                    fullatt_block_indexes=[1],
                    tokens_per_second=2,
                ),
                text_config=mrope_text,
                **qwen_ids,
            )
        return tf.Qwen3VLConfig(
            vision_config=dict(
                qwen_tower,
                num_position_embeddings=64,  # an 8×8 learned table, interpolated to each grid
                deepstack_visual_indexes=[0],
            ),
            text_config=_text_config(
                ids,
                "chatml",
                head_dim=head_dim,
                # interleaved M-RoPE: real [24, 20, 20] over 64 pairs; here 8 pairs.
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            ),
            **qwen_ids,
        )
    if family == "internvl":
        return tf.InternVLConfig(
            vision_config=dict(
                hidden_size=_VISION_HIDDEN,
                intermediate_size=_VISION_MLP,
                num_hidden_layers=_VISION_LAYERS,
                num_attention_heads=_VISION_HEADS,
                image_size=[_INTERNVL_SIZE, _INTERNVL_SIZE],
                patch_size=[_PATCH, _PATCH],
            ),
            text_config={"model_type": "qwen2", **_text_config(ids, "chatml")},
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=_internvl_seq_length(),
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
    raise AssertionError(family)


def _internvl_seq_length() -> int:
    return ((_INTERNVL_SIZE // _PATCH) // 2) ** 2


def tiny_config(family: str):
    """The tiny `PretrainedConfig` of `family` (a fresh copy)."""
    import copy

    _check_family(family)
    return copy.deepcopy(_cached_config(family))


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """A randomly initialised `...ForConditionalGeneration` of `family`, in eval mode, on the CPU.

    The same `seed` gives the same weights. Token ids in the config and `generation_config` match
    `tiny_processor(family)`.
    """
    from transformers import AutoModelForImageTextToText

    _check_family(family)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    config = tiny_config(family)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation)
    finally:
        torch.random.set_rng_state(state)
    model = model.to(dtype).eval()
    text = config.get_text_config()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = text.pad_token_id, text.eos_token_id, text.bos_token_id
    return model


def tiny_processor(family: str):
    """The family's real HF processor, configured for the tiny image size, with a tiny BPE tokenizer.

    Left padding; a chat template that writes the family's image/video placeholders.
    """
    _check_family(family)
    tok = tiny_tokenizer(family)
    template = tok.chat_template
    import transformers as tf

    if family in ("llava", "llava_next", "llava_next_video"):
        s = _LLAVA_SIZE
        common = dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s})
        llava_kw = dict(patch_size=_PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if family == "llava":
            return tf.LlavaProcessor(
                image_processor=tf.LlavaImageProcessor(**common), tokenizer=tok, chat_template=template, **llava_kw
            )
        image_processor = tf.LlavaNextImageProcessor(**common, image_grid_pinpoints=_LLAVA_PINPOINTS)
        if family == "llava_next":
            return tf.LlavaNextProcessor(
                image_processor=image_processor, tokenizer=tok, chat_template=template, **llava_kw
            )
        return tf.LlavaNextVideoProcessor(
            video_processor=tf.LlavaNextVideoVideoProcessor(**common),
            image_processor=image_processor,
            tokenizer=tok,
            chat_template=template,
            **llava_kw,
        )
    if family == "llava_onevision":
        s = _LLAVA_SIZE
        return tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(
                size={"height": s, "width": s}, image_grid_pinpoints=_OV_PINPOINTS
            ),
            tokenizer=tok,
            video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": s, "width": s}),
            num_image_tokens=(s // _PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
            chat_template=template,
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        qwen_kw = dict(
            patch_size=_PATCH,
            temporal_patch_size=2,
            merge_size=2,
            size={"shortest_edge": _QWEN_MIN_PIXELS, "longest_edge": _QWEN_MAX_PIXELS},
        )
        image_processor = tf.Qwen2VLImageProcessor(**qwen_kw)
        if family == "qwen3_vl":
            from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

            video_processor = Qwen3VLVideoProcessor(**qwen_kw, do_sample_frames=False, cap_pixels_per_frame=True)
            cls = tf.Qwen3VLProcessor
        else:
            video_processor = tf.Qwen2VLVideoProcessor(**qwen_kw, cap_pixels_per_frame=True)
            cls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        return cls(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=template
        )
    if family == "internvl":
        s = _INTERNVL_SIZE
        return tf.InternVLProcessor(
            image_processor=tf.GotOcr2ImageProcessor(
                size={"height": s, "width": s}, crop_to_patches=True, min_patches=1, max_patches=4
            ),
            tokenizer=tok,
            video_processor=tf.InternVLVideoProcessor(size={"height": s, "width": s}),
            image_seq_length=_internvl_seq_length(),
            chat_template=template,
        )
    raise AssertionError(family)


def tiny_model_and_processor(family: str, **model_kwargs: Any):
    """`(tiny_model(family, **model_kwargs), tiny_processor(family))`, with matching token ids."""
    return tiny_model(family, **model_kwargs), tiny_processor(family)


def save_tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny model + processor to `path` with `save_pretrained`; returns `path`.

    Reload offline with ``AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)`` and
    ``AutoProcessor.from_pretrained(path, local_files_only=True)`` (the same code path as real weights).
    """
    path = Path(path)
    model, processor = tiny_model_and_processor(family, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _random_image(rng: np.random.Generator, size: tuple[int, int]):
    from PIL import Image

    h, w = size
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _random_video(rng: np.random.Generator, frames: int, size: tuple[int, int]) -> np.ndarray:
    """A uint8 ``[T, H, W, 3]`` clip: a random background with a bright square moving to the right,
    so consecutive frames are similar but not identical (temporal merging has something to find)."""
    h, w = size
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    clip = np.repeat(base[None], frames, axis=0)
    side = max(h // 4, 1)
    for t in range(frames):
        x0 = (t * side // 2) % max(w - side, 1)
        clip[t, h // 3 : h // 3 + side, x0 : x0 + side] = 255
    return clip


def tiny_inputs(
    family: str,
    processor,
    *,
    kind: Literal["image", "video"] = "image",
    batch: int = 1,
    frames: int = 4,
    prompts: Sequence[str] | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    fps: float = 2.0,
    seed: int = 0,
):
    """Processor inputs (a `BatchFeature` of tensors) for a batch of one-turn chats, ready for
    ``model(**inputs)`` and ``model.generate(**inputs, max_new_tokens=...)``.

    Each sample is a user turn with one random image (PIL, `kind="image"`) or one random uint8
    ``[frames, H, W, 3]`` video (`kind="video"`) followed by a prompt; prompts default to texts of
    different lengths, and image sizes (H, W) cycle through `image_sizes` (default: a family-specific
    pair whose token counts differ where the family's processing allows; for video, one size for all).
    Videos come with metadata at `fps` frames per second (Qwen2.5-VL turns it into
    `second_per_grid_ts`, Qwen3-VL into the timestamps written in the prompt). Padding is on the left.

    Sample i's pixels come from ``seed + i``, so sample i of a batch equals a batch of one built with
    ``seed=seed + i``, ``prompts=[prompts[i]]`` and ``image_sizes=[its size]`` (batch-vs-single tests).
    """
    _check_family(family)
    if kind not in ("image", "video"):
        raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
    if kind == "video" and not supports_video(family):
        raise ValueError(f"family {family!r} has no video support in transformers; use kind='image'")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if prompts is None:
        prompts = [_DEFAULT_PROMPTS[i % len(_DEFAULT_PROMPTS)] for i in range(batch)]
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"prompts must have one entry per sample ({batch}), got {len(prompts)}")
    sizes = list(image_sizes) if image_sizes is not None else _IMAGE_SIZES[family]
    if not sizes:
        raise ValueError("image_sizes must not be empty")

    conversations = []
    for i, prompt in enumerate(prompts):
        rng = np.random.default_rng(seed + i)
        if kind == "image":
            block = {"type": "image", "image": _random_image(rng, tuple(sizes[i % len(sizes)]))}
        else:
            size = tuple(image_sizes[i % len(image_sizes)]) if image_sizes is not None else _VIDEO_SIZES[family]
            block = {"type": "video", "video": _random_video(rng, frames, size)}
        conversations.append([{"role": "user", "content": [block, {"type": "text", "text": prompt}]}])

    processor.tokenizer.padding_side = "left"
    processor_kwargs: dict[str, Any] = {"padding": True}
    if kind == "video":
        processor_kwargs["video_metadata"] = [
            dict(total_num_frames=frames, fps=float(fps), duration=frames / fps, frames_indices=list(range(frames)))
            for _ in range(batch)
        ]
    return processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs=processor_kwargs,
    )


def _call_with_inputs(fn, inputs, first: str) -> Any:
    """Call `fn(inputs[first], **{other inputs fn accepts by name})`."""
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in inputs.items() if k in params and k != first}
    return fn(inputs[first], **kwargs)


def _rows(features) -> int:
    if isinstance(features, torch.Tensor):
        return int(features.reshape(-1, features.shape[-1]).shape[0])
    return sum(_rows(f) for f in features)


@torch.no_grad()
def visual_feature_counts(model, inputs) -> dict[str, tuple[int, int]]:
    """For each modality in `inputs`: (placeholder tokens in `input_ids`, feature rows the model's own
    ``get_image_features`` / ``get_video_features`` returns). The two agree for every tiny family; this
    is the contract adapters rely on when they shrink placeholder runs.

    InternVL video frames arrive as images (see the module notes), so they count under "image".
    """
    config = model.config
    input_ids = inputs["input_ids"]
    out: dict[str, tuple[int, int]] = {}
    if "pixel_values" in inputs:
        feats = _call_with_inputs(model.get_image_features, inputs, "pixel_values")
        n_tokens = int((input_ids == config.image_token_id).sum())
        out["image"] = (n_tokens, _rows(feats.pooler_output))
    if "pixel_values_videos" in inputs:
        feats = _call_with_inputs(model.get_video_features, inputs, "pixel_values_videos")
        n_tokens = int((input_ids == config.video_token_id).sum())
        out["video"] = (n_tokens, _rows(feats.pooler_output))
    return out
