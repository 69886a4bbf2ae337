"""Prompt-guided pooling (PPLLaVA; Liu et al. 2024): shrink a ``T×H×W`` token grid to any ``T'×H'×W'``.

Each output token is a softmax-weighted mean of the tokens in one 3-D window, the weights coming from
how relevant each token is to the user's question (:mod:`vlmcompress.relevance`). Without relevance it
is the plain window mean. See DESIGN.md §3.2.

Windows, per axis (input size ``I``, output size ``O``): output ``j`` reads positions
``[ceil(j·I/O), ceil((j+1)·I/O))``, i.e. position ``p`` belongs to window ``p·O // I``. The windows
*partition* the axis into runs of ``floor(I/O)`` or ``ceil(I/O)`` positions. Where ``O`` divides ``I``
these are PPLLaVA's windows (``stride = kernel = I/O``) and the plain mean is ``avg_pool3d``.

Where ``O`` does not divide ``I`` we deliberately depart from PPLLaVA's ``stride = I // O,
kernel = I − (O − 1)·stride``: those windows overlap, badly just above half an axis (``16 → 10``:
stride 1, kernel 7; a budget grid of ``16×16×16`` at 25 % put every token into 84 windows). Overlap
does two kinds of harm, both measured on the task-trained tiny models (README, "Accuracy kept"): every
output averages a wide neighbourhood (fine detail blurs away), and with relevance the softmax puts
nearly all of a window's weight on the one relevant token, which is then copied into every window that
overlaps it — object counts collapsed (0.00 at 50 % on synth-onevision with the overlapping windows).
A partition copies nothing, and any budget grid is still reachable.
"""
from __future__ import annotations

import itertools
import math
import operator

import torch

from ._checks import as_int, check_finite, check_tensor
from .state import TokenState

__all__ = ["pool_bins", "grid_for_budget", "prompt_guided_pool", "pool_partition", "pool_plan"]

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


