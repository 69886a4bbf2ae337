"""Stage-B steps: small objects that each plan one compression of an item's visual tokens (DESIGN.md §9).

The step interface (all a custom step needs)::

    def my_step(state: TokenState, grid: tuple[int, int, int] | None, ctx: StepContext) -> tuple[Plan, grid | None]

- ``state``: the item's tokens, a batch of one in the adapters (``x [1, N, C]``, ``size [1, N]``,
  ``pos [1, N, 3]``, ``source``); the operators themselves accept any ``B``.
- ``grid``: ``(T, H, W)`` when the ``N`` tokens form a raster ``T×H×W`` grid, else ``None`` (any-res
  tiles, tokens merged in the vision tower, or after a step that left no grid).
- ``ctx``: what a step may need besides the tokens (:class:`StepContext`): the user's question, the
  item's frames, which channels similarity may look at (``ctx.metric(state)``). Ignore it if unused.
- returns a :class:`vlmcompress.plan.Plan` over the ``N`` tokens (a partition into output groups with
  weights, ``-1`` for dropped tokens) and the grid of the ``plan.num_out`` outputs, or ``None``.

:func:`apply_steps` runs a list of steps, applying each plan with :meth:`Plan.apply` (features, sizes,
positions, extra channels and the source map move together) and checking what each step returned. A
step must not change ``state`` itself. Any callable with that signature is a step; the built-in ones
are frozen dataclasses (hashable, printable):

================== =====================================================================================
:class:`PromptGuidedPool` PPLLaVA pooling to a budget, relevance-weighted when given a scorer (grid-less
                   items: bipartite merging to the same count)
:class:`MergeToBudget`   ToMe bipartite merging to the budget (no grid afterwards)
:class:`TemporalMerge`   merge each frame's tokens into their matches in the previous frame
:class:`UniformPool`     baseline: plain average pooling to ``grid_for_budget``'s grid, no relevance
:class:`RandomDrop`      baseline: a seeded uniform subset, kept count equal to pooling's, the rest dropped
================== =====================================================================================

Budgets (``keep_ratio``, ``token_budget``) mean the same in every step: the target is
``min(N, ceil(keep_ratio · N0), token_budget)`` where ``N0 = round(Σ size)`` is the count the LLM would
read unpatched (so a ratio means the same after a merging vision tower), see :func:`target_count`.

Example, the two baselines and PPLLaVA at the same kept count::

    cfg = CompressionConfig.from_steps(RandomDrop(keep_ratio=0.25, seed=0))
    cfg = CompressionConfig.from_steps(UniformPool(keep_ratio=0.25))
    cfg = CompressionConfig.from_steps(PromptGuidedPool(keep_ratio=0.25, relevance=scorer), TemporalMerge(threshold=0.9))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .plan import Plan
from .schedule import kept_count
from .state import TokenState

__all__ = ["StepContext", "PromptGuidedPool", "MergeToBudget", "TemporalMerge", "UniformPool", "RandomDrop",
           "apply_steps", "target_count", "check_step"]


@dataclass(frozen=True)
class StepContext:
    """What a step may use besides the tokens.

    Attributes:
        question: the user's question for this item (str), or ``None`` when unknown.
        frames: zero-argument callable giving the item's frames ``[T, H, W, 3]`` for a pixel relevance
            scorer (called only when a step needs them), or ``None``.
        metric_channels: similarity and relevance see only the first ``metric_channels`` channels of
            ``x`` (the rest are extra channels riding along, e.g. DeepStack); ``None`` = all.
        item_grid: the item's grid before the first step (set by :func:`apply_steps`), so a step can tell
            "this item never had a grid" from "an earlier step removed it".
        token_frames: ``T`` when a grid-less item's ``N`` tokens are still ``T`` consecutive blocks of
            ``N/T``, one per frame (Qwen-VL after merging inside the tower), else ``None``. Temporal
            merging needs only that; :func:`apply_steps` clears it once a step changes the tokens.
    """

    question: str | None = None
    frames: Callable[[], Any] | None = None
    metric_channels: int | None = None
    item_grid: tuple | None = None
    token_frames: int | None = None

    def metric(self, state: TokenState) -> torch.Tensor:
        """``[B, N, C']`` the features similarity and relevance look at."""
        return state.x if self.metric_channels is None else state.x[..., :self.metric_channels]


def target_count(state: TokenState, keep_ratio: float = 1.0, token_budget: int | None = None) -> int:
    """Tokens an item keeps: ``min(N, ceil(keep_ratio · N0), token_budget)``, ``N0 = round(Σ size)``."""
    n = state.num_tokens
    target = n
    if keep_ratio < 1.0:
        # The ratio is of the tokens the LLM would read unpatched: sizes sum to that count even after a
        # merging vision tower (stage A), so keep_ratio means the same with or without it.
        target = min(target, kept_count(keep_ratio, int(round(float(state.size[0].sum())))))
    if token_budget is not None:
        target = min(target, token_budget)
    return target


def pooled_count(state: TokenState, grid, keep_ratio: float = 1.0, token_budget: int | None = None) -> int:
    """The kept count of pooling to a budget: ``T'·H'·W'`` of :func:`grid_for_budget` on a grid, else the
    target itself (grid-less items are merged to exactly the target)."""
    from .pool import grid_for_budget

    target = target_count(state, keep_ratio, token_budget)
    if target >= state.num_tokens:
        return state.num_tokens
    return math.prod(grid_for_budget(grid, target)) if grid is not None else target


class _Budget:
    """Validation shared by the budgeted steps (``keep_ratio`` in (0, 1], ``token_budget`` >= 1 or None)."""

    def _check_budget(self) -> None:
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < r <= 1.0:
            raise ValueError(f"{type(self).__name__}: keep_ratio must be a fraction in (0, 1], got {r!r}")
        b = self.token_budget
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"{type(self).__name__}: token_budget must be a positive int or None, got {b!r}")


