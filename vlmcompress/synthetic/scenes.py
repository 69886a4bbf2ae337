"""Drawing the synthetic videos: backgrounds, camera noise, small shapes, digits, one-frame markers.

Everything is numpy on float ``[T, H, W, 3]`` canvases in 0..255, quantised to uint8 at the end. Sizes
scale with the frame side ``S`` (defaults are for S = 64): a moving object is ``S/4`` across
(≤ 6.25 % of the frame), a digit ``S·15/64 × S·21/64``, a needle marker ``S/2`` across.
"""
from __future__ import annotations

import numpy as np

__all__ = ["COLOURS", "SHAPES", "DIRECTIONS", "background", "shape_mask", "digit_mask", "add_noise", "paint"]

# Saturated colours far from the grey, low-saturation background; white is kept for digits.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 50),
    "blue": (40, 80, 240),
    "yellow": (235, 220, 30),
    "purple": (160, 40, 210),
    "cyan": (30, 210, 220),
}
SHAPES = ("square", "circle", "triangle", "cross")
DIRECTIONS = ("left", "right", "up", "down")

# A 5×7 bitmap font for 0-9 (rows top to bottom, '#' = ink).
_FONT = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["####.", "....#", "....#", ".###.", "....#", "....#", "####."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
}


def background(rng: np.random.Generator, side: int) -> np.ndarray:
    """``[S, S, 3]`` float: a smooth, low-saturation colour texture around mid-dark grey.

    Its colour varies across the frame (so no global colour gives an answer away) but stays far less
    saturated than any object colour.
    """
    coarse = rng.normal(0.0, 1.0, size=(5, 5, 3))
    grey = rng.normal(0.0, 1.0, size=(5, 5, 1))
    field = 80.0 + 18.0 * grey + 10.0 * coarse  # luminance texture + weak chroma
    # Bilinear upsampling of the 5×5 field to S×S.
    idx = np.linspace(0, 4, side)
    i0 = np.clip(np.floor(idx).astype(int), 0, 3)
    frac = idx - i0
    rows = field[i0] * (1 - frac)[:, None, None] + field[i0 + 1] * frac[:, None, None]
    out = rows[:, i0] * (1 - frac)[None, :, None] + rows[:, i0 + 1] * frac[None, :, None]
    fine = rng.normal(0.0, 6.0, size=(side, side, 1))  # static grain: a texture, not camera noise
    return np.clip(out + fine, 20.0, 150.0)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """``[size, size]`` bool mask of `shape` (one of :data:`SHAPES`)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2.0
    if shape == "square":  # a 1-px margin, like the other shapes, so all fill the same box
        return np.pad(np.ones((size - 2, size - 2), dtype=bool), 1)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2.0 - 0.5) ** 2
    if shape == "triangle":  # apex up
        return (yy >= 1) & (np.abs(xx - c) <= (yy - 1) / 2.0 + 0.5) & (yy <= size - 1)
    if shape == "cross":
        arm = max(1, size // 6)
        return (np.abs(xx - c) <= arm) | (np.abs(yy - c) <= arm)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def digit_mask(digit: str, scale: int) -> np.ndarray:
    """``[7·scale, 5·scale]`` bool mask of a digit '0'..'9'."""
    if digit not in _FONT:
        raise ValueError(f"digit must be one of '0'..'9', got {digit!r}")
    bits = np.array([[ch == "#" for ch in row] for row in _FONT[digit]], dtype=bool)
    return np.kron(bits, np.ones((scale, scale), dtype=bool))


def paint(frame: np.ndarray, mask: np.ndarray, top: int, left: int, colour) -> None:
    """Paint `colour` into `frame` (``[H, W, 3]`` float, in place) where `mask` is set, at (top, left)."""
    h, w = mask.shape
    frame[top : top + h, left : left + w][mask] = np.asarray(colour, dtype=np.float64)


def add_noise(video: np.ndarray, rng: np.random.Generator, sigma: float = 5.0) -> np.ndarray:
    """Camera noise: independent Gaussian noise per frame and pixel, then uint8 ``[T, H, W, 3]``."""
    noisy = video + rng.normal(0.0, sigma, size=video.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
