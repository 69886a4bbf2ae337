"""Stage B as plans (DESIGN.md §9): Plan.apply, the built-in steps, the two baselines (RandomDrop,
UniformPool), custom steps through CompressionConfig.from_steps, and issue 9's defects 1 and 2 end to end."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import vlmcompress as vc
from vlmcompress.plan import Plan
from vlmcompress.pool import grid_for_budget, prompt_guided_pool
from vlmcompress.state import TokenState
from vlmcompress.steps import (MergeToBudget, PromptGuidedPool, RandomDrop, StepContext, TemporalMerge, UniformPool,
                               apply_steps)
from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, generate_tokens


def _state(grid, c=5, seed=0, b=1):
    g = torch.Generator().manual_seed(seed)
    return TokenState.from_features(torch.randn(b, math.prod(grid), c, generator=g), grid, track_source=True)


# --- Plan ---------------------------------------------------------------------------------------------------
def test_plan_rejects_a_non_partition_with_a_clear_error():
    with pytest.raises(ValueError, match="owns no input token"):
        Plan(torch.tensor([[0, 0, 2, 2]]), 3)
    with pytest.raises(ValueError, match=r"\[0, 2\) or -1"):
        Plan(torch.tensor([[0, 1, 2]]), 2)
    with pytest.raises(TypeError, match="int64"):
        Plan(torch.tensor([[0, 1]], dtype=torch.int32), 2)


def test_plan_group_mean_is_weighted_and_sizes_add():
    state = _state((1, 1, 4))
    state = state.replace(size=torch.tensor([[1.0, 3.0, 2.0, 2.0]]))
    plan = Plan(torch.tensor([[0, 0, 1, 1]]), 2)
    out = plan.apply(state)
    x = state.x[0]
    torch.testing.assert_close(out.x[0, 0], (1 * x[0] + 3 * x[1]) / 4)
    torch.testing.assert_close(out.x[0, 1], (x[2] + x[3]) / 2)
    assert out.size[0].tolist() == [4.0, 4.0]
    assert out.source[0].tolist() == [0, 0, 1, 1]
    # Explicit weights replace the sizes for x and pos, never for size.
    w = Plan(torch.tensor([[0, 0, 1, 1]]), 2, weight=torch.tensor([[1.0, 0.0, 1.0, 1.0]])).apply(state)
    torch.testing.assert_close(w.x[0, 0], x[0])
    assert w.size[0].tolist() == [4.0, 4.0]


def test_plan_keep_drops_the_rest_and_marks_them():
    state = _state((1, 2, 3))
    out = Plan.keep(torch.tensor([[1, 4]]), 6).apply(state)
    assert torch.equal(out.x[0], state.x[0, [1, 4]]) and torch.equal(out.pos[0], state.pos[0, [1, 4]])
    assert out.size[0].tolist() == [1.0, 1.0]
    assert out.source[0].tolist() == [-1, 0, -1, -1, 1, -1]
    with pytest.raises(ValueError, match="increasing"):
        Plan.keep(torch.tensor([[4, 1]]), 6)


# --- the baselines -------------------------------------------------------------------------------------------
SIZES = [((1, 24, 24), 0.1, None), ((1, 27, 27), 0.25, None), ((8, 14, 14), 0.25, None), ((16, 14, 14), None, 300),
         ((1, 6, 6), 0.5, 7), ((3, 5, 7), 0.3, None)]


@pytest.mark.parametrize("grid,keep,budget", SIZES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_random_drop_keeps_exactly_the_pooled_count(grid, keep, budget):
    kw = dict(keep_ratio=keep if keep is not None else 1.0, token_budget=budget)
    state = _state(grid)
    pooled, pooled_grid = apply_steps(state, grid, [PromptGuidedPool(**kw)])
    dropped, dgrid = apply_steps(state, grid, [RandomDrop(**kw, seed=3)])
    uniform, ugrid = apply_steps(state, grid, [UniformPool(**kw)])
    assert dropped.num_tokens == pooled.num_tokens == uniform.num_tokens == math.prod(pooled_grid)
    assert ugrid == pooled_grid == grid_for_budget(grid, min(math.prod(grid), *(
        [math.ceil(round(keep * math.prod(grid), 9))] if keep else []), *([budget] if budget else [])))
    assert dgrid is None
    # Kept tokens are originals, untouched, in order; nothing is averaged in; dropped patches are -1.
    src = dropped.source[0]
    kept = (src >= 0).nonzero()[:, 0]
    assert kept.numel() == dropped.num_tokens and torch.equal(src[kept], torch.arange(kept.numel()))
    assert torch.equal(dropped.x[0], state.x[0, kept]) and torch.equal(dropped.pos[0], state.pos[0, kept])
    assert torch.equal(dropped.size, torch.ones_like(dropped.size))


def test_random_drop_is_seeded_uniform_and_batch_independent():
    grid = (1, 12, 12)
    state = _state(grid, b=2)
    a = RandomDrop(keep_ratio=0.25, seed=1)(state, grid, StepContext())[0].dst
    assert torch.equal(a, RandomDrop(keep_ratio=0.25, seed=1)(state, grid, StepContext())[0].dst)
    assert not torch.equal(a, RandomDrop(keep_ratio=0.25, seed=2)(state, grid, StepContext())[0].dst)
    assert torch.equal(a[0], a[1])          # each item its own draw from the seed, batch or not
    # Uniform: over many seeds every token is kept about keep_ratio of the time.
    hits = sum((RandomDrop(keep_ratio=0.25, seed=s)(_state(grid), grid, StepContext())[0].dst[0] >= 0).float()
               for s in range(400))
    assert 0.15 < float(hits.min()) / 400 and float(hits.max()) / 400 < 0.35


def test_uniform_pool_is_relevance_free_average_pooling():
    grid, keep = (4, 6, 6), 0.2
    state = _state(grid)
    out, g = apply_steps(state, grid, [UniformPool(keep_ratio=keep)])
    ref = prompt_guided_pool(state, grid, g, None)
    assert torch.equal(out.x, ref.x) and torch.equal(out.size, ref.size)
    # Grid-less: runs of consecutive tokens, exactly the target count, plain means.
    flat, none = apply_steps(state, None, [UniformPool(token_budget=10)])
    assert none is None and flat.num_tokens == 10
    torch.testing.assert_close(flat.x[0, 0], state.x[0, :15].mean(0))
    assert flat.size.sum() == state.size.sum()


def test_budgeted_steps_reject_bad_settings():
    with pytest.raises(ValueError, match="RandomDrop: keep_ratio"):
        RandomDrop(keep_ratio=0)
    with pytest.raises(ValueError, match="UniformPool: token_budget"):
        UniformPool(token_budget=0)
    with pytest.raises(ValueError, match="exactly one of threshold"):
        TemporalMerge()
    with pytest.raises(TypeError, match="seed"):
        RandomDrop(keep_ratio=0.5, seed=1.5)


# --- composition and custom steps --------------------------------------------------------------------------
def test_apply_steps_checks_what_a_step_returns():
    state, grid = _state((1, 2, 4)), (1, 2, 4)
    with pytest.raises(TypeError, match="must return"):
        apply_steps(state, grid, [lambda s, g, c: s])
    with pytest.raises(ValueError, match="grid"):
        apply_steps(state, grid, [lambda s, g, c: (Plan.identity(1, 8), (1, 3, 3))])
    with pytest.raises(TypeError, match="instance"):
        apply_steps(state, grid, [RandomDrop])


def test_merge_then_temporal_is_refused_and_config_orders_temporal_first():
    """Issue 9, defect 2: after bipartite merging no frame grid remains."""
    grid = (4, 3, 3)
    state = _state(grid)
    with pytest.raises(ValueError, match="TemporalMerge needs"):
        apply_steps(state, grid, [MergeToBudget(keep_ratio=0.5), TemporalMerge(keep=0.5)])
    cfg = vc.CompressionConfig(keep_ratio=0.5, budget_method="merge", temporal_keep=0.5)
    steps = cfg.stage_b_steps()
    assert [type(s).__name__ for s in steps] == ["TemporalMerge", "MergeToBudget"]
    out, _ = apply_steps(state, grid, steps)
    assert out.num_tokens == 18 and float(out.size.sum()) == 36


def test_config_from_steps_and_its_errors():
    cfg = vc.CompressionConfig.from_steps(RandomDrop(keep_ratio=0.25), v2pe_delta=0.5)
    assert cfg.steps == (RandomDrop(keep_ratio=0.25),) and cfg.compresses_tokens and not cfg.is_identity
    assert cfg.stage_b_steps() == cfg.steps
    assert cfg.to_dict()["steps"] == ["RandomDrop(keep_ratio=0.25, token_budget=None, seed=0)"]
    assert vc.CompressionConfig(steps=[UniformPool(keep_ratio=0.5)]).steps == (UniformPool(keep_ratio=0.5),)
    with pytest.raises(ValueError, match=r"steps= replaces the stage-B fields.*keep_ratio"):
        vc.CompressionConfig(steps=(RandomDrop(keep_ratio=0.5),), keep_ratio=0.5)
    with pytest.raises(TypeError, match="callable"):
        vc.CompressionConfig(steps=(0.5,))
    assert vc.CompressionConfig(steps=()).is_identity


# --- end to end through generate() ---------------------------------------------------------------------------
def _image_inputs(question="What is this?", seed=0, before=False):
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    return chat_inputs(cached_processor("llava"), [([("image", img)], question)])


def _prefill_len(model, inputs):
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        generate_tokens(model, inputs)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("step", [RandomDrop(keep_ratio=0.25, seed=0), UniformPool(keep_ratio=0.25),
                                  PromptGuidedPool(keep_ratio=0.25)], ids=lambda s: type(s).__name__)
def test_baselines_run_through_generate_at_the_same_count(step):
    model = cached_model("llava")
    inputs = _image_inputs()
    with vc.compressed(model, vc.CompressionConfig.from_steps(step)) as m:
        n = _prefill_len(m, inputs)
        report = m.vlmcompress.report
    # (1, 6, 6) grid, 36 placeholders, keep 0.25 -> 9 -> grid (1, 3, 3)
    assert report.items[0].after_compress == 9 and n == inputs["input_ids"].shape[1] - 27


def test_custom_step_every_other_token():
    def every_other(state, grid, ctx):
        n = state.num_tokens
        return Plan((torch.arange(n) // 2).expand(state.batch, n).clone(), (n + 1) // 2), None

    model = cached_model("llava")
    inputs = _image_inputs()
    with vc.compressed(model, vc.CompressionConfig.from_steps(every_other)) as m:
        out = generate_tokens(m, inputs)
        assert m.vlmcompress.report.items[0].after_compress == 18
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@functools.lru_cache(maxsize=1)
def _scorer():
    return vc.tiny_clip_scorer(0)


@pytest.mark.parametrize("budget", [16, 25, 20], ids=lambda b: f"budget{b}")
def test_relevance_pooling_with_overlapping_windows_generates(budget):
    """Issue 9, defect 1: 6×6 pooled to 4×4 / 5×5 / 5×4 has overlapping windows; with sharp relevance a
    window could own no patch and generate() raised 'do not map to increasing placeholder slots'."""
    model = cached_model("llava")
    inputs = _image_inputs("a white square on the left")
    cfg = vc.CompressionConfig(token_budget=budget, relevance=_scorer(), pool_tau=0.001)
    with vc.compressed(model, cfg, processor=cached_processor("llava")) as m:
        out = generate_tokens(m, inputs)
        item = m.vlmcompress.report.items[0]
    assert item.after_compress == math.prod(grid_for_budget((1, 6, 6), budget))
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert float(item.size.sum()) == 36


def test_merge_budget_with_temporal_merging_on_a_video():
    """Issue 9, defect 2: budget_method='merge' + temporal merging raised 'frames=4 must divide N=18'."""
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    model = cached_model("llava_onevision")
    inputs = chat_inputs(cached_processor("llava_onevision"), [([("video", video)], "What happens?")])
    cfg = vc.CompressionConfig(keep_ratio=0.5, budget_method="merge", temporal_keep=0.5)
    with vc.compressed(model, cfg) as m:
        out = generate_tokens(m, inputs)
        item = m.vlmcompress.report.items[0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    assert item.after_compress == math.ceil(0.5 * item.placeholders)


def test_temporal_merge_runs_on_frame_blocks_without_a_grid():
    """A grid-less item whose tokens are still T equal frame blocks (StepContext.token_frames: Qwen after
    stage A) merges like the grid item with the same frames; once a step merges across the blocks they
    are gone, and temporal merging is refused again."""
    from vlmcompress.merge import temporal_matching

    state = _state((4, 3, 3), seed=7)
    step = TemporalMerge(threshold=0.2)
    plan, grid = step(state, None, StepContext(token_frames=4))
    expected = Plan.from_merge(temporal_matching(state.x, 4, threshold=0.2))
    assert grid is None and torch.equal(plan.dst, expected.dst) and plan.num_out == expected.num_out < 36
    gridded, _ = step(state, (4, 3, 3), StepContext())
    assert torch.equal(gridded.dst, plan.dst)
    # keep= per block
    plan, _ = TemporalMerge(keep=0.5)(state, None, StepContext(token_frames=4))
    assert plan.num_out == 9 + 3 * 5
    # apply_steps: blocks survive an identity step, not a merge across them
    out, _ = apply_steps(state, None, [TemporalMerge(threshold=1.0), step], StepContext(token_frames=4))
    assert out.num_tokens == expected.num_out
    with pytest.raises(ValueError, match="put TemporalMerge before it"):
        apply_steps(state, None, [MergeToBudget(keep_ratio=0.5), step], StepContext(token_frames=4, item_grid=(4, 3, 3)))
    with pytest.raises(ValueError, match="token_frames=5 does not split"):
        step(state, None, StepContext(token_frames=5))
