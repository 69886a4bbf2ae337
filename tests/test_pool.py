"""Prompt-guided pooling: window arithmetic, budget grids, the avg_pool3d identity, relevance weighting."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from vlmcompress.pool import grid_for_budget, pool_bins, pool_partition, prompt_guided_pool
from vlmcompress.state import TokenState

# (grid, out_grid): odd sizes, non-divisible sizes (windows of two lengths), identity, collapse to one, real sizes.
GRIDS = [
    ((1, 4, 4), (1, 2, 2)),
    ((1, 5, 7), (1, 2, 3)),
    ((3, 5, 7), (2, 2, 3)),
    ((4, 6, 6), (4, 6, 6)),
    ((2, 3, 3), (1, 1, 1)),
    ((5, 9, 11), (3, 4, 5)),
    ((7, 3, 10), (7, 1, 6)),
    ((1, 1, 9), (1, 1, 4)),
    ((6, 8, 8), (3, 3, 3)),
    ((2, 9, 9), (1, 2, 2)),
    ((3, 10, 10), (1, 1, 2)),
    ((4, 6, 6), (1, 1, 1)),  # one output token
    ((2, 24, 44), (1, 2, 2)),
    ((16, 4, 4), (14, 3, 3)),  # the tiny models' 50 % grid, where overlapping windows broke counting
    ((2, 27, 27), (1, 13, 12)),
]
DIVIDING = [c for c in GRIDS if all(i % o == 0 for i, o in zip(*c))]


def gid(case):
    (t, h, w), (a, b, c) = case
    return f"{t}x{h}x{w}-to-{a}x{b}x{c}"


def make_state(b, grid, c=6, dtype=torch.float32, seed=0, track_source=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, math.prod(grid), c, generator=g).to(dtype)
    return TokenState.from_features(x, grid, track_source=track_source)


def windows(grid, out_grid):
    """Naive list of windows: for each output token (raster), the raster indices of its input tokens.
    Window j of an axis is the positions p with j <= p·O/I < j + 1 (exact rationals)."""
    per_axis = [[[p for p in range(i) if j <= Fraction(p * o, i) < j + 1] for j in range(o)]
                for i, o in zip(grid, out_grid)]
    t, h, w = grid
    return [[(a * h + b_) * w + c for a in rt for b_ in rh for c in rw] for rt, rh, rw in itertools.product(*per_axis)]


def naive_pool(state, grid, out_grid, relevance, tau):
    """Loop-over-windows reference of prompt_guided_pool's x, pos and size (float64)."""
    wins = windows(grid, out_grid)
    xs, ps, ss = [], [], []
    for b in range(state.batch):
        xo, po, so = [], [], []
        for idx in wins:
            r = torch.zeros(len(idx), dtype=torch.float64) if relevance is None else relevance[b, idx].double()
            wgt = torch.softmax(r / tau, 0)
            xo.append((wgt[:, None] * state.x[b, idx].double()).sum(0))
            po.append((wgt[:, None] * state.pos[b, idx].double()).sum(0))
            so.append(state.size[b, idx].double().sum())
        xs.append(torch.stack(xo)), ps.append(torch.stack(po)), ss.append(torch.stack(so))
    return torch.stack(xs), torch.stack(ps), torch.stack(ss)


