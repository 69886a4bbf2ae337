"""Merge schedules: closed-form counts equal what the matching actually leaves."""
from __future__ import annotations

import math

import pytest
import torch

from vlmcompress.merge import bipartite_soft_matching
from vlmcompress.schedule import merge_schedule, tokens_after

KINDS = {
    "r8": dict(r=8),
    "r40-clamped": dict(r=40),
    "r10-ramp+0.5": dict(r=10, ramp=0.5),
    "r10-ramp-0.5": dict(r=10, ramp=-0.5),
    "r12-ramp1": dict(r=12, ramp=1.0),
    "keep0.3": dict(keep_ratio=0.3),
    "keep1": dict(keep_ratio=1.0),
    "target40": dict(target=40),
    "target-tight": dict(target=13),
}


def _run(num_tokens, schedule, protected):
    """Token count after really applying bipartite matching with every r in order."""
    torch.manual_seed(num_tokens)
    x = torch.randn(2, num_tokens, 4)
    for r in schedule:
        plan = bipartite_soft_matching(x, r, protected=protected)
        assert plan.removed == r                      # already clamped: the matching removes all of it
        out = torch.zeros(2, plan.num_out, 4).scatter_add_(1, plan.dst[..., None].expand_as(x), x)
        x = out + 0.01 * torch.randn_like(out)        # keep tokens distinct for the next step
    return x.shape[1]


@pytest.mark.parametrize("kind", list(KINDS), ids=list(KINDS))
@pytest.mark.parametrize("num_tokens,layers,protected", [(197, 12, 1), (99, 6, 0), (577, 4, 1)],
                         ids=["N197-L12-P1", "N99-L6", "N577-L4-P1"])
def test_closed_form_equals_actual_count(kind, num_tokens, layers, protected):
    kw = dict(KINDS[kind])
    if "target" in kw and kind == "target-tight":
        # the fewest tokens reachable in `layers` halvings: forces front-loaded layers
        n = num_tokens
        for _ in range(layers):
            n -= (n - protected) // 2
        kw["target"] = n
    sched = merge_schedule(num_tokens, layers, protected=protected, **kw)
    assert len(sched) == layers and all(isinstance(v, int) and v >= 0 for v in sched)
    closed = tokens_after(num_tokens, sched, protected=protected)
    assert closed == num_tokens - sum(sched)
    assert closed == _run(num_tokens, sched, protected)
    if "keep_ratio" in kw:
        assert closed == math.ceil(kw["keep_ratio"] * num_tokens)
    if "target" in kw:
        assert closed == kw["target"]


def test_constant_and_ramp_values():
    assert merge_schedule(1000, 4, r=8) == [8, 8, 8, 8]
    assert merge_schedule(1000, 5, r=10, ramp=0.5) == [15, 12, 10, 8, 5]
    assert merge_schedule(1000, 5, r=10, ramp=-0.5) == [5, 8, 10, 12, 15]
    assert merge_schedule(10, 3, r=8) == [5, 2, 1]             # clamped to (n - protected) // 2
    assert merge_schedule(11, 3, r=8, protected=1) == [5, 2, 1]


def test_keep_ratio_one_and_target_n_are_identity():
    assert merge_schedule(197, 12, keep_ratio=1.0, protected=1) == [0] * 12
    assert merge_schedule(197, 12, target=197) == [0] * 12


@pytest.mark.parametrize("keep_ratio,num_tokens,kept", [(0.07, 100, 7), (0.28, 25, 7), (0.14, 50, 7), (0.071, 100, 8)],
                         ids=["0.07-of-100", "0.28-of-25", "0.14-of-50", "0.071-of-100"])
def test_keep_ratio_count_is_not_bumped_by_float_error(keep_ratio, num_tokens, kept):
    # keep_ratio * num_tokens is 7.000000000000001 for the first three in float: ceil must still give 7
    sched = merge_schedule(num_tokens, 6, keep_ratio=keep_ratio)
    assert tokens_after(num_tokens, sched) == kept


def test_target_is_spread_evenly_when_possible():
    sched = merge_schedule(1000, 4, target=600)
    assert sched == [100, 100, 100, 100]
    assert max(merge_schedule(1001, 3, target=700)) - min(merge_schedule(1001, 3, target=700)) <= 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "exactly one of"),
    (dict(r=2, target=5), "exactly one of"),
    (dict(r=-1), "r must be >= 0"),
    (dict(r=2, ramp=1.5), "ramp must be"),
    (dict(keep_ratio=0.0), "keep_ratio must be"),
    (dict(keep_ratio=1.2), "keep_ratio must be"),
    (dict(target=101), "target must be <= 100"),
    (dict(target=5), "cannot reach 5 tokens"),
    (dict(target=5, ramp=0.5), "cannot reach 5 tokens"),
], ids=["none", "two", "neg-r", "ramp-range", "keep0", "keep>1", "target>N", "unreachable", "unreachable-ramp"])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        merge_schedule(100, 3, **kwargs)


def test_tokens_after_rejects_bad_schedule():
    with pytest.raises(ValueError, match=r"schedule\[1\] must be >= 0"):
        tokens_after(10, [1, -1])
    with pytest.raises(TypeError, match=r"schedule\[0\] must be an int"):
        tokens_after(10, [1.5])


def test_kept_count_is_float_safe_and_keeps_one():
    from vlmcompress.schedule import kept_count

    assert kept_count(0.07, 100) == 7 and kept_count(0.28, 25) == 7 and kept_count(0.14, 50) == 7
    assert kept_count(0.5, 7) == 4
    assert kept_count(1e-9, 10) == 1


def test_ramp_with_a_target_is_the_vision_tower_ramp():
    """One ramp (issue 9): merge_schedule(target=, ramp=) is what the vision tower's vision_ramp uses."""
    from vlmcompress import CompressionConfig
    from vlmcompress.adapters.vision_merge import tower_schedule

    sched = merge_schedule(577, 12, target=289, ramp=0.5, protected=1)
    assert sum(sched) == 577 - 289 and sched[0] > sched[-1]
    assert sched == tower_schedule(577, 12, CompressionConfig(vision_keep=0.5, vision_ramp=0.5), protected=1)
    assert merge_schedule(100, 4, target=60, ramp=0.0) == merge_schedule(100, 4, target=60)