def _merge_plan_to(state: TokenState, target: int, ctx: StepContext) -> Plan:
    """Bipartite merging (repeated until ``target`` is reached) as one plan."""
    from .merge import MergePlan, bipartite_soft_matching

    plan = MergePlan.identity(state.batch, state.num_tokens, device=state.x.device)
    cur = state
    while cur.num_tokens > target:
        step = bipartite_soft_matching(ctx.metric(cur), cur.num_tokens - target)
        if step.is_identity:
            break
        plan = plan.then(step)
        cur = step.merge(cur)
    return Plan.from_merge(plan)


@dataclass(frozen=True)
class PromptGuidedPool(_Budget):
    """PPLLaVA: pool the grid to :func:`grid_for_budget`'s grid, each window weighted by
    ``softmax(relevance / tau)`` (plain average pooling when ``relevance`` is ``None``).

    ``relevance``: a scorer with ``score(question, frames, target_grid)`` or
    ``score_features(question, features, grid)`` (see :class:`vlmcompress.CompressionConfig`). Items
    without a grid are merged to the same target by bipartite matching, without relevance.
    """

    keep_ratio: float = 1.0
    token_budget: int | None = None
    relevance: Any = None
    tau: float = 0.01

    def __post_init__(self) -> None:
        self._check_budget()
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not (0 < self.tau < math.inf):
            raise ValueError(f"PromptGuidedPool: tau must be a finite number > 0, got {self.tau!r}")
        if self.relevance is not None:
            from .config import _check_scorer

            _check_scorer(self.relevance, "pool")

    def __call__(self, state: TokenState, grid, ctx: StepContext):
        from .pool import grid_for_budget, pool_plan

        target = target_count(state, self.keep_ratio, self.token_budget)
        if target >= state.num_tokens:
            return Plan.identity(state.batch, state.num_tokens, state.x.device), grid
        if grid is None:
            return _merge_plan_to(state, target, ctx), None
        out_grid = grid_for_budget(grid, target)
        relevance = _relevance(self.relevance, ctx, state, grid)
        acc = torch.float64 if state.x.dtype == torch.float64 else torch.float32
        return pool_plan(grid, out_grid, relevance, tau=self.tau, batch=state.batch, device=state.x.device,
                         dtype=acc), out_grid


@dataclass(frozen=True)
class MergeToBudget(_Budget):
    """ToMe bipartite merging to the target count (size-weighted averages). Leaves no grid."""

    keep_ratio: float = 1.0
    token_budget: int | None = None

    def __post_init__(self) -> None:
        self._check_budget()

    def __call__(self, state: TokenState, grid, ctx: StepContext):
        target = target_count(state, self.keep_ratio, self.token_budget)
        if target >= state.num_tokens:
            return Plan.identity(state.batch, state.num_tokens, state.x.device), grid
        return _merge_plan_to(state, target, ctx), None


