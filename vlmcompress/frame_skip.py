"""Frame skipping before the vision tower: near-duplicate sampled frames are never encoded.

The cost of the tower then follows what changes in a video, not its length. A skipped frame's
tokens count as merged into the tokens of the kept frame it duplicates: the kept token at ``(h, w)``
holds ``(t, h, w)`` of every frame it stands for, its ``size`` adds them up and its ``pos`` sits at their
centroid, so every later stage (pooling, merging, positions, the prefill plan) stays exact.

Pure functions on tensors, no model knowledge:

1. :func:`frame_proxy` — a cheap per-frame signature: the frame averaged over ``cell×cell`` pixel cells
   (Qwen's flattened patches: each patch's mean colour, :func:`patch_proxy`).
2. :func:`select_frames` — which frames (or groups of frames: Qwen encodes *temporal patches* of 2) to
   keep, by a distance threshold against the last kept frame, or by a budget of kept frames.
3. :func:`skip_plan` — the token-level plan on the item's ``T×H×W`` token grid that merges every skipped
   frame's tokens into its kept frame's (a :class:`vlmcompress.merge.MergePlan`, size-weighted), and
   :func:`expand_skipped` / :func:`skipped_state`, which put the encoded kept frames into that plan.

The count after skipping is ``len(kept) · H · W``, known once the proxy is scored (before the tower).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_tensor
from .merge import MergePlan
from .state import TokenState, grid_positions

__all__ = ["FrameSelection", "FrameSkip", "expand_skipped", "frame_distances", "frame_proxy", "patch_proxy", "select_frames",
           "skip_plan", "skipped_state"]

# Distances are divided by the video's own spread (std of its proxy values) plus this, so the threshold
# means the same for uint8, [0, 1] and processor-normalised pixels, and a flat video does not divide by 0.
_EPS = 1e-6


@dataclass(frozen=True)
class FrameSelection:
    """Which frames (units of ``group`` frames) are encoded.

    Attributes:
        owner: per unit, the kept unit that stands for it (``owner[k] == k`` for a kept unit; a skipped unit
            points to the last kept unit before it).
        distance: per unit, its distance to the kept unit it was compared with (0 for unit 0).
        group: frames per unit (Qwen's ``temporal_patch_size``; 1 for per-frame towers).
    """

    owner: tuple[int, ...]
    distance: tuple[float, ...]
    group: int = 1

    @property
    def kept(self) -> list[int]:
        """Indices of the kept units, increasing."""
        return [k for k, o in enumerate(self.owner) if o == k]

    @property
    def skipped(self) -> list[int]:
        """Indices of the units that are not encoded."""
        return [k for k, o in enumerate(self.owner) if o != k]

    @property
    def num_units(self) -> int:
        return len(self.owner)

    def tokens_after(self, tokens_per_unit: int) -> int:
        """Tokens the kept units give, closed form: ``len(kept) · tokens_per_unit``."""
        return len(self.kept) * tokens_per_unit


def frame_proxy(frames: torch.Tensor, *, cell: int = 16, channels_last: bool | None = None) -> torch.Tensor:
    """A low-resolution signature of every frame: the mean over ``cell×cell`` pixel cells.

    Args:
        frames: ``[T, H, W, C]`` (channels last, e.g. uint8 decoded video) or ``[T, C, H, W]``; any real dtype.
        cell: cell side in pixels (``>= 1``); the proxy has ``ceil(H/cell)·ceil(W/cell)·C`` values.
        channels_last: the layout; ``None`` guesses ``[T, H, W, C]`` when the last axis has 1, 3 or 4 entries.

    Returns:
        ``[T, D]`` float32.
    """
    check_tensor("frames", frames, ndim=4)
    if isinstance(cell, bool) or not isinstance(cell, int) or cell < 1:
        raise ValueError(f"cell must be an int >= 1, got {cell!r}")
    if channels_last is None:
        channels_last = frames.shape[-1] in (1, 3, 4)
    x = frames.float()
    if channels_last:
        x = x.permute(0, 3, 1, 2)
    x = F.avg_pool2d(x, cell, ceil_mode=True)
    return x.flatten(1)


def patch_proxy(patches: torch.Tensor, grid: tuple[int, int, int], *, channels: int = 3) -> torch.Tensor:
    """Qwen-VL's flattened patches to a proxy per *temporal patch*: each patch's mean colour.

    Args:
        patches: ``[T·H·W, C·tp·p·p]`` rows of one video as the Qwen processor flattens them
            (``pixel_values_videos``), ``grid = (T, H, W)`` its ``video_grid_thw`` row (patch units).
        channels: ``C`` (3).

    Returns:
        ``[T, H·W·C]`` float32: the patch grid of each temporal patch, one mean per patch and channel.
    """
    check_tensor("patches", patches, ndim=2)
    t, h, w = (int(g) for g in grid)
    if patches.shape[0] != t * h * w or patches.shape[1] % channels:
        raise ValueError(f"patches {tuple(patches.shape)} do not match grid {grid} with {channels} channels")
    return patches.float().reshape(t, h * w, channels, -1).mean(-1).flatten(1)


def frame_distances(proxy: torch.Tensor) -> torch.Tensor:
    """``[T, T]`` mean absolute difference between proxies, over the video's spread (scale-free)."""
    check_tensor("proxy", proxy, ndim=2)
    spread = proxy.float().std(unbiased=False) + _EPS if proxy.numel() > 1 else torch.tensor(1.0)
    return torch.cdist(proxy.float(), proxy.float(), p=1) / proxy.shape[1] / spread


def select_frames(proxy: torch.Tensor, *, threshold: float | None = None, budget: int | None = None,
                  group: int = 1) -> FrameSelection:
    """Choose the frames (or units of ``group`` consecutive frames) to encode.

    Args:
        proxy: ``[T, D]`` per-frame signatures (:func:`frame_proxy`), or per-unit ones (:func:`patch_proxy`)
            with ``group=1``.
        threshold: skip a unit whose distance to the *last kept* unit is ``<= threshold`` (distance: mean
            absolute proxy difference over the video's spread; 0 for identical frames). Comparing with the
            last kept unit, not the previous one, stops a slow drift from being skipped forever.
        budget: instead, keep exactly ``min(budget, units)`` units: unit 0 and the ``budget - 1`` units that
            differ most from their predecessor (the scene changes); the others join the last kept unit
            before them.
        group: frames per unit: ``T`` must be a multiple (Qwen pads to ``temporal_patch_size``). A unit's
            proxy is its frames' proxies side by side.

    Exactly one of ``threshold`` and ``budget``.
    """
    check_tensor("proxy", proxy, ndim=2)
    if (threshold is None) == (budget is None):
        raise ValueError("select_frames needs exactly one of threshold= (a distance >= 0) or budget= (kept frames)")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an int >= 1 (frames per temporal patch), got {group!r}")
    if proxy.shape[0] == 0 or proxy.shape[0] % group:
        raise ValueError(f"{proxy.shape[0]} frames do not split into units of {group} (pad like the processor does)")
    units = proxy.float().reshape(proxy.shape[0] // group, -1)
    n = units.shape[0]
    dist = frame_distances(units)
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
                or not 0.0 <= threshold < math.inf:
            raise ValueError(f"frame-skip threshold must be a finite distance >= 0 (0 skips exact duplicates only), "
                             f"got {threshold!r}")
        owner, distance, last = [0], [0.0], 0
        for k in range(1, n):
            d = float(dist[k, last])
            if d <= threshold:
                owner.append(last)
            else:
                owner.append(k)
                last = k
            distance.append(d)
        return FrameSelection(tuple(owner), tuple(distance), group)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"frame-skip budget must be an int >= 1 (frames to encode), got {budget!r}")
    change = torch.cat([torch.full((1,), math.inf), dist.diagonal(1)])   # unit k vs unit k-1
    # stable sort: equal changes keep the earlier unit (unit 0 has +inf and is always kept)
    keep = sorted(change.argsort(descending=True, stable=True)[:budget].tolist())
    owner, last, kept = [], 0, set(keep)
    for k in range(n):
        last = k if k in kept else last
        owner.append(last)
    distance = [0.0] + [float(dist[k, owner[k - 1] if owner[k] != k else k - 1]) for k in range(1, n)]
    return FrameSelection(tuple(owner), tuple(distance), group)


def skip_plan(selection: FrameSelection, grid: tuple[int, int, int], device=None) -> MergePlan:
    """The token plan of a selection on an item's token grid ``(T, H, W)`` (``T`` = units).

    Token ``(t, h, w)`` goes to output ``rank(owner[t])·H·W + h·W + w``: the token at the same place in the
    kept unit that stands for ``t``. ``num_out = len(kept)·H·W``; outputs in raster order of the kept units.
    """
    t, h, w = (int(g) for g in grid)
    if t != selection.num_units:
        raise ValueError(f"grid {grid} has {t} temporal units but the selection has {selection.num_units}")
    rank = {k: i for i, k in enumerate(selection.kept)}
    frame_out = torch.tensor([rank[o] for o in selection.owner], dtype=torch.int64, device=device)
    dst = (frame_out[:, None] * (h * w) + torch.arange(h * w, device=device)).reshape(1, -1)
    return MergePlan(dst=dst, num_out=len(rank) * h * w)


def expand_skipped(features: torch.Tensor, selection: FrameSelection, grid: tuple[int, int, int]) -> torch.Tensor:
    """The kept units' tokens ``[len(kept)·H·W, C]`` spread to the full ``[T·H·W, C]`` grid: a skipped unit
    reads as a copy of the kept unit that stands for it (what it would have been if it were identical)."""
    t, h, w = (int(g) for g in grid)
    check_tensor("features", features, shape=(len(selection.kept) * h * w, None))
    rank = {k: i for i, k in enumerate(selection.kept)}
    rows = torch.tensor([rank[o] for o in selection.owner], device=features.device)
    index = (rows[:, None] * (h * w) + torch.arange(h * w, device=features.device)).flatten()
    return features.index_select(0, index)


def skipped_state(features: torch.Tensor, selection: FrameSelection, grid: tuple[int, int, int],
                  kept_source: torch.Tensor | None = None) -> TokenState:
    """The merge record of an item whose skipped units were never encoded.

    Args:
        features: ``[M, C]`` encoded tokens of the kept units (``M = len(kept)·H·W`` unless a merging
            tower gave fewer).
        selection: the kept units (:func:`select_frames`).
        grid: ``(T, H, W)`` token grid of the *whole* item (``T`` units).
        kept_source: optional ``[len(kept)·H·W]`` int64, the token of ``features`` holding each token of the
            kept units' grid (a merging tower's source map); ``None``: the identity (``M = len(kept)·H·W``).

    Returns:
        A batch-of-one :class:`TokenState`: ``x [1, M, C]`` = ``features``; ``size [1, M]`` the original
        tokens each stands for (its kept tokens plus those of the units it stands for); ``pos [1, M, 3]``
        float64 ``(t, h, w)`` centroid in the full grid (``t`` fractional when it holds several units);
        ``source [1, T·H·W]``. Without ``kept_source`` this equals merging the full grid, skipped units
        read as copies (:func:`expand_skipped`), with :func:`skip_plan`.
    """
    t, h, w = (int(g) for g in grid)
    if t != selection.num_units:
        raise ValueError(f"grid {grid} has {t} temporal units but the selection has {selection.num_units}")
    check_tensor("features", features, ndim=2)
    device = features.device
    hw = h * w
    if kept_source is None:
        kept_source = torch.arange(len(selection.kept) * hw, device=device)
    if kept_source.shape != (len(selection.kept) * hw,):
        raise ValueError(f"kept_source must be [{len(selection.kept) * hw}] (the kept units' grid), got {tuple(kept_source.shape)}")
    rank = {k: i for i, k in enumerate(selection.kept)}
    rows = torch.tensor([rank[o] for o in selection.owner], device=device)
    source = kept_source.to(device)[(rows[:, None] * hw + torch.arange(hw, device=device)).flatten()]
    m = features.shape[0]
    size = torch.bincount(source, minlength=m).to(torch.float32)
    if size.numel() != m or bool((size == 0).any()):
        raise ValueError(f"kept_source does not map onto the {m} features (every feature must hold a token)")
    pos = torch.zeros(m, 3, dtype=torch.float64, device=device).index_add_(
        0, source, grid_positions((t, h, w), device=device, dtype=torch.float64)) / size[:, None].double()
    return TokenState(features.unsqueeze(0), size.unsqueeze(0), pos.unsqueeze(0), source.unsqueeze(0))


@dataclass(frozen=True)
class FrameSkip:
    """Stage-B step (and pre-tower instruction): skip near-duplicate frames of a video.

    Put it first in ``CompressionConfig.from_steps(FrameSkip(threshold=0.05), ...)``. Adapters that can
    (LLaVA-OneVision per frame, on :func:`frame_proxy` of the processor's pixels; Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL per temporal patch, on :func:`patch_proxy`) apply it *before* the tower: skipped frames are
    not encoded, and the item reaches stage B with the merge record of :func:`skipped_state` (so this step
    then finds nothing left to do). In other families it runs here as a plan on the encoded tokens (no
    tower saving): proxies from the item's frames when they can be recovered, else from the tokens of
    each frame.

    Exactly one of:
        threshold: distance ``>= 0`` (mean absolute proxy difference over the video's spread) at or under
            which a frame counts as a duplicate of the last kept frame. 0 skips exact duplicates only.
        budget: frames (temporal patches) to encode per video.
    cell: proxy cell in pixels for :func:`frame_proxy`.
    """

    threshold: float | None = None
    budget: int | None = None
    cell: int = 16

    def __post_init__(self) -> None:
        # validate once, with the same messages as select_frames
        select_frames(torch.zeros(1, 1), threshold=self.threshold, budget=self.budget)
        if isinstance(self.cell, bool) or not isinstance(self.cell, int) or self.cell < 1:
            raise ValueError(f"FrameSkip: cell must be an int >= 1, got {self.cell!r}")

    def select(self, proxy: torch.Tensor, group: int = 1) -> FrameSelection:
        return select_frames(proxy, threshold=self.threshold, budget=self.budget, group=group)

    def __call__(self, state: TokenState, grid, ctx):
        from .plan import Plan

        n = state.num_tokens
        # No frames to tell apart, or the tokens already stand for more than themselves (skipped before the
        # tower, or merged there): nothing to do.
        if grid is None or int(grid[0]) <= 1 or round(float(state.size.sum())) != n:
            return Plan.identity(state.batch, n, state.x.device), grid
        t, h, w = (int(g) for g in grid)
        frames = None
        if getattr(ctx, "frames", None) is not None:
            try:
                frames = ctx.frames()
            except (ValueError, TypeError):   # frames not recoverable (no processor given): use the tokens
                frames = None
        if isinstance(frames, torch.Tensor) and frames.ndim == 4 and frames.shape[0] % t == 0:
            selection = self.select(frame_proxy(frames, cell=self.cell), group=frames.shape[0] // t)
        else:
            selection = self.select(ctx.metric(state)[0].reshape(t, -1))
        plan = skip_plan(selection, grid, device=state.x.device)
        return Plan.from_merge(plan), (len(selection.kept), h, w)
