"""Prompt-guided pooling (PPLLaVA; Liu et al. 2024): shrink a ``T×H×W`` token grid to any ``T'×H'×W'``.

Each output token is a softmax-weighted sum of the tokens in one 3-D window, the weights coming from
how relevant each token is to the user's question (:mod:`vlmcompress.relevance`). Without relevance it
is exactly ``avg_pool3d``. See DESIGN.md §3.2.

Windows, per axis (input size ``I``, output size ``O``)::

    stride = I // O,   kernel = I - (O - 1) * stride

so the ``O`` windows tile the whole axis, the last one ending exactly at ``I``. When ``I`` is not a
multiple of ``O`` the kernel is larger than the stride and neighbouring windows overlap (``I=5, O=2``:
windows ``[0, 3)`` and ``[2, 5)``). For ``I/2 < O < I`` the stride is 1 and the kernel ``I - O + 1``
(``24 → 15``: kernel 10), so each output averages many neighbours and the work grows with the overlap;
:func:`grid_for_budget` does not avoid such sizes.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import as_int, check_finite, check_tensor
from .state import TokenState

__all__ = ["pool_kernel_stride", "grid_for_budget", "prompt_guided_pool", "pool_coverage", "pool_partition", "pool_plan",
           "WindowMix"]

_AXES = ("t", "h", "w")


def _check_grid(name: str, grid) -> tuple[int, int, int]:
    """``grid`` as three positive ints ``(T, H, W)``, or a TypeError/ValueError naming ``name``."""
    if not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 3:
        raise TypeError(f"{name} must be a (T, H, W) tuple of three ints, got {grid!r}")
    out = []
    for axis, g in zip(_AXES, grid):
        v = as_int(g)
        if v is None:
            raise TypeError(f"{name} must hold ints, got {type(g).__name__} for axis {axis}: {grid!r}")
        if v < 1:
            raise ValueError(f"{name} must hold positive sizes, got {v} for axis {axis}: {grid!r}")
        out.append(v)
    return tuple(out)


def pool_kernel_stride(in_size: int, out_size: int, *, axis: str = "axis") -> tuple[int, int]:
    """Kernel and stride that pool ``in_size`` positions to exactly ``out_size`` windows.

    ``stride = I // O`` and ``kernel = I - (O - 1) * stride``; then ``(I - kernel) // stride + 1 == O``
    and the windows cover every position. Asking for more outputs than inputs (``O > I``) is rejected
    rather than repeating tokens: repeating adds tokens that carry no information, which is never what a
    token budget wants.

    Raises:
        ValueError: ``out_size`` outside ``[1, in_size]`` (the message names ``axis``).
    """
    for name, v in (("in_size", in_size), ("out_size", out_size)):
        if as_int(v) is None:
            raise TypeError(f"{name} for axis {axis} must be an int, got {type(v).__name__}")
    in_size, out_size = operator.index(in_size), operator.index(out_size)
    if in_size < 1:
        raise ValueError(f"in_size for axis {axis} must be >= 1, got {in_size}")
    if not 1 <= out_size <= in_size:
        raise ValueError(
            f"output size for axis {axis} must be in [1, {in_size}] (the input size; pooling never "
            f"repeats tokens), got {out_size}"
        )
    stride = in_size // out_size
    return in_size - (out_size - 1) * stride, stride


def grid_for_budget(grid, budget: int, *, keep_time: bool = False) -> tuple[int, int, int]:
    """The output grid for a token budget: ``T'·H'·W' <= budget``, each axis ``<= `` its input.

    The rule (deterministic, no randomness, no dependence on the device):

    1. If the grid already fits (``T·H·W <= budget``) it is returned unchanged.
    2. The ideal real-valued grid shrinks every axis by the same ratio ``r`` (so aspect is kept),
       except that an axis never goes below 1 or above its input size; ``r`` is chosen so the ideal
       product equals the budget (bisection on a monotone function). With ``keep_time`` the time axis is
       fixed at ``T`` and only ``H, W`` share the per-frame budget ``budget // T``.
    3. Integer candidates: each axis within one of the floor or the ceiling of its ideal size, plus each such
       combination with one axis instead raised (or lowered) to the most the budget allows. Among those
       that fit, the winner maximises ``log(T'·H'·W') − Σ_a (log o_a − log e_a)²`` (more tokens,
       close to the ideal shape); ties go to the lexicographically largest ``(T', H', W')``.
    4. Greedy fill of what rounding left over: repeatedly grow to its next allowed size the axis furthest
       below its ideal (smallest ``o_a / e_a``, ties to the earlier axis) among those that can still grow
       within the budget and the input size, until none can.

    Only sizes whose pooling windows span at most ``max(2·stride, 8)`` positions, or that keep the whole
    axis, are allowed (see ``_pool_friendly_sizes``): just above half a long axis, PPLLaVA's kernel/stride
    rule would average almost the whole axis into every token.

    The result keeps the per-axis reduction ratios nearly equal; it is not always the grid with the
    largest possible product (``(1, 24, 24)`` with budget 23 gives ``(1, 5, 4)``, not ``(1, 1, 23)``).

    Examples: ``(16, 24, 24)`` with budget 1024 gives ``(7, 12, 12)`` (1008 tokens);
    ``(1, 24, 24)`` with budget 144 gives ``(1, 12, 12)``.

    Raises:
        ValueError: ``budget < 1``, or ``keep_time`` with ``budget < T`` (not one token per frame).
    """
    t, h, w = _check_grid("grid", grid)
    if as_int(budget) is None:
        raise TypeError(f"budget must be an int, got {type(budget).__name__}")
    budget = operator.index(budget)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    if t * h * w <= budget:
        return (t, h, w)
    if keep_time:
        if budget < t:
            raise ValueError(f"budget must be >= T={t} with keep_time=True (one token per frame at least), got {budget}")
        return (t,) + _fit_axes((h, w), budget // t)
    return _fit_axes((t, h, w), budget)


def _fit_axes(sizes: tuple[int, ...], budget: int) -> tuple[int, ...]:
    """Step 2-4 of :func:`grid_for_budget` for any number of axes."""
    if math.prod(sizes) <= budget:
        return tuple(sizes)

    def ideal(r: float) -> list[float]:
        return [min(float(s), max(1.0, s * r)) for s in sizes]

    lo, hi = 0.0, 1.0  # prod(ideal(lo)) = 1 <= budget < prod(ideal(hi))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if math.prod(ideal(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    target = ideal(lo)

    # Candidates: every axis within one of the floor/ceiling of its ideal, and the same with one axis
    # instead filled to the most the budget allows (rounding can leave a size-2 axis at 1 and waste
    # half the budget; filling another axis recovers it). At most 4^3·4 = 256 candidates.
    allowed = [_pool_friendly_sizes(s) for s in sizes]
    options = [_near(sizes_a, e) for sizes_a, e in zip(allowed, target)]
    candidates = set()
    for c in itertools.product(*options):
        candidates.add(c)
        for a in range(len(sizes)):
            rest = math.prod(c) // c[a]
            fill = [o for o in allowed[a] if o <= budget // rest]
            if fill:
                candidates.add(c[:a] + (fill[-1],) + c[a + 1:])
    candidates = [c for c in candidates if min(c) >= 1 and math.prod(c) <= budget]

    def key(c):
        # log(tokens) - squared log-distance to the ideal: 1 % more tokens is worth being 10 % off
        # the ideal on one axis.
        dist = sum((math.log(o) - math.log(e)) ** 2 for o, e in zip(c, target))
        return (math.log(math.prod(c)) - dist, c)

    best = max(candidates, key=key)
    # Greedy fill of what rounding left: grow the axis furthest below its ideal (ratio o/e, ties to
    # the earlier axis) that still fits; repeat until no axis can grow.
    best = list(best)
    while True:
        order = sorted(range(len(sizes)), key=lambda a: (best[a] / target[a], a))
        for a in order:
            bigger = [o for o in allowed[a] if o > best[a]]
            if bigger and math.prod(best) // best[a] * bigger[0] <= budget:
                best[a] = bigger[0]
                break
        else:
            return tuple(best)


def _pool_friendly_sizes(in_size: int) -> list[int]:
    """Output sizes allowed on an axis of ``in_size``: the whole axis, or windows of at most
    ``max(2·stride, 8)`` positions.

    PPLLaVA's ``stride = I // O, kernel = I − (O − 1)·stride`` degenerates when ``O`` is just above
    ``I / 2``: stride 1 and a kernel of ``I − O + 1`` (256 frames → 143 averages 114 frames into every
    token, and took 10.9 s to pool in benchmarks/prefill.py). Such sizes are skipped; the cap of 8 keeps
    mild reductions of short axes (24 → 20: kernel 5) available.
    """
    sizes = []
    for o in range(1, in_size + 1):
        stride = in_size // o
        if o == in_size or in_size - (o - 1) * stride <= max(2 * stride, 8):
            sizes.append(o)
    return sizes


def _near(allowed: list[int], ideal: float) -> list[int]:
    """The allowed sizes within one of the ideal's floor/ceiling, and the nearest one on either side."""
    lo, hi = math.floor(ideal) - 1, math.ceil(ideal) + 1
    near = [o for o in allowed if lo <= o <= hi]
    below = [o for o in allowed if o < lo]
    above = [o for o in allowed if o > hi]
    return sorted(set(near + below[-1:] + above[:1]))


def _window_index(in_size: int, kernel: int, stride: int, out_size: int, device) -> torch.Tensor:
    """``[O, k]`` input index of each slot of each window on one axis."""
    return (torch.arange(out_size, device=device) * stride).unsqueeze(1) + torch.arange(kernel, device=device)


def pool_coverage(grid, out_grid, device=None) -> torch.Tensor:
    """``[T*H*W]`` int64: how many pooling windows contain each input token (``>= 1``; > 1 where windows overlap)."""
    grid = _check_grid("grid", grid)
    out_grid = _check_grid("out_grid", out_grid)
    counts = []
    for axis, i, o in zip(_AXES, grid, out_grid):
        k, s = pool_kernel_stride(i, o, axis=axis)
        counts.append(torch.bincount(_window_index(i, k, s, o, device).flatten(), minlength=i))
    ct, ch, cw = counts
    return (ct[:, None, None] * ch[None, :, None] * cw[None, None, :]).flatten()


def _unfold3(v: torch.Tensor, ks, ss) -> torch.Tensor:
    """``[B, T, H, W, *rest]`` → ``[B, T', H', W', *rest, kT*kH*kW]`` (window slots last, raster order)."""
    for dim, (k, s) in enumerate(zip(ks, ss), start=1):
        v = v.unfold(dim, k, s)
    return v.flatten(-3)


def prompt_guided_pool(
    state: TokenState,
    grid,
    out_grid,
    relevance: torch.Tensor | None = None,
    *,
    tau: float = 0.01,
) -> TokenState:
    """Pool a ``T×H×W`` token grid to ``T'×H'×W'``, weighting tokens by their relevance to the prompt.

    Args:
        state: tokens ``x [B, N, C]`` with ``N = T*H*W`` in raster ``(t, h, w)`` order (no prefix tokens).
        grid: ``(T, H, W)`` of the input.
        out_grid: ``(T', H', W')``, each axis in ``[1, input]`` (see :func:`grid_for_budget`).
        relevance: ``[B, N]`` float scores (e.g. :func:`vlmcompress.relevance.relevance_from_embeddings`),
            or ``None`` for plain average pooling.
        tau: softmax temperature (> 0). Smaller is sharper; as ``tau → 0`` each window selects its most
            relevant token. The paper uses 0.01.

    Returns:
        A new state with ``N' = T'*H'*W'`` tokens in raster ``(t', h', w')`` order:

        - ``x``: per window, ``Σ_i softmax(relevance / tau)_i · x_i`` over the window's tokens. With
          ``relevance=None`` this *is* ``torch.nn.functional.avg_pool3d(kernel, stride)``; constant
          relevance gives the same up to rounding. Accumulated in fp32 for fp16/bf16 inputs (fp64 for
          fp64) and cast back.
        - ``pos``: the same weighted mean of ``pos``, so a pooled token sits at the relevance-weighted
          centroid of its window.
        - ``size``: the sum of ``size`` over the tokens the window *owns* (:func:`pool_partition`: a
          partition, each token owned by exactly one window, every window owning at least one), so sizes
          still sum to the original count. ``size`` counts patches and is deliberately not
          relevance-weighted.
        - ``source``: if tracked, each original patch follows its current token into the window that
          owns it. Without overlap that is simply the window containing it.

        This is :func:`pool_plan` applied with :meth:`vlmcompress.plan.Plan.apply`.

    Raises:
        TypeError: ``state`` not a TokenState, non-int grids, non-float relevance or tau.
        ValueError: ``N != T*H*W``, an output axis outside ``[1, input]``, relevance of the wrong shape or
            not finite, ``tau <= 0``, non-finite features.
    """
    if not isinstance(state, TokenState):
        raise TypeError(f"state must be a TokenState, got {type(state).__name__}")
    grid = _check_grid("grid", grid)
    out_grid = _check_grid("out_grid", out_grid)
    b, n, c = state.x.shape
    if math.prod(grid) != n:
        raise ValueError(f"grid {grid} holds {math.prod(grid)} tokens but state has N={n}; prompt_guided_pool needs exactly the grid tokens (no prefix)")
    ks, ss = zip(*(pool_kernel_stride(i, o, axis=a) for a, i, o in zip(_AXES, grid, out_grid)))
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    check_tensor("state.x", state.x, floating=True)
    check_finite("state.x", state.x)
    if relevance is not None:
        check_tensor("relevance", relevance, shape=(b, n), floating=True, finite=True)
    acc = torch.float64 if state.x.dtype == torch.float64 else torch.float32
    plan = pool_plan(grid, out_grid, relevance, tau=tau, batch=b, device=state.x.device, dtype=acc)
    return plan.apply(state)


def pool_partition(grid, out_grid, device=None) -> torch.Tensor:
    """``[T*H*W]`` int64: the output window that *owns* each input token, a partition of the grid.

    Per axis, position ``p`` belongs to window ``min(p // stride, O - 1)``: window ``j < O - 1`` owns
    ``[j·stride, (j+1)·stride)`` and the last owns the rest up to ``I``. Each owned range lies inside the
    window (``kernel >= stride``, and the last window ends at ``I``), every window owns at least
    ``stride >= 1`` positions, and the owner of the first token of each window increases in raster order,
    so compressed tokens map to increasing placeholder slots even where windows overlap (issue 9, 1).
    """
    grid = _check_grid("grid", grid)
    out_grid = _check_grid("out_grid", out_grid)
    owners = []
    for axis, i, o in zip(_AXES, grid, out_grid):
        _, s = pool_kernel_stride(i, o, axis=axis)
        owners.append((torch.arange(i, device=device) // s).clamp(max=o - 1))
    ot, oh, ow = owners
    _, ho, wo = out_grid
    return ((ot[:, None, None] * ho + oh[None, :, None]) * wo + ow[None, None, :]).flatten()


@dataclass(frozen=True, eq=False)
class WindowMix:
    """The feature side of a pooling plan: output ``m`` = ``Σ_k weights[b, m, k] · v[window_k(m)]``.

    ``weights`` is ``[B, M, K]`` (softmax of relevance / tau inside each window), or ``None`` for the plain
    window mean (``avg_pool3d``, bit-exact). ``apply(v [B, N, D]) -> [B, M, D]`` in ``v``'s dtype promoted
    to the accumulation dtype (fp32 at least).
    """

    grid: tuple
    out_grid: tuple
    ks: tuple
    ss: tuple
    weights: torch.Tensor | None = None

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        b, n, d = v.shape
        x5 = v.reshape(b, *self.grid, d)
        m = math.prod(self.out_grid)
        if self.weights is None:
            acc = torch.promote_types(v.dtype, torch.float32)
            return _window_mean(x5, self.ks, self.ss, self.out_grid, acc).reshape(b, m, d)
        acc = torch.promote_types(v.dtype, self.weights.dtype)
        w = self.weights.to(device=v.device, dtype=acc).reshape(b, *self.out_grid, -1)
        return _weighted_window_sum(x5, w, self.ks, self.ss, self.out_grid).reshape(b, m, d)


def pool_plan(grid, out_grid, relevance: torch.Tensor | None = None, *, tau: float = 0.01, batch: int = 1,
              device=None, dtype=torch.float32):
    """The :class:`vlmcompress.plan.Plan` of prompt-guided pooling ``grid → out_grid``.

    Its partition is :func:`pool_partition` (sizes and the source map follow it); its features and
    positions are the relevance-weighted window sums (:class:`WindowMix`). ``relevance`` is ``[B, N]`` or
    ``None`` (plain average pooling); ``batch`` is ``B`` when ``relevance`` is ``None``.
    """
    from .plan import Plan

    grid = _check_grid("grid", grid)
    out_grid = _check_grid("out_grid", out_grid)
    ks, ss = zip(*(pool_kernel_stride(i, o, axis=a) for a, i, o in zip(_AXES, grid, out_grid)))
    if relevance is not None:
        batch = relevance.shape[0]
        device = relevance.device if device is None else device
        t, h, w = grid
        logits = _unfold3(relevance.to(device=device, dtype=dtype).reshape(batch, t, h, w), ks, ss) / tau
        weights = torch.softmax(logits, dim=-1).reshape(batch, math.prod(out_grid), -1)
    else:
        weights = None
    owner = pool_partition(grid, out_grid, device=device)
    dst = owner.expand(batch, owner.numel()).clone()
    return Plan(dst, math.prod(out_grid), mix=WindowMix(grid, out_grid, tuple(ks), tuple(ss), weights))


# How the weighted window sum is computed. Summing over kernel offsets (K strided multiply-adds) never
# copies the windows: peak memory is two outputs. Unfolding + einsum materialises all windows, O·K·C
# values, which is N·C without overlap but (kernel/stride)^3 times more with it (24 -> 15 on an axis
# gives kernel 10, stride 1). Measured on CPU: 2x2 spatial pooling of 8x24x24x4096, offset sum ~5x
# faster than einsum. So: offset sum, except for huge windows (K > 1024, a Python-level loop that long
# costs more than the copy) without overlap (where the einsum's copy is no bigger than the input).
_OFFSET_SUM_MAX_K = 1024


def _window_views(x5: torch.Tensor, ks, ss, out_grid):
    """Slot ``k`` of every window as one strided ``[B, T', H', W', C]`` view of ``x5``, for ``k`` in raster
    order of the kernel offsets ``(dt, dh, dw)``: the order of the flattened unfold of the weights."""
    for offs in itertools.product(*(range(kx) for kx in ks)):
        yield x5[(slice(None),) + tuple(slice(o, o + (n - 1) * st + 1, st) for o, n, st in zip(offs, out_grid, ss))]


def _window_mean(x5: torch.Tensor, ks, ss, out_grid, acc: torch.dtype) -> torch.Tensor:
    """``avg_pool3d`` of ``x5 [B, T, H, W, C]`` over ``(T, H, W)`` → ``[B, T', H', W', C]``, channels last.

    The same arithmetic as ``avg_pool3d``: the window's values summed in raster order, then divided by
    ``K``, so the result is bit-identical (tested against ``F.avg_pool3d`` on CPU), without the layout
    copies to and from channels-first (3-6× faster on CPU for 1024 channels). Accumulates in ``acc``.
    """
    kk = math.prod(ks)
    if kk > _OFFSET_SUM_MAX_K:
        pooled = F.avg_pool3d(x5.to(acc).permute(0, 4, 1, 2, 3).contiguous(), kernel_size=ks, stride=ss)
        return pooled.permute(0, 2, 3, 4, 1)
    out = x5.new_zeros(x5.shape[0], *out_grid, x5.shape[-1], dtype=acc)
    for view in _window_views(x5, ks, ss, out_grid):
        out.add_(view.to(acc))
    return out.div_(kk)


def _weighted_window_sum(x5: torch.Tensor, weights: torch.Tensor, ks, ss, out_grid) -> torch.Tensor:
    """``Σ_k weights[..., k] · window_k(x)``: ``x5 [B, T, H, W, C]``, ``weights [B, T', H', W', K]`` → ``[B, T', H', W', C]``
    in the weights' dtype."""
    kk, acc = weights.shape[-1], weights.dtype
    if kk > _OFFSET_SUM_MAX_K and all(k == s for k, s in zip(ks, ss)):
        return torch.einsum("bthwck,bthwk->bthwc", _unfold3(x5.to(acc), ks, ss), weights)
    out = x5.new_zeros(x5.shape[0], *out_grid, x5.shape[-1], dtype=acc)
    for k, view in enumerate(_window_views(x5, ks, ss, out_grid)):
        out.addcmul_(view.to(acc), weights[..., k:k + 1])
    return out