@dataclass(frozen=True)
class TemporalMerge:
    """Merge each token of frame ``t`` into its best match in frame ``t-1`` (DESIGN.md §3.1, video).

    Exactly one of ``threshold`` (merge matches with cosine strictly ``> threshold``) or ``keep`` (fraction
    of each frame's tokens, after the first frame, left unmerged). On a single frame, or an item that
    never had a grid (any-res image tiles), it is the identity. On a video whose grid an earlier step
    removed (MergeToBudget, RandomDrop) it raises: frames can no longer be told apart (issue 9, defect 2),
    so put it first. Leaves no grid (frames keep different counts).
    """

    threshold: float | None = None
    keep: float = 1.0

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.keep == 1.0):
            raise ValueError("TemporalMerge: give exactly one of threshold= (a cosine in [-1, 1]) or keep= (a fraction in (0, 1))")
        t = self.threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not -1 <= t <= 1):
            raise ValueError(f"TemporalMerge: threshold must be a cosine in [-1, 1], got {t!r}")
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
            raise ValueError(f"TemporalMerge: keep must be a fraction in (0, 1], got {k!r}")

    def __call__(self, state: TokenState, grid, ctx: StepContext):
        from .merge import temporal_matching

        blocks = ctx.token_frames if grid is None else None
        if blocks is not None and (blocks < 1 or state.num_tokens % blocks):
            raise ValueError(f"StepContext.token_frames={blocks} does not split the item's {state.num_tokens} tokens "
                             "into equal frame blocks; this is a bug in the adapter that set it")
        if grid is None and blocks is None and (ctx.item_grid is None or ctx.item_grid[0] <= 1):
            return Plan.identity(state.batch, state.num_tokens, state.x.device), None
        if grid is None and blocks is None:
            raise ValueError("TemporalMerge needs the item's (T, H, W) grid, but an earlier step left none "
                             "(MergeToBudget, RandomDrop, or a grid-less item): put TemporalMerge before it")
        frames = grid[0] if grid is not None else blocks
        if frames <= 1:
            return Plan.identity(state.batch, state.num_tokens, state.x.device), grid
        if self.threshold is not None:
            plan = temporal_matching(ctx.metric(state), frames, threshold=self.threshold)
        else:
            per_frame = state.num_tokens // frames
            plan = temporal_matching(ctx.metric(state), frames, budget=per_frame - kept_count(self.keep, per_frame))
        return Plan.from_merge(plan), (grid if plan.is_identity else None)


@dataclass(frozen=True)
class UniformPool(_Budget):
    """Baseline: plain average pooling to the grid :func:`grid_for_budget` gives (no relevance).

    Grid-less items are cut into ``target`` runs of consecutive tokens (sizes as even as possible) and
    each run averaged (size-weighted), so the kept count is the same as pooling's.
    """

    keep_ratio: float = 1.0
    token_budget: int | None = None

    def __post_init__(self) -> None:
        self._check_budget()

    def __call__(self, state: TokenState, grid, ctx: StepContext):
        from .pool import grid_for_budget, pool_plan

        n = state.num_tokens
        target = target_count(state, self.keep_ratio, self.token_budget)
        if target >= n:
            return Plan.identity(state.batch, n, state.x.device), grid
        if grid is None:
            # Run j holds tokens [floor(j·n/target), floor((j+1)·n/target)).
            dst = (torch.arange(n, device=state.x.device) * target) // n
            return Plan(dst.expand(state.batch, n).clone(), target), None
        out_grid = grid_for_budget(grid, target)
        acc = torch.float64 if state.x.dtype == torch.float64 else torch.float32
        return pool_plan(grid, out_grid, None, batch=state.batch, device=state.x.device, dtype=acc), out_grid


