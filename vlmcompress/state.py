"""The record of visual tokens that every operator takes and returns.

Keeping ``size`` and ``pos`` with the features is what keeps later stages correct: proportional
attention needs ``size`` and position encoding needs ``pos`` (DESIGN.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._checks import as_int, check_int, check_tensor


@dataclass(frozen=True)
class TokenState:
    """Visual tokens with their bookkeeping.

    Attributes:
        x: ``[B, N, C]`` token features.
        size: ``[B, N]`` float, how many original patches each token stands for (starts at 1, always
            sums to the original count ``N0``).
        pos: ``[B, N, 3]`` float32 or wider, the (t, h, w) of each token in the original grid; a merged
            token sits at the size-weighted centroid of its sources.
        source: optional ``[B, N0]`` int64 index map: ``source[b, j]`` is the current token that holds
            original patch ``j``. ``None`` when not tracked.
    """

    x: torch.Tensor
    size: torch.Tensor
    pos: torch.Tensor
    source: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_tensor("x", self.x, ndim=3)
        b, n, _ = self.x.shape
        check_tensor("size", self.size, shape=(b, n))
        check_tensor("pos", self.pos, shape=(b, n, 3))
        if self.pos.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"pos must be float32 or float64 (lower precision breaks positions past a few hundred), got {self.pos.dtype}")
        if self.source is not None:
            check_tensor("source", self.source, ndim=2)
            if self.source.shape[0] != b or self.source.dtype != torch.int64:
                raise ValueError(f"source must be an int64 [B={b}, N0] index map, got {self.source.dtype} {tuple(self.source.shape)}")
        for name in ("size", "pos", "source"):
            value = getattr(self, name)
            if value is not None and value.device != self.x.device:  # the kernels would fail deep inside
                raise ValueError(f"{name} must be on x's device {self.x.device}, got {value.device}")

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def replace(self, **changes) -> "TokenState":
        return replace(self, **changes)

    @classmethod
    def from_features(
        cls,
        x: torch.Tensor,
        grid: tuple[int, int, int] | None = None,
        *,
        prefix: int = 0,
        track_source: bool = False,
    ) -> "TokenState":
        """Start a state from fresh, unmerged features.

        Args:
            x: ``[B, N, C]`` features.
            grid: ``(T, H, W)`` of the patch grid, raster order ``(t, h, w)``. ``None`` means one frame
                of ``N - prefix`` tokens laid out as ``(0, 0, i)``.
            prefix: number of leading non-grid tokens (a CLS token); they get position ``(0, 0, -1)``
                style placeholders ``(0, 0, -prefix + i)``.
            track_source: also start the ``source`` index map.
        """
        check_tensor("x", x, ndim=3)
        b, n, _ = x.shape
        check_int("prefix", prefix, minimum=0, maximum=n)
        count = n - prefix
        if grid is None:
            grid = (1, 1, count)
        sizes = [as_int(g) for g in grid] if isinstance(grid, (tuple, list, torch.Size)) else []
        if len(sizes) != 3 or any(g is None or g < 1 for g in sizes):
            raise ValueError(f"grid must be three positive ints (T, H, W), got {grid}")
        t, h, w = sizes
        if t * h * w != count:
            raise ValueError(f"grid {grid} holds {t * h * w} tokens but x has {count} grid tokens (N={n}, prefix={prefix})")
        pos = grid_positions((t, h, w), device=x.device)
        if prefix:
            head = torch.zeros(prefix, 3, device=x.device, dtype=pos.dtype)
            head[:, 2] = torch.arange(-prefix, 0, device=x.device, dtype=pos.dtype)
            pos = torch.cat([head, pos], 0)
        # fp32 whatever x is: bf16 counts are exact only up to 256, and merged groups grow past that.
        size = torch.ones(b, n, device=x.device, dtype=torch.float32)
        source = torch.arange(n, device=x.device).expand(b, n).clone() if track_source else None
        return cls(x=x, size=size, pos=pos.expand(b, n, 3).clone(), source=source)


def grid_positions(grid: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``[T*H*W, 3]`` (t, h, w) coordinates of a grid in raster order."""
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(
        torch.arange(t, device=device, dtype=dtype),
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack([tt, hh, ww], -1).reshape(-1, 3)
