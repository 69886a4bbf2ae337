"""Property-based tests (hypothesis) of stage-B plans over random grids, budgets and relevance, including
real sizes (24×24, 27×27, 8–64 frames × 14×14) where pooling windows overlap: every plan is a partition,
sizes sum to the original count, positions stay in range, anchors increase; and generate() runs."""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import vlmcompress as vc  # noqa: E402
from vlmcompress.merge import bipartite_soft_matching  # noqa: E402
from vlmcompress.pool import grid_for_budget, pool_plan  # noqa: E402
from vlmcompress.state import TokenState  # noqa: E402
from vlmcompress.steps import (MergeToBudget, PromptGuidedPool, RandomDrop, TemporalMerge, UniformPool,  # noqa: E402
                               apply_steps)

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL = [(1, 24, 24), (1, 27, 27), (8, 14, 14), (16, 14, 14), (33, 14, 14), (64, 14, 14)]
grids = st.one_of(st.sampled_from(REAL),
                  st.tuples(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9)))


def _state(grid, seed, channels=3):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_features(torch.randn(1, math.prod(grid), channels, generator=g), grid, track_source=True)


def _check_partition(dst: torch.Tensor, m: int):
    kept = dst[dst >= 0]
    counts = torch.bincount(kept, minlength=m)
    assert counts.numel() == m and bool((counts >= 1).all()), "an output owns no input token"


def _check_anchors(source: torch.Tensor, m: int):
    slots = torch.arange(source.numel())
    keep = source >= 0
    first = torch.full((m,), source.numel()).scatter_reduce(0, source[keep], slots[keep], "amin")
    assert bool((first < source.numel()).all()) and bool((first[1:] > first[:-1]).all())


@SETTINGS
@given(grid=grids, frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**16), sharp=st.sampled_from([None, 0.01, 1.0]))
def test_pool_plan_is_a_partition_with_sizes_positions_and_anchors(grid, frac, seed, sharp):
    n = math.prod(grid)
    out_grid = grid_for_budget(grid, max(1, int(frac * n)))
    state = _state(grid, seed)
    relevance = None if sharp is None else torch.randn(1, n, generator=torch.Generator().manual_seed(seed)) * 5
    plan = pool_plan(grid, out_grid, relevance, tau=sharp or 0.01)
    m = math.prod(out_grid)
    assert plan.num_out == m
    _check_partition(plan.dst[0], m)
    out = plan.apply(state)
    assert float(out.size.sum()) == pytest.approx(n)
    lo, hi = state.pos[0].min(0).values, state.pos[0].max(0).values
    assert bool((out.pos[0] >= lo - 1e-4).all()) and bool((out.pos[0] <= hi + 1e-4).all())
    _check_anchors(out.source[0], m)
    # Each output mixes only its own window's tokens (windows never overlap): the softmax-weighted mean
    # of the tokens the plan sends there, computed here one window at a time.
    dst = plan.dst[0]
    for j in range(0, m, max(1, m // 16)):
        members = (dst == j).nonzero()[:, 0]
        w = torch.ones(len(members)) if relevance is None else torch.softmax(relevance[0, members] / sharp, 0)
        expect = (w[:, None] * state.x[0, members]).sum(0) / w.sum()
        torch.testing.assert_close(out.x[0, j], expect, rtol=1e-4, atol=1e-5)


def _steps(draw_kind, ratio, seed, frames):
    first = {"pool": PromptGuidedPool(keep_ratio=ratio), "uniform": UniformPool(keep_ratio=ratio),
             "drop": RandomDrop(keep_ratio=ratio, seed=seed), "merge": MergeToBudget(keep_ratio=ratio)}[draw_kind]
    temporal = TemporalMerge(keep=0.5)
    # Temporal merging needs the grid: after pooling it still has one, after merging/dropping it goes first.
    return [first, temporal] if draw_kind in ("pool", "uniform") else [temporal, first]


@SETTINGS
@given(grid=grids, ratio=st.floats(0.02, 1.0), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["pool", "uniform", "drop", "merge"]))
def test_step_lists_keep_the_bookkeeping(grid, ratio, seed, kind):
    if kind == "merge" and math.prod(grid) > 2000:
        grid = (grid[0] % 4 + 1, 14, 14)          # repeated bipartite merging is quadratic: keep it small
    n = math.prod(grid)
    state = _state(grid, seed)
    out, _ = apply_steps(state, grid, _steps(kind, ratio, seed, grid[0]))
    m = out.num_tokens
    assert 1 <= m <= n
    src = out.source[0]
    assert src.shape == (n,) and int(src.min()) >= -1 and int(src.max()) < m
    if kind == "drop":
        # dropped patches count nowhere; every kept patch is counted once, in the token that holds it
        assert float(out.size.sum()) == int((src >= 0).sum())
    else:
        assert float(out.size.sum()) == pytest.approx(n)        # every patch counted once
        assert bool((src >= 0).all())
    lo, hi = state.pos[0].min(0).values, state.pos[0].max(0).values
    assert bool((out.pos[0] >= lo - 1e-4).all()) and bool((out.pos[0] <= hi + 1e-4).all())


@SETTINGS
@given(n=st.integers(2, 400), r=st.integers(0, 300), protected=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_bipartite_plans_are_partitions(n, r, protected, seed):
    protected = min(protected, n)
    x = torch.randn(1, n, 5, generator=torch.Generator().manual_seed(seed))
    plan = bipartite_soft_matching(x, r, protected=protected)
    assert plan.num_out == n - min(r, (n - protected) // 2)
    _check_partition(plan.dst[0], plan.num_out)
    assert plan.dst[0, :protected].tolist() == list(range(protected))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budget=st.integers(1, 36), kind=st.sampled_from(["pool", "uniform", "drop"]), seed=st.integers(0, 99))
def test_generate_runs_for_any_budget(budget, kind, seed):
    from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, generate_tokens
    import numpy as np
    from PIL import Image

    step = {"pool": PromptGuidedPool(token_budget=budget), "uniform": UniformPool(token_budget=budget),
            "drop": RandomDrop(token_budget=budget, seed=seed)}[kind]
    model = cached_model("llava")
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    inputs = chat_inputs(cached_processor("llava"), [([("image", img)], "What?")])
    with vc.compressed(model, vc.CompressionConfig.from_steps(step)):
        out = generate_tokens(model, inputs)
        after = model.vlmcompress.report.items[0].after_compress
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert after == math.prod(grid_for_budget((1, 6, 6), budget))
