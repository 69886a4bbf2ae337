"""Show which original patches ended in the same merged token.

Every patch is painted with the colour of the token that holds it (``state.source``), optionally
upsampled to the frame and blended over it. The palette depends only on the token index and the seed,
so the same merge always gives the same picture.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["merge_colors", "palette"]

_GOLDEN = 0.618033988749895


def palette(count: int, seed: int = 0) -> np.ndarray:
    """``[count, 3]`` uint8 colours, deterministic in ``seed``; neighbouring indices get distant hues.

    Hues step by the golden ratio (no two of the first few hundred colours are close), with three
    saturation/value levels cycling so that similar hues still differ in brightness.
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    offset = np.random.default_rng(seed).random()
    i = np.arange(int(count))
    hue = (offset + i * _GOLDEN) % 1.0
    sat = np.array([0.85, 0.55, 0.95])[i % 3]
    val = np.array([0.95, 0.85, 0.70])[i % 3]
    return np.round(_hsv_to_rgb(hue, sat, val) * 255).astype(np.uint8)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised ``colorsys.hsv_to_rgb``: arrays of ``[n]`` in ``[0, 1]`` → ``[n, 3]``."""
    sector = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
    ])                                                                  # [6, n, 3]
    return table[sector, np.arange(h.shape[0])]


def merge_colors(source, grid, *, frames=None, alpha: float = 0.5, seed: int = 0, prefix: int = 0,
                 borders: bool = False) -> np.ndarray:
    """Colour every original patch by the merged token it ended in.

    Args:
        source: ``[B, N0]`` int64 (tensor or array), ``source[b, j]`` = token holding patch ``j``
            (``TokenState.source``).
        grid: ``(H, W)`` for images or ``(T, H, W)`` for video; ``prod(grid) == N0 - prefix``.
        frames: optional uint8 ``[B, (T,) Hpix, Wpix, 3]`` (array or tensor). When given, the patch
            colours are upsampled (nearest) to ``Hpix × Wpix`` and blended over the frames.
        alpha: weight of the colours in the blend, in ``[0, 1]`` (``0`` returns the frames, ``1`` the
            colours).
        seed: palette seed.
        prefix: leading tokens of ``source`` that are not grid patches (a CLS token); skipped.
        borders: draw black lines where neighbouring pixels belong to different tokens.

    Returns:
        uint8 ``[B, (T,) Hpix, Wpix, 3]``; without frames ``Hpix, Wpix = H, W`` (one pixel per patch).
    """
    src = _as_numpy("source", source)
    if src.ndim != 2 or not np.issubdtype(src.dtype, np.integer):
        raise ValueError(f"source must be an integer [B, N0] index map, got {src.dtype} {src.shape}")
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3) or any(
            isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
        raise ValueError(f"grid must be (H, W) or (T, H, W) positive ints, got {grid!r}")
    if isinstance(prefix, bool) or not isinstance(prefix, (int, np.integer)) or prefix < 0:
        raise ValueError(f"prefix must be an int >= 0, got {prefix!r}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    video = len(grid) == 3
    t, h, w = (int(g) for g in grid) if video else (1, *(int(g) for g in grid))
    bsz, n0 = src.shape
    if n0 != prefix + t * h * w:
        raise ValueError(f"source has N0={n0} entries but grid {tuple(grid)} with prefix={prefix} needs {prefix + t * h * w}")
    if src.size and src.min() < 0:
        raise ValueError("source must hold non-negative token indices")

    ids = src[:, prefix:].reshape(bsz, t, h, w)
    if frames is None:
        hp, wp = h, w
        out_ids = ids
    else:
        frm = _as_numpy("frames", frames)
        want = (bsz, t) if video else (bsz,)
        if frm.dtype != np.uint8 or frm.ndim != len(want) + 3 or frm.shape[:len(want)] != want or frm.shape[-1] != 3:
            shape = "[B, T, Hpix, Wpix, 3]" if video else "[B, Hpix, Wpix, 3]"
            raise ValueError(f"frames must be uint8 {shape} with B={bsz}" + (f", T={t}" if video else "")
                             + f", got {frm.dtype} {frm.shape}")
        if not video:
            frm = frm[:, None]
        hp, wp = frm.shape[2], frm.shape[3]
        # Nearest patch for every pixel; also right when Hpix is not a multiple of H.
        rows = np.arange(hp) * h // hp
        cols = np.arange(wp) * w // wp
        out_ids = ids[:, :, rows][:, :, :, cols]

    colours = palette(int(src.max()) + 1 if src.size else 0, seed)[out_ids]      # [B, T, Hp, Wp, 3]
    if frames is not None:
        mixed = (1.0 - alpha) * frm.astype(np.float32) + alpha * colours.astype(np.float32)
        colours = np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    if borders:
        edge = np.zeros(out_ids.shape, dtype=bool)
        edge[..., :-1, :] |= out_ids[..., :-1, :] != out_ids[..., 1:, :]
        edge[..., :, :-1] |= out_ids[..., :, :-1] != out_ids[..., :, 1:]
        colours[edge] = 0
    return colours if video else colours[:, 0]


def _as_numpy(name: str, value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
