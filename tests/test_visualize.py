"""Merge visualisation: patches coloured by the token they ended in."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmcompress.merge import MergePlan, temporal_matching, tome_merge
from vlmcompress.state import TokenState
from vlmcompress.visualize import merge_colors, palette


def _merged_source(batch=2, grid=(1, 4, 6), prefix=0, r=(6, 4)):
    torch.manual_seed(0)
    n = prefix + grid[0] * grid[1] * grid[2]
    state = TokenState.from_features(torch.randn(batch, n, 8), grid, prefix=prefix, track_source=True)
    for step in r:
        state = tome_merge(state, step, protected=prefix)
    return state.source


def test_palette_is_deterministic_and_distinct():
    assert np.array_equal(palette(50, seed=3), palette(50, seed=3))
    assert not np.array_equal(palette(50, seed=3), palette(50, seed=4))
    colours = palette(64).astype(int)
    gaps = np.abs(colours[:, None] - colours[None]).sum(-1)
    assert gaps[~np.eye(64, dtype=bool)].min() > 0                  # no two of 64 tokens share a colour


def test_image_colours_follow_groups():
    source = _merged_source()
    img = merge_colors(source, (4, 6))
    assert img.shape == (2, 4, 6, 3) and img.dtype == np.uint8
    flat = img.reshape(2, 24, 3)
    src = source.numpy()
    for b in range(2):
        for i in range(24):
            for j in range(24):
                same_colour = np.array_equal(flat[b, i], flat[b, j])
                assert same_colour == (src[b, i] == src[b, j])
    assert np.array_equal(img, merge_colors(source.numpy(), (4, 6)))   # tensor or array, same picture


def test_blend_and_upsample_over_frames():
    source = _merged_source()
    frames = np.random.default_rng(0).integers(0, 256, (2, 8, 18, 3), dtype=np.uint8)   # 2×3 px patches
    assert np.array_equal(merge_colors(source, (4, 6), frames=frames, alpha=0.0), frames)
    full = merge_colors(source, (4, 6), frames=torch.from_numpy(frames), alpha=1.0)
    small = merge_colors(source, (4, 6))
    assert full.shape == (2, 8, 18, 3)
    assert np.array_equal(full, small.repeat(2, axis=1).repeat(3, axis=2))
    half = merge_colors(source, (4, 6), frames=frames, alpha=0.5)
    expect = np.round(0.5 * frames.astype(np.float32) + 0.5 * full.astype(np.float32))
    assert np.array_equal(half, expect.astype(np.uint8))


def test_non_multiple_frame_size_uses_nearest_patch():
    source = _merged_source()
    frames = np.zeros((2, 9, 13, 3), dtype=np.uint8)
    out = merge_colors(source, (4, 6), frames=frames, alpha=1.0)
    small = merge_colors(source, (4, 6))
    assert out.shape == (2, 9, 13, 3)
    assert np.array_equal(out[:, 0, 0], small[:, 0, 0]) and np.array_equal(out[:, -1, -1], small[:, -1, -1])


def test_video_with_prefix_and_borders():
    torch.manual_seed(1)
    t, h, w = 3, 2, 4
    x = torch.randn(1, 1, h * w, 8).expand(1, t, -1, -1).reshape(1, t * h * w, 8)
    x = torch.cat([torch.randn(1, 1, 8), x], 1)                            # a CLS token in front
    state = TokenState.from_features(x, (t, h, w), prefix=1, track_source=True)
    frames_in = state.x[:, 1:]
    plan = temporal_matching(frames_in, t, threshold=0.9)
    # the temporal plan is over the grid tokens; shift it past the CLS token to apply to the state
    dst = torch.cat([torch.zeros(1, 1, dtype=torch.long), plan.dst + 1], 1)
    state = MergePlan(dst=dst, num_out=plan.num_out + 1).merge(state)
    vid = merge_colors(state.source, (t, h, w), prefix=1)
    assert vid.shape == (1, t, h, w, 3)
    assert all(np.array_equal(vid[0, 0], vid[0, i]) for i in range(t))   # static: same colours every frame
    frames = np.full((1, t, 4, 8, 3), 255, dtype=np.uint8)
    lined = merge_colors(state.source, (t, h, w), prefix=1, frames=frames, alpha=1.0, borders=True)
    assert lined.shape == (1, t, 4, 8, 3)
    assert (lined[0, 0, 0, 1] == 0).all() and (lined[0, 0, 0, 0] != 0).any()   # a patch edge is black


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(grid=(4, 5)), ValueError, "needs 20"),
    (dict(grid=(4,)), ValueError, "grid must be"),
    (dict(grid=(4, 6), alpha=1.5), ValueError, "alpha must be in"),
    (dict(grid=(4, 6), frames=np.zeros((2, 8, 8, 3), dtype=np.float32)), ValueError, "frames must be uint8"),
    (dict(grid=(4, 6), frames=np.zeros((3, 8, 8, 3), dtype=np.uint8)), ValueError, "with B=2"),
    (dict(grid=(4, 6), frames=[[0]]), TypeError, "frames must be a numpy array"),
], ids=["grid-count", "grid-rank", "alpha", "frames-dtype", "frames-batch", "frames-type"])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        merge_colors(_merged_source(), **kwargs)


def test_bad_source():
    with pytest.raises(ValueError, match="integer"):
        merge_colors(np.zeros((2, 24), dtype=np.float32), (4, 6))
    with pytest.raises(TypeError, match="source must be"):
        merge_colors([[0, 1]], (1, 2))
