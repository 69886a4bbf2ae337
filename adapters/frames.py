"""An item's pixels for relevance scorers that look at frames (``ClipRelevanceScorer``, DESIGN.md §3.2).

A CLIP scorer needs the frames, not the VLM's features: those are in the VLM's own space, not CLIP's.
The processor outputs already hold every item's frames, resized for the VLM and normalised; undoing
the normalisation gives them back in ``[0, 1]``. What this module offers:

- :func:`denormalise`: processor-normalised ``[T, 3, H, W]`` pixels → ``[0, 1]``;
- :func:`qwen_frames`: Qwen-VL's flattened patches of one item → its frames;
- :func:`as_scorer_frames`: any accepted frame layout → the ``[T, H, W, 3]`` a scorer's ``score`` takes.

Which pixels belong to which item is family knowledge: ``FamilyAdapter.item_frames`` (per family).
"""
from __future__ import annotations

import numpy as np
import torch


def pixel_processor(processor, modality: str):
    """The sub-processor that normalised ``modality``'s pixels (``video_processor`` for videos when the
    processor has one, else ``image_processor``), or ``processor`` itself when it is already one."""
    if processor is None:
        return None
    if modality == "video" and getattr(processor, "video_processor", None) is not None:
        return processor.video_processor
    return getattr(processor, "image_processor", None) or processor


def denormalise(pixels: torch.Tensor, image_processor, *, what: str = "pixels") -> torch.Tensor:
    """Undo ``rescale`` + ``normalize`` of a Hugging Face image/video processor.

    The processor computed ``(raw · rescale_factor − mean) / std`` from 0-255 pixels; this returns
    ``raw / 255`` (clamped to ``[0, 1]``), so a round trip is exact up to float rounding.

    Args:
        pixels: ``[..., 3, H, W]`` processor output.
        image_processor: the processor that made them (reads ``image_mean``, ``image_std``,
            ``do_normalize``, ``do_rescale``, ``rescale_factor``); ``None`` raises a ValueError that says
            to pass ``processor=`` to ``patch`` or ``relevance_frames=`` to ``generate``.

    Returns:
        float32 tensor of the same shape, in ``[0, 1]``.
    """
    if image_processor is None:
        raise ValueError(
            f"recovering the {what} for the relevance scorer needs the processor's image_mean/image_std: "
            "patch the model with vlmcompress.patch(model, config, processor=processor), or pass the frames "
            "yourself with model.generate(..., relevance_frames=[frames of each image/video])")
    x = pixels.detach().to(torch.float32)
    channels = x.shape[-3]
    if getattr(image_processor, "do_normalize", True):
        mean, std = (getattr(image_processor, k, None) for k in ("image_mean", "image_std"))
        if mean is None or std is None:
            raise ValueError(f"{type(image_processor).__name__} has no image_mean/image_std; pass "
                             "relevance_frames=[...] to generate() instead")
        shape = (channels, 1, 1)
        mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1).expand(shape)
        std = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1).expand(shape)
        x = x * std + mean
    if getattr(image_processor, "do_rescale", True):
        x = x / (float(getattr(image_processor, "rescale_factor", 1 / 255)) * 255.0)
    return x.clamp_(0.0, 1.0)


def qwen_frames(rows: torch.Tensor, grid_thw, *, patch_size: int, merge_size: int,
                temporal_patch_size: int) -> torch.Tensor:
    """Frames of one Qwen-VL item from its flattened patches (the inverse of the processors' ``patchify``).

    The Qwen2-VL image and video processors (and Qwen3-VL's) write row ``(t, bh, bw, mh, mw)`` — merge
    block ``(bh, bw)``, patch ``(mh, mw)`` inside it — as the channels ``(C, temporal, ph, pw)``.

    Args:
        rows: ``[t·h·w, C·temporal_patch_size·patch_size²]`` the item's slice of ``pixel_values(_videos)``.
        grid_thw: ``(t, h, w)`` its row of ``image_grid_thw`` / ``video_grid_thw`` (patch units).

    Returns:
        ``[t·temporal_patch_size, C, h·patch_size, w·patch_size]``, still normalised. An image is its
        frame repeated ``temporal_patch_size`` times; a video's last frame is repeated when its length
        was padded to a multiple of ``temporal_patch_size``.
    """
    t, h, w = (int(v) for v in grid_thw)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if rows.ndim != 2 or rows.shape[0] != t * h * w or rows.shape[1] % (tp * p * p):
        raise ValueError(f"rows must be [t*h*w={t * h * w}, C*{tp}*{p}*{p}] for grid {(t, h, w)}, got {tuple(rows.shape)}")
    if h % m or w % m:
        raise ValueError(f"grid {(t, h, w)} is not divisible by merge_size {m}")
    c = rows.shape[1] // (tp * p * p)
    x = rows.reshape(t, h // m, w // m, m, m, c, tp, p, p)
    # -> (t, tp, C, h/m, m, p, w/m, m, p)
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * tp, c, h * p, w * p)


def as_scorer_frames(frames, *, what: str = "frames"):
    """``[T, H, W, 3]`` frames for a scorer's ``score``, from any accepted layout.

    Accepts ``[T, H, W, 3]`` / ``[H, W, 3]`` (uint8 0-255 or float 0-1; tensors or arrays, e.g. decord's
    ``asnumpy()``) and channel-first float ``[T, 3, H, W]`` / ``[3, H, W]`` tensors in 0-1 (what
    ``item_frames`` returns). Channel-last is assumed when the last axis has 3 entries. uint8 stays uint8,
    so a long video is converted chunk by chunk by the scorer.
    """
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{what} must be a tensor or array of shape [T, H, W, 3] or [T, 3, H, W], "
                        f"got {type(frames).__name__}")
    if frames.ndim == 3:
        frames = frames.unsqueeze(0)
    if frames.ndim != 4 or 0 in frames.shape:
        raise ValueError(f"{what} must have shape [T, H, W, 3] or [T, 3, H, W], got {tuple(frames.shape)}")
    if frames.shape[-1] == 3:
        return frames
    if frames.shape[1] == 3:
        return frames.permute(0, 2, 3, 1)
    raise ValueError(f"{what} must have 3 colour channels ([T, H, W, 3] or [T, 3, H, W]), got {tuple(frames.shape)}")