@dataclass(frozen=True)
class RandomDrop(_Budget):
    """Baseline: keep a seeded uniform random subset of each item's tokens, at their own positions.

    The kept count is exactly what pooling to the same budget keeps (:func:`pooled_count`: ``T'·H'·W'``
    of :func:`grid_for_budget`, or the target for grid-less items). Kept tokens keep their features,
    size and position and their order; dropped tokens are averaged into nothing (``-1`` in the plan and
    in the source map, so sizes sum to the kept count). Each item draws from ``torch.Generator`` seeded
    with ``seed``: the same item gives the same subset in every run, on every device, alone or batched.
    Leaves no grid.
    """

    keep_ratio: float = 1.0
    token_budget: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_budget()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"RandomDrop: seed must be an int, got {self.seed!r}")

    def __call__(self, state: TokenState, grid, ctx: StepContext):
        n = state.num_tokens
        count = pooled_count(state, grid, self.keep_ratio, self.token_budget)
        if count >= n:
            return Plan.identity(state.batch, n, state.x.device), grid
        # One fresh generator per row: a row draws the same subset alone or batched.
        rows = [torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:count].sort().values
                for _ in range(state.batch)]
        return Plan.keep(torch.stack(rows).to(state.x.device), n), None


def check_step(step) -> None:
    """A clear TypeError when ``step`` is not a step (a callable ``(state, grid, ctx) -> (Plan, grid)``)."""
    if isinstance(step, type):
        raise TypeError(f"a step must be an instance, got the class {step.__name__}; e.g. {step.__name__}(keep_ratio=0.25)")
    if not callable(step):
        raise TypeError(f"a step must be callable as step(state, grid, ctx) -> (Plan, grid or None), got "
                        f"{type(step).__name__}; built-in steps: PromptGuidedPool, MergeToBudget, TemporalMerge, "
                        "UniformPool, RandomDrop")


def apply_steps(state: TokenState, grid, steps, ctx: StepContext | None = None) -> tuple[TokenState, tuple | None]:
    """Run ``steps`` in order: each plans on the current ``(state, grid)`` and its plan is applied.

    Returns the final ``(state, grid)``. Raises a ValueError/TypeError naming the step when a step
    returns something other than ``(Plan over the current N tokens, grid of num_out tokens or None)``.
    """
    from dataclasses import replace

    ctx = StepContext() if ctx is None else ctx
    if ctx.item_grid is None and grid is not None:
        ctx = replace(ctx, item_grid=tuple(grid))
    for step in steps:
        check_step(step)
        out = step(state, grid, ctx)
        name = getattr(step, "__name__", None) or type(step).__name__
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Plan)):
            raise TypeError(f"step {name} must return (Plan, grid or None), got {type(out).__name__}")
        plan, new_grid = out
        if plan.dst.shape != state.x.shape[:2]:
            raise ValueError(f"step {name} returned a plan over {tuple(plan.dst.shape)} tokens for a state of "
                             f"{tuple(state.x.shape[:2])}")
        if new_grid is not None:
            if len(new_grid) != 3 or math.prod(int(g) for g in new_grid) != plan.num_out:
                raise ValueError(f"step {name} returned grid {new_grid} for {plan.num_out} tokens; return a (T, H, W) "
                                 "grid holding exactly num_out tokens, or None")
            new_grid = tuple(int(g) for g in new_grid)
        if ctx.token_frames is not None and not plan.is_identity:
            ctx = replace(ctx, token_frames=None)        # the frames' blocks are gone with the plan
        state = plan.apply(state)
        grid = new_grid
    return state, grid


def _relevance(scorer, ctx: StepContext, state: TokenState, grid):
    """``[1, T*H*W]`` relevance of the item's tokens to ``ctx.question``, or ``None`` without a scorer."""
    if scorer is None:
        return None
    question = ctx.question
    if question is None:
        raise ValueError("relevance is set but no question is known: pass question=... to generate(), "
                         "or patch(model, config, processor=processor) so the prompt can be read")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"relevance needs the user's question as a non-empty str, got {question!r}: "
                         "pass question=... to generate()")
    if not callable(getattr(scorer, "score", None)):
        return scorer.score_features(question, ctx.metric(state), grid)
    pixels = ctx.frames() if ctx.frames is not None else None
    if pixels is None:
        raise ValueError(f"{type(scorer).__name__} scores frames, and this item's frames cannot be recovered "
                         "from the processor outputs of this model family: pass them with "
                         "model.generate(..., relevance_frames=[frames of each image/video])")
    return scorer.score(question, pixels, tuple(grid))
