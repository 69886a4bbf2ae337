"""Bipartite (ToMe) and temporal token merging: plans, invariants, references, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmcompress.merge import (
    MergePlan,
    bipartite_soft_matching,
    temporal_matching,
    temporal_tokens_after,
    tome_merge,
    unmerge_to_source,
)
from vlmcompress.schedule import tokens_after
from vlmcompress.state import TokenState


def _state(x, grid=None, prefix=0):
    return TokenState.from_features(x, grid, prefix=prefix, track_source=True)


def _naive_tome_dst(metric, r, protected=0):
    """Textbook ToMe on one sample, written with Python loops: the spec for bipartite_soft_matching."""
    n = metric.shape[0]
    m = F.normalize(metric.double(), dim=-1)
    # ToMe keeps protected tokens inside the alternating split and only forbids them (A: as a source,
    # B: as a destination).
    a_idx = [i for i in range(0, n, 2) if i >= protected]
    b_idx = [i for i in range(1, n, 2) if i >= protected]
    sim = m[a_idx] @ m[b_idx].T
    score, best = sim.max(-1)
    order = sorted(range(len(a_idx)), key=lambda i: (-score[i].item(), i))[:r]
    root = list(range(n))
    for i in order:
        root[a_idx[i]] = b_idx[best[i]]
    kept = [i for i in range(n) if root[i] == i]
    slot = {t: k for k, t in enumerate(kept)}
    return torch.tensor([slot[root[i]] for i in range(n)]), len(kept)


def _naive_temporal_dst(metric, frames, threshold):
    """Temporal merging on one sample with loops: each token of frame t to its best match in t-1."""
    n = metric.shape[0]
    s = n // frames
    m = F.normalize(metric.double(), dim=-1).view(frames, s, -1)
    root = list(range(n))
    for t in range(1, frames):
        score, best = (m[t] @ m[t - 1].T).max(-1)
        for j in range(s):
            if score[j] > threshold:
                root[t * s + j] = root[(t - 1) * s + best[j].item()]
    kept = [i for i in range(n) if root[i] == i]
    slot = {t: k for k, t in enumerate(kept)}
    return torch.tensor([slot[root[i]] for i in range(n)]), len(kept)


# --- identity ----------------------------------------------------------------------------------

def test_r0_is_identity_same_object():
    x = torch.randn(2, 9, 4)
    state = _state(x)
    plan = bipartite_soft_matching(x, 0)
    assert plan.is_identity and plan.num_out == 9
    assert plan.merge(state) is state
    y = torch.randn(2, 9, 3)
    assert plan.unmerge(y) is y


@pytest.mark.parametrize("n,protected", [(1, 0), (3, 2), (5, 5)], ids=["N1", "N3-P2", "N5-P5"])
def test_r_clamps_to_identity_when_nothing_can_merge(n, protected):
    x = torch.randn(1, n, 4)
    assert bipartite_soft_matching(x, 10, protected=protected).is_identity


def test_temporal_identity_cases():
    x = torch.randn(2, 12, 4)
    state = _state(x, (3, 2, 2))
    assert temporal_matching(x, 3, budget=0).merge(state) is state
    assert temporal_matching(x, 1, threshold=0.0).merge(state) is state
    assert temporal_matching(x, 3, threshold=1.5).merge(state) is state      # no cosine exceeds 1.5


# --- against the textbook reference --------------------------------------------------------------

@pytest.mark.parametrize("n,r,protected", [(17, 5, 0), (17, 8, 1), (24, 12, 0), (31, 3, 3)],
                         ids=["N17-r5", "N17-r8-P1", "N24-r12", "N31-r3-P3"])
def test_bipartite_matches_naive_reference(n, r, protected):
    torch.manual_seed(n + r)
    x = torch.randn(3, n, 6)
    plan = bipartite_soft_matching(x, r, protected=protected)
    for b in range(3):
        dst, m = _naive_tome_dst(x[b], r, protected)
        assert plan.num_out == m == n - r
        assert torch.equal(plan.dst[b], dst)


@pytest.mark.parametrize("threshold", [0.0, 0.3], ids=["thr0.0", "thr0.3"])
def test_temporal_threshold_matches_naive_reference(threshold):
    torch.manual_seed(1)
    x = torch.randn(1, 5 * 6, 3)                    # C=3 so random tokens often exceed the threshold
    plan = temporal_matching(x, 5, threshold=threshold)
    dst, m = _naive_temporal_dst(x[0], 5, threshold)
    assert plan.num_out == m < 30
    assert torch.equal(plan.dst[0], dst)


# --- invariants ----------------------------------------------------------------------------------

def _check_invariants(state, x0, pos0):
    b, n0 = state.source.shape
    size = state.size
    assert torch.equal(size, size.round()) and (size >= 1).all()
    assert torch.equal(size.sum(1), torch.full((b,), float(n0)))
    # every token is the mean of the ORIGINAL features of the patches it holds, its pos their centroid
    counts = torch.zeros_like(size).scatter_add(1, state.source, torch.ones(b, n0))
    assert torch.equal(counts, size)
    mean_x = torch.zeros_like(state.x).index_put_(
        (torch.arange(b)[:, None].expand(b, n0), state.source), x0, accumulate=True) / counts[..., None]
    mean_pos = torch.zeros_like(state.pos).index_put_(
        (torch.arange(b)[:, None].expand(b, n0), state.source), pos0, accumulate=True) / counts[..., None]
    torch.testing.assert_close(state.x, mean_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state.pos, mean_pos, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rs", [(3,), (4, 4, 2), (7, 0, 5, 9)], ids=["r3", "r4-4-2", "r7-0-5-9"])
def test_tome_sequence_keeps_sizes_means_and_centroids(rs):
    torch.manual_seed(sum(rs))
    x0 = torch.randn(2, 1 + 5 * 5, 8)
    state = _state(x0, (1, 5, 5), prefix=1)
    pos0 = state.pos.clone()
    for r in rs:
        state = tome_merge(state, r, protected=1)
    assert state.num_tokens == tokens_after(26, rs, protected=1)     # the last r clamps: 13 // 2
    _check_invariants(state, x0, pos0)


def test_mixed_temporal_then_tome_keeps_invariants():
    torch.manual_seed(0)
    frame = torch.randn(2, 1, 9, 8)
    x0 = (frame + 0.05 * torch.randn(2, 4, 9, 8)).reshape(2, 36, 8)
    state = _state(x0, (4, 3, 3))
    pos0 = state.pos.clone()
    state = temporal_matching(state.x, 4, budget=4).merge(state)
    assert state.num_tokens == temporal_tokens_after(36, 4, 4) == 24
    state = tome_merge(state, 5)
    state = tome_merge(state, 6)
    assert state.num_tokens == 13
    _check_invariants(state, x0, pos0)


def test_protected_tokens_keep_index_size_and_value():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3 + 16, 8)
    x0[:, 3:] = x0[:, 3:1 + 3].expand(-1, 16, -1)      # all grid tokens alike: protected ones must not join
    x0[:, :3] = x0[:, 3:4] + 1e-3 * torch.randn(2, 3, 8)
    state = _state(x0, (1, 4, 4), prefix=3)
    for r in (8, 4, 2):
        state = tome_merge(state, r, protected=3)
    assert state.num_tokens == 5
    assert torch.equal(state.x[:, :3], x0[:, :3])
    assert torch.equal(state.size[:, :3], torch.ones(2, 3))
    assert torch.equal(state.source[:, :3], torch.arange(3).expand(2, 3))
    assert (state.source[:, 3:] >= 3).all()


def test_slots_keep_original_order():
    torch.manual_seed(2)
    x0 = torch.randn(3, 1 + 40, 5)
    state = _state(x0, prefix=1)
    for r in (10, 8, 5):
        plan = bipartite_soft_matching(state.x, r, protected=1)
        # protected and B (odd) tokens always survive: their slots must rise with their index
        survivors = torch.cat([torch.tensor([0]), torch.arange(1, state.num_tokens, 2)])
        assert (plan.dst[:, survivors].diff(dim=1) > 0).all()
        state = plan.merge(state)
    # tokens never merged (size 1) hold a single patch each and keep raster order among themselves
    for b in range(3):
        single = state.size[b] == 1
        patch = torch.full((state.num_tokens,), -1).scatter_(0, state.source[b], torch.arange(41))
        assert single.sum() > 3 and (patch[single].diff() > 0).all()


# --- unmerge ---------------------------------------------------------------------------------------

def test_unmerge_round_trip():
    torch.manual_seed(3)
    x0 = torch.randn(2, 21, 6)
    state = _state(x0)
    plan = bipartite_soft_matching(x0, 7)
    merged = plan.merge(state)
    back = plan.unmerge(merged.x)
    assert back.shape == (2, 21, 6)
    assert torch.equal(back, merged.x.gather(1, plan.dst[..., None].expand(-1, -1, 6)))
    # merging the unmerged tokens again gives the merged tokens back (each group is constant)
    again = plan.merge(TokenState(x=back, size=state.size, pos=state.pos))
    torch.testing.assert_close(again.x, merged.x)
    # to the original patches through the source map, after two merges
    merged2 = tome_merge(merged, 4)
    y = torch.randn(2, merged2.num_tokens, 3)
    patches = unmerge_to_source(merged2, y)
    assert patches.shape == (2, 21, 3)
    assert torch.equal(patches, y.gather(1, merged2.source[..., None].expand(-1, -1, 3)))


def test_plan_composition_equals_two_steps():
    torch.manual_seed(4)
    x0 = torch.randn(2, 30, 6)
    state = _state(x0)
    p1 = bipartite_soft_matching(x0, 9)
    s1 = p1.merge(state)
    p2 = bipartite_soft_matching(s1.x, 6)
    s2 = p2.merge(s1)
    s12 = p1.then(p2).merge(state)
    torch.testing.assert_close(s12.x, s2.x)
    assert torch.equal(s12.size, s2.size) and torch.equal(s12.source, s2.source)


# --- batches, blocks, dtypes, gradients ------------------------------------------------------------

def test_bipartite_batch_independence():
    torch.manual_seed(5)
    x = torch.randn(4, 33, 8)
    plan = bipartite_soft_matching(x, 11, protected=1)
    batch = plan.merge(_state(x))
    for i in range(4):
        single_plan = bipartite_soft_matching(x[i:i + 1], 11, protected=1)
        assert torch.equal(single_plan.dst[0], plan.dst[i])
        single = single_plan.merge(_state(x[i:i + 1]))
        torch.testing.assert_close(single.x[0], batch.x[i])


def test_temporal_budget_batch_independence():
    torch.manual_seed(6)
    x = torch.randn(3, 4 * 10, 8)
    plan = temporal_matching(x, 4, budget=3)
    assert plan.num_out == temporal_tokens_after(40, 4, 3) == 31
    for i in range(3):
        assert torch.equal(temporal_matching(x[i:i + 1], 4, budget=3).dst[0], plan.dst[i])


def test_temporal_threshold_batch_takes_min_count():
    torch.manual_seed(7)
    frame = torch.randn(1, 8, 6)
    static = frame.expand(4, -1, -1).reshape(1, 32, 6)                  # 24 merges above threshold
    noisy = static.clone()
    noisy[0, 8:] = torch.randn(24, 6)
    noisy[0, 8:12] = frame[0, :4]                                        # only frame 1 repeats 4 tokens
    alone = [temporal_matching(v, 4, threshold=0.99) for v in (static, noisy)]
    assert [p.removed for p in alone] == [24, 4]
    both = temporal_matching(torch.cat([static, noisy]), 4, threshold=0.99)
    assert both.removed == 4
    assert torch.equal(both.dst[1], alone[1].dst[0])


@pytest.mark.parametrize("block_size", [1, 4, 7], ids=lambda b: f"block{b}")
def test_bipartite_blocked_equals_full(block_size):
    torch.manual_seed(block_size)
    x = torch.randn(2, 1 + 2 * 45, 8)      # Nb = 45: several B chunks of 8·block for blocks 1 and 4
    x[:, 50:60] = x[:, 10:20]               # exact duplicates: ties must resolve the same way
    full = bipartite_soft_matching(x, 30, protected=1)
    blocked = bipartite_soft_matching(x, 30, protected=1, block_size=block_size)
    assert torch.equal(full.dst, blocked.dst)


@pytest.mark.parametrize("block_size", [1, 6, 13], ids=lambda b: f"block{b}")
def test_temporal_blocked_equals_full(block_size):
    torch.manual_seed(block_size)
    x = torch.randn(2, 7 * 6, 4)
    for kw in ({"budget": 2}, {"threshold": 0.2}):
        assert torch.equal(temporal_matching(x, 7, **kw).dst, temporal_matching(x, 7, block_size=block_size, **kw).dst)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_is_finite(dtype):
    torch.manual_seed(8)
    x0 = (torch.randn(2, 4 * 9, 16) * 30).to(dtype)         # large norms: squares overflow fp16
    state = _state(x0, (4, 3, 3))
    state = temporal_matching(state.x, 4, budget=3).merge(state)
    state = tome_merge(state, 8)
    assert state.x.dtype == dtype
    assert torch.isfinite(state.x).all() and torch.isfinite(state.pos).all()
    assert state.size.sum(1).tolist() == [36.0, 36.0]


def test_gradients_flow_to_features():
    torch.manual_seed(9)
    x = torch.randn(2, 13, 5, dtype=torch.float64, requires_grad=True)
    plan = bipartite_soft_matching(x, 5, protected=1)
    assert not plan.dst.requires_grad
    state = TokenState.from_features(x, prefix=1)
    merged = plan.merge(state)
    (merged.x * torch.randn_like(merged.x)).sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad.abs().sum(-1) > 0).all()
    size, pos = state.size.detach(), state.pos

    def apply(feats):
        return plan.merge(TokenState(x=feats, size=size, pos=pos)).x

    assert torch.autograd.gradcheck(apply, (x.detach().clone().requires_grad_(),))


def test_temporal_gradients_flow():
    x = torch.randn(1, 3 * 4, 5, dtype=torch.float64, requires_grad=True)
    plan = temporal_matching(x, 3, budget=2)
    size, pos = torch.ones(1, 12, dtype=torch.float64), torch.zeros(1, 12, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: plan.merge(TokenState(x=f, size=size, pos=pos)).x,
                                    (x.detach().clone().requires_grad_(),))


# --- temporal behaviour ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [{"threshold": 0.9}, {"budget": 6}], ids=["threshold", "budget"])
def test_identical_frames_collapse(mode):
    torch.manual_seed(10)
    frame = torch.randn(2, 1, 6, 8)
    x0 = frame.expand(2, 5, 6, 8).reshape(2, 30, 8)
    state = _state(x0, (5, 2, 3))
    out = temporal_matching(x0, 5, **mode).merge(state)
    assert out.num_tokens == 6
    assert torch.equal(out.size, torch.full((2, 6), 5.0))
    torch.testing.assert_close(out.x, frame[:, 0])
    torch.testing.assert_close(out.pos[..., 0], torch.full((2, 6), 2.0))      # centroid of t = 0..4
    torch.testing.assert_close(out.pos[..., 1:], state.pos[:, :6, 1:])


def test_static_background_collapses_moving_content_keeps_tokens():
    torch.manual_seed(11)
    t, h, w = 6, 4, 4
    video = torch.randn(1, 1, h, w, 32).expand(1, t, h, w, 32).clone()
    video[:, :, :, 2:] = torch.randn(1, t, h, 2, 32)            # right half changes every frame
    x0 = video.reshape(1, t * h * w, 32)
    state = _state(x0, (t, h, w))
    out = temporal_matching(x0, t, threshold=0.9).merge(state)
    static, moving = h * 2, h * 2
    assert out.num_tokens == static + t * moving
    assert sorted(out.size[0].tolist()) == [1.0] * (t * moving) + [float(t)] * static
    # the static tokens are exactly the left half, at their own (h, w)
    big = out.size[0] == t
    assert (out.pos[0, big, 2] < 2).all() and (out.pos[0, ~big, 2] >= 2).all()


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,err,match", [
    (lambda x: bipartite_soft_matching(x[0], 2), ValueError, "metric must have 3 dimensions"),
    (lambda x: bipartite_soft_matching(x, -1), ValueError, "r must be >= 0"),
    (lambda x: bipartite_soft_matching(x, 2.0), TypeError, "r must be an int"),
    (lambda x: bipartite_soft_matching(x, 2, protected=13), ValueError, "protected must be <= 12"),
    (lambda x: bipartite_soft_matching(x, 2, block_size=0), ValueError, "block_size must be >= 1"),
    (lambda x: bipartite_soft_matching(x.long(), 2), TypeError, "metric must be a floating"),
    (lambda x: bipartite_soft_matching(x.index_fill(1, torch.tensor([3]), float("nan")), 2), ValueError, "NaN"),
    (lambda x: temporal_matching(x, 5, budget=1), ValueError, "frames=5 must divide"),
    (lambda x: temporal_matching(x, 3, budget=1, threshold=0.5), ValueError, "exactly one of"),
    (lambda x: temporal_matching(x, 3), ValueError, "exactly one of"),
    (lambda x: temporal_matching(x, 3, threshold=float("nan")), ValueError, "threshold must be a finite"),
    (lambda x: temporal_matching(x, 3, budget=-2), ValueError, "budget must be >= 0"),
    (lambda x: temporal_matching(x, 0, budget=1), ValueError, "frames must be >= 1"),
    (lambda x: temporal_matching(x.index_fill(1, torch.tensor([0]), float("inf")), 3, budget=1), ValueError, "NaN or Inf"),
], ids=["rank", "negative-r", "float-r", "protected>N", "block0", "int-metric", "nan-metric",
        "frames-divide", "both-modes", "no-mode", "nan-threshold", "negative-budget", "frames0", "inf-metric"])
def test_bad_input_raises(call, err, match):
    x = torch.randn(2, 12, 4)
    with pytest.raises(err, match=match):
        call(x)


def test_finite_check_tells_overflowing_sum_from_nan():
    x = (300 + torch.randn(1, 64, 8)).half()           # finite, but its fp16 sum overflows to inf
    assert torch.isinf(x.sum())
    assert bipartite_soft_matching(x, 4, block_size=3).num_out == 60
    x[0, 50, 2] = float("nan")
    with pytest.raises(ValueError, match="metric contains NaN"):
        bipartite_soft_matching(x, 4)
    # the sum is accumulated in fp32, so the fp16 case above takes the fast path; an fp32 sum that
    # overflows takes the exact, chunked one (2000 tokens: two chunks of 1024), and is still accepted
    big = torch.full((1, 2000, 2), 3e38)
    assert torch.isinf(big.sum())
    assert bipartite_soft_matching(big, 4).num_out == 1996
    big[0, 1500, 1] = float("inf")
    with pytest.raises(ValueError, match="metric contains NaN or Inf"):
        bipartite_soft_matching(big, 4)


def test_plan_rejects_mismatched_state_and_y():
    x = torch.randn(2, 10, 4)
    plan = bipartite_soft_matching(x, 3)
    with pytest.raises(ValueError, match="match the plan"):
        plan.merge(_state(torch.randn(2, 11, 4)))
    with pytest.raises(ValueError, match="y must have shape"):
        plan.unmerge(torch.randn(2, 10, 4))
    with pytest.raises(TypeError, match="state must be a TokenState"):
        plan.merge(x)
    with pytest.raises(ValueError, match="track_source=True"):
        unmerge_to_source(TokenState.from_features(x), x)
    with pytest.raises(TypeError, match="dst must be int64"):
        MergePlan(dst=torch.zeros(1, 3, dtype=torch.int32), num_out=1)


# --- the token state -------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(1.5, 2, 2), (1.0, 2, 3), (True, 2, 3), (1, 2), 6],
                         ids=["fractional", "float", "bool", "two-axes", "int"])
def test_from_features_rejects_non_int_grids(grid):
    # int() would truncate (1.5, 2, 2) to a grid of the wrong shape without a word
    with pytest.raises(ValueError, match=r"grid must be three positive ints"):
        TokenState.from_features(torch.randn(2, 6, 4), grid)


def test_from_features_accepts_integer_like_grids():
    x = torch.randn(2, 6, 4)
    want = TokenState.from_features(x, (1, 2, 3)).pos
    assert torch.equal(TokenState.from_features(x, (torch.tensor(1), 2, 3)).pos, want)
    assert torch.equal(TokenState.from_features(x, torch.Size([1, 2, 3])).pos, want)


def test_state_rejects_bad_prefix_and_fields_on_another_device():
    x = torch.randn(2, 6, 4)
    with pytest.raises(TypeError, match="prefix must be an int"):
        TokenState.from_features(x, prefix="1")
    with pytest.raises(ValueError, match="prefix must be <= 6"):
        TokenState.from_features(x, prefix=7)
    state = TokenState.from_features(x, track_source=True)
    for name in ("size", "pos", "source"):
        with pytest.raises(ValueError, match=f"{name} must be on x's device cpu, got meta"):
            state.replace(**{name: getattr(state, name).to("meta")})


def _tome_groups(metric, r, class_token, distill_token=False):
    """ToMe's own ``bipartite_soft_matching`` (facebookresearch/ToMe ``tome/merge.py``), restated: scores of
    A = even tokens (CLS included) against B = odd tokens, the CLS row set to -inf (and, with a distill
    token, B's first column), the r best A rows merge into their best B. Returns the partition as a set
    of frozensets of token indices per sample."""
    protected = int(class_token) + int(distill_token)
    r = min(r, (metric.shape[1] - protected) // 2)
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[..., 0, :] = -math.inf
    if distill_token:
        scores[..., :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    out = []
    for s_, d_ in zip(src_idx[..., 0].tolist(), dst_idx[..., 0].tolist()):
        groups = {j: {2 * j + 1} for j in range(b.shape[1])}
        merged = {2 * i for i in s_}
        for i, j in zip(s_, d_):
            groups[j].add(2 * i)
        parts = {frozenset(g) for g in groups.values()}
        parts |= {frozenset({2 * i}) for i in range(a.shape[1]) if 2 * i not in merged}
        out.append(parts)
    return out


def _plan_groups(plan):
    out = []
    for row in plan.dst.tolist():
        groups = {}
        for i, g in enumerate(row):
            groups.setdefault(g, set()).add(i)
        out.append({frozenset(v) for v in groups.values()})
    return out


@pytest.mark.parametrize("n,r", [(17, 8), (17, 3), (50, 20), (197, 16), (198, 99)], ids=lambda v: str(v))
@pytest.mark.parametrize("protected", [0, 1, 2], ids=lambda p: f"P{p}")
def test_bipartite_partition_equals_tomes_own(n, r, protected):
    """Issue 9, defect 7: with a CLS token ToMe keeps it in A (even indices from 0); taking it out of both
    sets shifted the whole partition. Compared against ToMe's algorithm on the same inputs."""
    torch.manual_seed(n * 3 + r + protected)
    x = torch.randn(2, n, 8, dtype=torch.float64)
    ours = _plan_groups(bipartite_soft_matching(x, r, protected=protected))
    theirs = _tome_groups(x, r, class_token=protected >= 1, distill_token=protected >= 2)
    assert ours == theirs
    for groups in ours:   # protected tokens stay alone
        assert all(frozenset({i}) in groups for i in range(protected))