def pool_bins(in_size: int, out_size: int, *, axis: str = "axis") -> list[tuple[int, int]]:
    """The ``out_size`` pooling windows of one axis of ``in_size`` positions, as ``[start, stop)`` pairs.

    Window ``j`` is ``[ceil(j·I/O), ceil((j+1)·I/O))``: the windows partition ``[0, I)`` in order, each
    ``floor(I/O)`` or ``ceil(I/O)`` long (``I=5, O=2``: ``[0, 3)`` and ``[3, 5)``). Asking for more
    outputs than inputs (``O > I``) is rejected rather than repeating tokens: repeating adds tokens
    that carry no information, which is never what a token budget wants.

    Raises:
        TypeError: non-int sizes. ValueError: ``out_size`` outside ``[1, in_size]`` (the message names ``axis``).
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
    starts = [-(-j * in_size // out_size) for j in range(out_size + 1)]
    return list(zip(starts[:-1], starts[1:]))


def _axis_owner(in_size: int, out_size: int, axis: str, device) -> torch.Tensor:
    """``[I]`` int64: the window of each position on one axis (``p·O // I``, the inverse of :func:`pool_bins`)."""
    pool_bins(in_size, out_size, axis=axis)  # validates
    return torch.arange(in_size, device=device) * out_size // in_size


def grid_for_budget(grid, budget: int, *, keep_time: bool = False) -> tuple[int, int, int]:
    """The output grid for a token budget: ``T'·H'·W' <= budget``, each axis ``<= `` its input.

    The rule (deterministic, no randomness, no dependence on the device):

    1. If the grid already fits (``T·H·W <= budget``) it is returned unchanged.
    2. The ideal real-valued grid shrinks every axis by the same ratio ``r`` (so aspect is kept),
       except that an axis never goes below 1 or above its input size; ``r`` is chosen so the ideal
       product equals the budget (bisection on a monotone function). With ``keep_time`` the time axis is
       fixed at ``T`` and only ``H, W`` share the per-frame budget ``budget // T``.
    3. Integer candidates: each axis within two of the floor or the ceiling of its ideal size, plus each such
       combination with one axis instead raised (or lowered) to the most the budget allows. Among those
       that fit, the winner maximises ``log(T'·H'·W') − Σ_a (log o_a − log e_a)²`` (more tokens,
       close to the ideal shape); ties go to the lexicographically largest ``(T', H', W')``.
    4. Greedy fill of what rounding left over: repeatedly grow by one the axis furthest
       below its ideal (smallest ``o_a / e_a``, ties to the earlier axis) among those that can still grow
       within the budget and the input size, until none can.

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
    options = [_near(s, e) for s, e in zip(sizes, target)]
    candidates = set()
    for c in itertools.product(*options):
        candidates.add(c)
        for a in range(len(sizes)):
            fill = min(sizes[a], budget // (math.prod(c) // c[a]))
            if fill >= 1:
                candidates.add(c[:a] + (fill,) + c[a + 1:])
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
            if best[a] < sizes[a] and math.prod(best) // best[a] * (best[a] + 1) <= budget:
                best[a] += 1
                break
        else:
            return tuple(best)


def _near(size: int, ideal: float) -> range:
    """The sizes in ``[1, size]`` within two of the ideal's floor/ceiling."""
    return range(max(1, math.floor(ideal) - 2), min(size, math.ceil(ideal) + 2) + 1)


def pool_partition(grid, out_grid, device=None) -> torch.Tensor:
    """``[T*H*W]`` int64: the output window of each input token (raster ``(t', h', w')`` index).

    The product of the per-axis windows of :func:`pool_bins`, so a partition: every token is in exactly
    one window, every window holds at least one token, and the window of the first token of each window
    increases in raster order (compressed tokens map to increasing placeholder slots).
    """
    grid = _check_grid("grid", grid)
    out_grid = _check_grid("out_grid", out_grid)
    ot, oh, ow = (_axis_owner(i, o, a, device) for a, i, o in zip(_AXES, grid, out_grid))
    _, ho, wo = out_grid
    return ((ot[:, None, None] * ho + oh[None, :, None]) * wo + ow[None, None, :]).flatten()


def pool_plan(grid, out_grid, relevance: torch.Tensor | None = None, *, tau: float = 0.01, batch: int = 1,
              device=None, dtype=torch.float32):
    """The :class:`vlmcompress.plan.Plan` of prompt-guided pooling ``grid → out_grid``.

    Its partition is :func:`pool_partition`; each token's weight inside its window is
    ``exp(relevance / tau − max over the window)`` (so the window's output is the softmax-weighted sum,
    and no window's weights underflow to all zeros however far its relevance is below another
    window's), or 1 when ``relevance`` is ``None`` (the plain mean). ``relevance`` is ``[B, N]``;
    ``batch`` is ``B`` when it is ``None``. Weights are computed in ``dtype``.
    """
    from .plan import Plan

    grid = _check_grid("grid", grid)
    out_grid = _check_grid("out_grid", out_grid)
    m = math.prod(out_grid)
    if relevance is not None:
        batch = relevance.shape[0]
        device = relevance.device if device is None else device
    owner = pool_partition(grid, out_grid, device=device)
    dst = owner.expand(batch, owner.numel())
    if relevance is None:
        weight = torch.ones(batch, owner.numel(), dtype=dtype, device=device)
    else:
        logits = relevance.to(device=device, dtype=dtype) / tau
        peak = torch.full((batch, m), -math.inf, dtype=dtype, device=device)
        peak = peak.scatter_reduce(1, dst, logits, reduce="amax")
        weight = torch.exp(logits - peak.gather(1, dst))
    return Plan(dst.clone(), m, weight=weight)


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
        A new state with ``N' = T'*H'*W'`` tokens in raster ``(t', h', w')`` order, one per window of
        :func:`pool_partition` (the module docstring says why windows never overlap):

        - ``x``: per window, ``Σ_i softmax(relevance / tau)_i · x_i`` over the window's tokens. With
          ``relevance=None`` the plain mean (``avg_pool3d`` where every output axis divides its input);
          constant relevance gives the same up to rounding. Accumulated in fp32 for fp16/bf16 inputs
          (fp64 for fp64) and cast back. Token sizes do not weight the mean.
        - ``pos``: the same weighted mean of ``pos``, so a pooled token sits at the relevance-weighted
          centroid of its window.
        - ``size``: the sum of ``size`` over the window, so sizes still sum to the original count.
          ``size`` counts patches and is deliberately not relevance-weighted.
        - ``source``: if tracked, each original patch follows its current token into its window.

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