# --- pool_bins ------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_size", [*range(1, 14), 24, 27, 64], ids=lambda v: f"I{v}")
def test_bins_partition_the_axis_into_balanced_runs(in_size):
    for out in range(1, in_size + 1):
        bins = pool_bins(in_size, out)
        assert len(bins) == out
        assert bins[0][0] == 0 and bins[-1][1] == in_size
        assert all(stop == nxt for (_, stop), (nxt, _) in zip(bins, bins[1:]))  # no gap, no overlap
        assert {stop - start for start, stop in bins} <= {in_size // out, -(-in_size // out)}
        assert min(stop - start for start, stop in bins) >= 1
        if in_size % out == 0:  # PPLLaVA's windows: stride = kernel = I / O
            k = in_size // out
            assert bins == [(j * k, (j + 1) * k) for j in range(out)]


def test_bins_reject_more_outputs_than_inputs():
    with pytest.raises(ValueError, match=r"axis h.*\[1, 4\]"):
        pool_bins(4, 5, axis="h")
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        pool_bins(4, 0)
    with pytest.raises(TypeError, match="out_size"):
        pool_bins(4, 2.0)


# --- grid_for_budget --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "grid,budget",
    [((16, 24, 24), 1024), ((1, 24, 24), 144), ((1, 24, 24), 23), ((8, 27, 48), 500), ((60, 2, 35), 3994),
     ((64, 2, 2), 64), ((3, 5, 7), 1), ((32, 24, 24), 2048), ((4, 27, 27), 729), ((1, 1, 1), 5)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"b{v}",
)
def test_grid_for_budget_fits_and_is_deterministic(grid, budget):
    out = grid_for_budget(grid, budget)
    assert len(out) == 3 and all(isinstance(o, int) for o in out)
    assert all(1 <= o <= i for o, i in zip(out, grid))
    assert math.prod(out) <= budget
    assert grid_for_budget(list(grid), budget) == out  # same answer, any sequence type
    # It is a valid pooling target.
    state = make_state(1, grid, c=2)
    assert prompt_guided_pool(state, grid, out).num_tokens == math.prod(out)


def test_grid_for_budget_known_values():
    assert grid_for_budget((16, 24, 24), 1024) == (7, 12, 12)
    assert grid_for_budget((1, 24, 24), 144) == (1, 12, 12)
    assert grid_for_budget((1, 24, 24), 576) == (1, 24, 24)  # already fits: unchanged
    assert grid_for_budget((16, 24, 24), 1024, keep_time=True) == (16, 8, 8)
    # A size-2 axis would round to 1 and waste half the budget; the rule keeps it and shrinks time.
    assert grid_for_budget((60, 2, 35), 3994) == (57, 2, 35)


def test_grid_for_budget_uses_most_of_the_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        grid = tuple(int(v) for v in torch.randint(1, 40, (3,), generator=g))
        budget = int(torch.randint(64, math.prod(grid) + 65, (1,), generator=g))
        out = grid_for_budget(grid, budget)
        assert math.prod(out) <= budget
        assert math.prod(out) >= 0.8 * min(budget, math.prod(grid)), (grid, budget, out)


def test_grid_for_budget_keeps_square_aspect():
    for budget in (16, 64, 100, 144, 400):
        _, h, w = grid_for_budget((1, 24, 24), budget)
        assert abs(h - w) <= 1


def test_grids_accept_integer_like_values():
    np = pytest.importorskip("numpy")
    state = make_state(1, (2, 4, 4))
    out = prompt_guided_pool(state, (np.int64(2), np.int64(4), np.int64(4)), torch.Size([1, 2, 2]))
    assert out.num_tokens == 4
    assert grid_for_budget(torch.Size([2, 4, 4]), torch.tensor(8)) == grid_for_budget((2, 4, 4), 8)


def test_grid_for_budget_bad_inputs():
    with pytest.raises(ValueError, match="budget"):
        grid_for_budget((2, 4, 4), 0)
    with pytest.raises(ValueError, match="keep_time"):
        grid_for_budget((8, 4, 4), 7, keep_time=True)
    with pytest.raises(TypeError, match="grid"):
        grid_for_budget((4, 4), 8)
    with pytest.raises(ValueError, match="grid"):
        grid_for_budget((0, 4, 4), 8)
    with pytest.raises(TypeError, match="budget"):
        grid_for_budget((2, 4, 4), 8.0)


# --- prompt_guided_pool ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", GRIDS, ids=gid)
def test_output_count_and_fields(case):
    grid, out_grid = case
    state = make_state(2, grid, track_source=True)
    rel = torch.randn(2, math.prod(grid))
    out = prompt_guided_pool(state, grid, out_grid, rel)
    m = math.prod(out_grid)
    assert out.x.shape == (2, m, 6)
    assert out.size.shape == (2, m) and out.pos.shape == (2, m, 3)
    assert out.pos.dtype == state.pos.dtype and out.x.dtype == state.x.dtype
    assert out.source.shape == (2, math.prod(grid))
    assert int(out.source.min()) >= 0 and int(out.source.max()) < m


@pytest.mark.parametrize("case", DIVIDING, ids=gid)
def test_no_relevance_is_avg_pool3d_where_axes_divide(case):
    grid, out_grid = case
    state = make_state(2, grid)
    ks = [i // o for i, o in zip(grid, out_grid)]
    x5 = state.x.reshape(2, *grid, 6).permute(0, 4, 1, 2, 3)
    ref = F.avg_pool3d(x5, ks, ks).permute(0, 2, 3, 4, 1).reshape(2, -1, 6)
    out = prompt_guided_pool(state, grid, out_grid, None)
    torch.testing.assert_close(out.x, ref, rtol=1e-6, atol=1e-6)
    # Constant relevance: the same up to rounding.
    const = prompt_guided_pool(state, grid, out_grid, torch.full((2, math.prod(grid)), 0.37))
    torch.testing.assert_close(const.x, ref, rtol=1e-6, atol=1e-6)
    # Positions: plain window centroids, the avg_pool3d of the coordinates.
    p5 = state.pos.reshape(2, *grid, 3).permute(0, 4, 1, 2, 3)
    pref = F.avg_pool3d(p5, ks, ks).permute(0, 2, 3, 4, 1).reshape(2, -1, 3)
    torch.testing.assert_close(out.pos, pref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", GRIDS, ids=gid)
def test_no_relevance_is_the_window_mean(case):
    grid, out_grid = case
    state = make_state(2, grid, seed=4)
    out = prompt_guided_pool(state, grid, out_grid, None)
    x_ref, p_ref, _ = naive_pool(state, grid, out_grid, None, 1.0)
    torch.testing.assert_close(out.x.double(), x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pos.double(), p_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", GRIDS, ids=gid)
def test_matches_loop_reference(case):
    grid, out_grid = case
    state = make_state(2, grid, seed=1)
    g = torch.Generator().manual_seed(2)
    state = state.replace(size=torch.rand(2, math.prod(grid), generator=g) + 0.5)
    rel = torch.randn(2, math.prod(grid), generator=g)
    out = prompt_guided_pool(state, grid, out_grid, rel, tau=0.7)
    x_ref, p_ref, s_ref = naive_pool(state, grid, out_grid, rel, 0.7)
    torch.testing.assert_close(out.x.double(), x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pos.double(), p_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.size.double(), s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", GRIDS, ids=gid)
def test_tau_to_zero_selects_most_relevant_token(case):
    grid, out_grid = case
    state = make_state(2, grid, seed=3)
    n = math.prod(grid)
    # Distinct relevance values, well separated relative to tau.
    rel = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s)).float() for s in (4, 5)]) / n
    out = prompt_guided_pool(state, grid, out_grid, rel, tau=1e-6)
    for b in range(2):
        for m, idx in enumerate(windows(grid, out_grid)):
            best = idx[int(torch.argmax(rel[b, idx]))]
            torch.testing.assert_close(out.x[b, m], state.x[b, best])
            torch.testing.assert_close(out.pos[b, m], state.pos[b, best])


def test_shift_invariance():
    grid, out_grid = (3, 5, 7), (2, 2, 3)
    state = make_state(2, grid)
    rel = torch.rand(2, math.prod(grid))
    a = prompt_guided_pool(state, grid, out_grid, rel, tau=0.05)
    b = prompt_guided_pool(state, grid, out_grid, rel + 3.0, tau=0.05)
    torch.testing.assert_close(a.x, b.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.pos, b.pos, rtol=1e-5, atol=1e-5)
    # ... and relevance actually matters (otherwise the test above would be vacuous).
    plain = prompt_guided_pool(state, grid, out_grid, None)
    assert (a.x - plain.x).abs().max() > 1e-2


def test_batch_equals_singles():
    grid, out_grid = (5, 9, 11), (3, 4, 5)
    state = make_state(3, grid, track_source=True)
    rel = torch.randn(3, math.prod(grid))
    whole = prompt_guided_pool(state, grid, out_grid, rel, tau=0.1)
    for b in range(3):
        one = TokenState(x=state.x[b:b + 1], size=state.size[b:b + 1], pos=state.pos[b:b + 1], source=state.source[b:b + 1])
        single = prompt_guided_pool(one, grid, out_grid, rel[b:b + 1], tau=0.1)
        torch.testing.assert_close(whole.x[b:b + 1], single.x, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(whole.pos[b:b + 1], single.pos, rtol=1e-6, atol=1e-6)
        assert torch.equal(whole.source[b:b + 1], single.source)


@pytest.mark.parametrize("case", [((3, 5, 7), (2, 2, 3)), ((1, 32, 66), (1, 1, 2))], ids=gid)
def test_gradients_flow_to_features_and_relevance(case):
    grid, out_grid = case
    x = torch.randn(2, math.prod(grid), 4, requires_grad=True)
    rel = torch.randn(2, math.prod(grid), requires_grad=True)
    state = TokenState.from_features(x, grid)
    out = prompt_guided_pool(state, grid, out_grid, rel, tau=0.5)
    out.x.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert rel.grad is not None and rel.grad.abs().sum() > 0
    x.grad = None
    prompt_guided_pool(TokenState.from_features(x, grid), grid, out_grid, None).x.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_rel", [False, True], ids=["avg", "rel"])
def test_low_precision(dtype, with_rel):
    grid, out_grid = (3, 5, 7), (2, 2, 3)
    ref_state = make_state(2, grid)
    state = ref_state.replace(x=ref_state.x.to(dtype), size=ref_state.size.to(dtype))
    rel = torch.randn(2, math.prod(grid)).to(dtype) if with_rel else None
    out = prompt_guided_pool(state, grid, out_grid, rel, tau=0.1)
    assert out.x.dtype == dtype and out.size.dtype == dtype and out.pos.dtype == torch.float32
    assert torch.isfinite(out.x).all() and torch.isfinite(out.size).all()
    ref = prompt_guided_pool(ref_state, grid, out_grid, None if rel is None else rel.float(), tau=0.1)
    torch.testing.assert_close(out.x.float(), ref.x, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case", GRIDS, ids=gid)
def test_size_sum_is_conserved(case):
    grid, out_grid = case
    state = make_state(2, grid)
    state = state.replace(size=torch.rand(2, math.prod(grid), generator=torch.Generator().manual_seed(7)) * 3 + 1)
    out = prompt_guided_pool(state, grid, out_grid, torch.randn(2, math.prod(grid)))
    torch.testing.assert_close(out.size.sum(1), state.size.sum(1), rtol=1e-5, atol=1e-5)
    assert (out.size > 0).all()


@pytest.mark.parametrize("grid,out_grid", [((16, 4, 4), (14, 3, 3)), ((16, 27, 27), (10, 17, 17)), ((8, 24, 24), (5, 10, 10))],
                         ids=["tiny-50pc", "27x27-25pc", "24x24-25pc"])
def test_a_relevant_token_lands_in_one_output_only(grid, out_grid):
    """The failure of PPLLaVA's overlapping windows on the tiny models: a small relevant object was
    copied into every window that overlapped it, so a video of one object looked like several."""
    n = math.prod(grid)
    state = make_state(1, grid, seed=8)
    hot = n // 2 + grid[2] // 2
    rel = torch.zeros(1, n)
    rel[0, hot] = 10.0
    out = prompt_guided_pool(state, grid, out_grid, rel)
    copies = (out.x[0] - state.x[0, hot]).abs().amax(-1) < 1e-4
    assert int(copies.sum()) == 1


def test_pos_is_weighted_centroid_inside_window():
    grid, out_grid = (5, 9, 11), (3, 4, 5)
    state = make_state(1, grid)
    out = prompt_guided_pool(state, grid, out_grid, torch.randn(1, math.prod(grid)), tau=0.2)
    for m, idx in enumerate(windows(grid, out_grid)):
        lo = state.pos[0, idx].min(0).values
        hi = state.pos[0, idx].max(0).values
        assert (out.pos[0, m] >= lo - 1e-5).all() and (out.pos[0, m] <= hi + 1e-5).all()


def test_source_without_overlap_is_the_containing_window():
    grid, out_grid = (2, 4, 6), (1, 2, 3)
    state = make_state(1, grid, track_source=True)
    out = prompt_guided_pool(state, grid, out_grid, torch.randn(1, 48))
    expect = torch.empty(48, dtype=torch.int64)
    for m, idx in enumerate(windows(grid, out_grid)):
        expect[idx] = m
    assert torch.equal(out.source[0], expect)


def test_source_of_uneven_windows():
    # One row of 5 tokens into 2 windows [0, 3) and [3, 5).
    grid, out_grid = (1, 1, 5), (1, 1, 2)
    state = make_state(1, grid, track_source=True)
    rel = torch.tensor([[5.0, 0.0, 1.0, 0.0, 0.0]])
    out = prompt_guided_pool(state, grid, out_grid, rel, tau=1.0)
    assert out.source[0].tolist() == [0, 0, 0, 1, 1]
    assert out.size[0].tolist() == [3.0, 2.0]
    assert prompt_guided_pool(state, grid, out_grid, None).source[0].tolist() == [0, 0, 0, 1, 1]
    # An earlier merge's map is composed: original patches 0..4 first held by tokens [4, 4, 0, 1, 2].
    state2 = state.replace(source=torch.tensor([[4, 4, 0, 1, 2]]))
    assert prompt_guided_pool(state2, grid, out_grid, rel, tau=1.0).source[0].tolist() == [1, 1, 0, 0, 0]


@pytest.mark.parametrize("grid,out_grid", [((1, 24, 24), (1, 8, 7)), ((8, 14, 14), (6, 8, 8)), ((1, 27, 27), (1, 9, 8)),
                                           ((64, 27, 27), (25, 11, 11))],
                         ids=["24x24-to-8x7", "8x14x14-to-6x8x8", "27x27-to-9x8", "64x27x27-to-25x11x11"])
def test_windows_partition_the_grid_in_increasing_order(grid, out_grid):
    """Issue 9, defect 1: every window owns a patch, and first patches increase (generate()'s anchors)."""
    owner = pool_partition(grid, out_grid)
    m = math.prod(out_grid)
    assert torch.equal(torch.bincount(owner, minlength=m).clamp(max=1), torch.ones(m, dtype=torch.long))
    first = torch.full((m,), owner.numel()).scatter_reduce(0, owner, torch.arange(owner.numel()), "amin")
    assert (first[1:] > first[:-1]).all()
    # Relevance never changes which window a token is in.
    state = make_state(1, grid, track_source=True)
    out = prompt_guided_pool(state, grid, out_grid, torch.randn(1, math.prod(grid)) * 50)
    assert torch.equal(out.source[0], owner)


def test_huge_but_finite_features_are_accepted():
    # Two 3e38 rows overflow the fp32 sum used by the quick finiteness check; the exact check must
    # then accept them (they are finite), and each lands in its own window.
    x = torch.zeros(1, 16, 2)
    x[0, 0] = 3e38
    x[0, -1] = 3e38
    out = prompt_guided_pool(TokenState.from_features(x, (1, 4, 4)), (1, 4, 4), (1, 2, 2))
    assert torch.isfinite(out.x).all()
    torch.testing.assert_close(out.x[0, 0], torch.full((2,), 3e38 / 4))


def test_bad_inputs_raise_clear_errors():
    grid = (2, 4, 4)
    state = make_state(1, grid)
    n = math.prod(grid)
    with pytest.raises(ValueError, match=r"axis h.*\[1, 4\]"):
        prompt_guided_pool(state, grid, (1, 5, 2))
    with pytest.raises(TypeError, match="out_grid"):
        prompt_guided_pool(state, grid, (2, 2))
    with pytest.raises(TypeError, match="grid"):
        prompt_guided_pool(state, (2, 16), (1, 2, 2))
    with pytest.raises(ValueError, match="N=32"):
        prompt_guided_pool(state, (2, 4, 5), (1, 2, 2))
    with pytest.raises(ValueError, match="relevance"):
        prompt_guided_pool(state, grid, (1, 2, 2), torch.randn(1, n - 1))
    with pytest.raises(ValueError, match="relevance"):
        prompt_guided_pool(state, grid, (1, 2, 2), torch.randn(n))
    with pytest.raises(TypeError, match="relevance"):
        prompt_guided_pool(state, grid, (1, 2, 2), torch.ones(1, n, dtype=torch.int64))
    with pytest.raises(ValueError, match="relevance"):
        prompt_guided_pool(state, grid, (1, 2, 2), torch.full((1, n), float("nan")))
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            prompt_guided_pool(state, grid, (1, 2, 2), torch.randn(1, n), tau=tau)
    with pytest.raises(TypeError, match="tau"):
        prompt_guided_pool(state, grid, (1, 2, 2), torch.randn(1, n), tau="0.1")
    bad = state.replace(x=state.x.clone().index_fill_(1, torch.tensor([3]), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        prompt_guided_pool(bad, grid, (1, 2, 2))
    with pytest.raises(TypeError, match="TokenState"):
        prompt_guided_pool(state.x, grid, (1, 2, 2))
