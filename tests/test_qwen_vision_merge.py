"""Stage A on the Qwen-VL towers (adapters/qwen_vision_merge.py): identity, segments, sizes, rotary at
centroids, closed-form counts, batch = singles, the patched model's generate(), clear errors."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from vlmcompress.adapters import patch, unpatch  # noqa: E402
from vlmcompress.adapters.qwen_vision_merge import QwenVisionMerge, qwen_segments, qwen_tokens_after  # noqa: E402
from vlmcompress.config import CompressionConfig  # noqa: E402
from vlmcompress.positions import rotary_cos_sin  # noqa: E402
from vlmcompress.testing.adapter_checks import (cached_model, cached_processor, chat_inputs,  # noqa: E402
                                                generate_tokens, random_media)

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
# 96×96 px at patch 8 = 6×6 units: four Qwen2.5-VL windows of 4×4, 4×2, 2×4 and 2×2 units.
IMAGE_SIZES = [(96, 96), (48, 80)]


def _inputs(family: str, kind: str, rows=(0, 1)):
    media = []
    for i in rows:
        if kind == "image":
            media.append(random_media("image", 10 + i, size=IMAGE_SIZES[i], frame_size=None, frames=1))
        else:
            media.append(random_media("video", 20 + i, size=None, frame_size=IMAGE_SIZES[i], frames=4))
    return chat_inputs(cached_processor(family), [([(kind, m)], "What is shown?") for m in media])


def _tower_io(family, kind, rows=(0, 1)):
    inputs = _inputs(family, kind, rows)
    pixels, grid = (inputs[k] for k in KEYS[kind])
    return cached_model(family).model.visual, pixels, grid


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_is_the_tower_bit_for_bit(family, kind):
    tower, pixels, grid = _tower_io(family, kind)
    ref = tower(pixels.type(tower.dtype), grid_thw=grid)
    out = QwenVisionMerge(tower, CompressionConfig())(pixels, grid)
    assert torch.equal(torch.cat(out.features), ref.pooler_output)
    if family == "qwen3_vl":
        assert len(out.deepstack) == len(ref.deepstack_features) > 0
        for mine, theirs in zip(out.deepstack, ref.deepstack_features):
            assert torch.equal(torch.cat(mine), theirs)
    for state, g in zip(out.states, grid.tolist()):
        n = g[0] * g[1] * g[2] // 4
        assert torch.equal(state.source[0], torch.arange(n)) and bool((state.size == 1).all())


def _segment_ids(family, state, grid_row):
    """Per original unit (raster order) the attention segment it belongs to: its frame, and for
    Qwen2.5-VL its window (4×4 units) inside the frame."""
    t, h, w = grid_row
    hu, wu = h // 2, w // 2
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(hu), torch.arange(wu), indexing="ij")
    if family == "qwen2_5_vl":
        return (tt * 100 + (hh // 4) * 10 + ww // 4).flatten()
    return tt.flatten()


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_units_stay_in_their_segment_and_sizes_add_up(family, kind):
    tower, pixels, grid = _tower_io(family, kind)
    config = CompressionConfig(vision_keep=0.25)
    out = QwenVisionMerge(tower, config)(pixels, grid)
    assert [f.shape[0] for f in out.features] == qwen_tokens_after(grid, tower.config, config)
    for state, g in zip(out.states, grid.tolist()):
        n0 = g[0] * g[1] * g[2] // 4
        m = state.num_tokens
        assert m < n0                                     # it merged
        src = state.source[0]
        # every token owns at least one unit, its size counts them, and sizes sum to the original count
        counts = torch.bincount(src, minlength=m)
        assert bool((counts >= 1).all()) and torch.equal(state.size[0], counts.float())
        assert float(state.size.sum()) == n0
        seg = _segment_ids(family, state, g)
        lo = torch.full((m,), 10**9).scatter_reduce(0, src, seg, reduce="amin")
        hi = torch.full((m,), -1).scatter_reduce(0, src, seg, reduce="amax")
        assert torch.equal(lo, hi), "a merged unit spans two attention segments (frames or windows)"
        # centroid = mean of the members' unit positions; first members increase (placeholder order)
        units = QwenVisionMerge(tower, config).unit_positions(torch.tensor([g]))
        centroid = torch.zeros(m, 3, dtype=torch.float64).index_add_(0, src, units) / counts[:, None]
        torch.testing.assert_close(state.pos[0], centroid, rtol=0, atol=1e-9)
        first = torch.full((m,), n0).scatter_reduce(0, src, torch.arange(n0), reduce="amin")
        assert bool((first[1:] > first[:-1]).all())
    if family == "qwen2_5_vl" and kind == "image":
        assert len(qwen_segments(grid, tower.config)[0]) == 4    # the test above had windows to respect


@pytest.mark.parametrize("family", FAMILIES)
def test_rotary_at_integer_centroids_is_the_models_and_follows_fractional_ones(family):
    from transformers.vision_utils import get_vision_position_ids

    tower, pixels, grid = _tower_io(family, "image", rows=(1,))
    handle = QwenVisionMerge(tower, CompressionConfig(vision_keep=0.5))
    x = torch.zeros(1, tower.config.hidden_size if family != "qwen2_vl" else tower.config.embed_dim)
    ours = tower.rotary_pos_emb(x, handle.patch_positions(handle.unit_positions(grid)))
    theirs = tower.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # A unit at a fractional centroid: every patch gets cos/sin of its float position, per axis as
    # rotary_cos_sin gives them (Qwen's layout: [h freqs, w freqs] twice).
    centroid = torch.tensor([[0.0, 1.5, 2.25]], dtype=torch.float64)
    cos, sin = tower.rotary_pos_emb(x, handle.patch_positions(centroid))
    quarter = cos.shape[-1] // 4
    base = float(tower.config.rope_parameters["rope_theta"]) if hasattr(tower.config, "rope_parameters") else 10000.0
    expect_h = torch.tensor([3.0, 3.0, 4.0, 4.0])
    expect_w = torch.tensor([4.5, 5.5, 4.5, 5.5])
    ch, sh = rotary_cos_sin(expect_h, 2 * quarter, base)
    cw, sw = rotary_cos_sin(expect_w, 2 * quarter, base)
    torch.testing.assert_close(cos[:, :quarter], ch[:, :quarter], rtol=0, atol=1e-6)
    torch.testing.assert_close(cos[:, quarter:2 * quarter], cw[:, :quarter], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, quarter:2 * quarter], sw[:, :quarter], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[:, :quarter], sh[:, :quarter], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["image", "video"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_sizes_equals_singles(family, kind):
    tower, pixels, grid = _tower_io(family, kind)
    handle = QwenVisionMerge(tower, CompressionConfig(vision_keep=0.5))
    both = handle(pixels, grid)
    start = 0
    for i, g in enumerate(grid.tolist()):
        n = g[0] * g[1] * g[2]
        single = handle(pixels[start:start + n], grid[i:i + 1])
        start += n
        assert torch.equal(single.states[0].source, both.states[i].source)
        assert torch.equal(single.states[0].size, both.states[i].size)
        torch.testing.assert_close(single.features[0], both.features[i], rtol=1e-5, atol=1e-5)
        for a, b in zip(single.deepstack, both.deepstack):
            torch.testing.assert_close(a[0], b[i], rtol=1e-5, atol=1e-5)


def test_proportional_attention_changes_the_merged_layers():
    tower, pixels, grid = _tower_io("qwen2_vl", "image", rows=(0,))
    # ramp > 0 merges in layer 0, so layer 1 attends over merged units: the log-size bias must matter there
    on = QwenVisionMerge(tower, CompressionConfig(vision_keep=0.5, vision_ramp=0.5))(pixels, grid)
    off = QwenVisionMerge(tower, CompressionConfig(vision_keep=0.5, vision_ramp=0.5,
                                                   proportional_attention=False))(pixels, grid)
    assert torch.equal(on.states[0].source, off.states[0].source)
    assert not torch.allclose(on.features[0], off.features[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_generate_with_cache(family):
    model = cached_model(family)
    inputs = _inputs(family, "video")
    config = CompressionConfig(vision_keep=0.5)
    grids = inputs["video_grid_thw"]
    planned = qwen_tokens_after(grids, model.model.visual.config, config)
    patch(model, config)
    try:
        cached = generate_tokens(model, inputs)
        report = model.vlmcompress.report
        assert [it.after_vision for it in report.items] == planned
        assert [it.after_compress for it in report.items] == planned
        before = inputs["attention_mask"].sum(1)
        assert report.prefill_after == [int(b) - (it.placeholders - p) for b, it, p in
                                        zip(before, report.items, planned)]
        uncached = generate_tokens(model, inputs, use_cache=False)
        assert torch.equal(cached, uncached)          # KV-cache decoding continues at the right positions
        # stage B after stage A: merged to the budget (no grid is left for pooling)
        model.vlmcompress.config = CompressionConfig(vision_keep=0.5, keep_ratio=0.25)
        generate_tokens(model, inputs)
        assert [it.after_compress for it in model.vlmcompress.report.items] == \
            [max(1, -(-it.placeholders // 4)) for it in model.vlmcompress.report.items]
    finally:
        unpatch(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_at_integer_centroids_are_the_models(family):
    from vlmcompress.adapters.registry import adapter_for

    model = cached_model(family)
    adapter = adapter_for(model)
    inputs = _inputs(family, "image", rows=(1,))
    pos = adapter.original_positions(inputs)[:, 0]                      # [3, L]
    slots = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    item = pos[:, slots].T                                             # [N0, 3]
    grid = adapter.token_grids(inputs["image_grid_thw"])[0]
    units = QwenVisionMerge(model.model.visual, CompressionConfig()).unit_positions(inputs["image_grid_thw"])
    assert torch.equal(adapter.grid_to_positions(item, units, grid), item)
    # the centroid of two neighbours is the mean of their positions
    mid = adapter.grid_to_positions(item, (units[:1] + units[1:2]) / 2, grid)
    torch.testing.assert_close(mid[0], (item[0] + item[1]) / 2)


def test_bad_settings_raise_clear_errors():
    clip_tower = cached_model("llava").model.vision_tower
    with pytest.raises(TypeError, match="Qwen-VL vision merging supports"):
        QwenVisionMerge(clip_tower, CompressionConfig(vision_keep=0.5))
    with pytest.raises(ValueError, match="vision_keep"):
        CompressionConfig(vision_keep=0.0)
    tower, pixels, _ = _tower_io("qwen2_vl", "image", rows=(0,))
    with pytest.raises(ValueError, match="grid_thw"):
        QwenVisionMerge(tower, CompressionConfig(vision_keep=0.5))(pixels, torch.tensor([1, 12, 12]))


def test_merged_layers_rotate_at_fractional_centroids(monkeypatch):
    tower, pixels, grid = _tower_io("qwen2_vl", "image", rows=(0,))
    seen = []
    original = tower.rotary_pos_emb.forward
    monkeypatch.setattr(tower.rotary_pos_emb, "forward", lambda x, p: (seen.append(p), original(x, p))[1])
    QwenVisionMerge(tower, CompressionConfig(vision_keep=0.5, vision_ramp=0.5))(pixels, grid)
    assert len(seen) == 2          # the tower's positions, then the centroids after the layer-0 merge
    assert bool((seen[1] != seen[1].round()).any())


@pytest.mark.parametrize("family", FAMILIES)
def test_temporal_merging_follows_stage_a(family):
    """Stage A leaves no grid, but every temporal patch keeps the same number of merged units, frame after
    frame (EncodedItems.token_frames): temporal merging runs on those blocks. At threshold -1 every token
    of a later temporal patch merges into the one before it, so one block's worth is left."""
    from vlmcompress.schedule import kept_count
    from vlmcompress.steps import TemporalMerge

    model = cached_model(family)
    inputs = _inputs(family, "video")
    grids = inputs["video_grid_thw"]
    tower = qwen_tokens_after(grids, model.model.visual.config, CompressionConfig(vision_keep=0.5))
    patch(model, CompressionConfig.from_steps(TemporalMerge(threshold=-1.0), vision_keep=0.5))
    try:
        cached = generate_tokens(model, inputs)
        report = model.vlmcompress.report
        assert [it.after_vision for it in report.items] == tower
        frames = [int(t) for t in grids[:, 0].tolist()]
        assert min(frames) > 1
        assert [it.after_compress for it in report.items] == [n // t for n, t in zip(tower, frames)]
        for it, t in zip(report.items, frames):     # sizes still add up to the placeholders
            assert round(float(it.size.sum())) == it.placeholders
            # the blocks are the temporal patches: everything merged into the first one, so every LLM token
            # holds units of temporal patch 0, and together they hold every unit
            frame_of = torch.arange(it.placeholders) // (it.placeholders // t)
            assert bool((it.source >= 0).all())
            for token in range(it.after_compress):
                assert frame_of[it.source == token].min() == 0
            assert set(frame_of[it.source >= 0].tolist()) == set(range(t))
        assert torch.equal(cached, generate_tokens(model, inputs, use_cache=False))
        # keep= (a budget per block) gives its closed-form count
        model.vlmcompress.config = CompressionConfig.from_steps(TemporalMerge(keep=0.5), vision_keep=0.5)
        generate_tokens(model, inputs)
        per = [n // t for n, t in zip(tower, frames)]
        assert [it.after_compress for it in model.vlmcompress.report.items] == \
            [p + (t - 1) * kept_count(0.5, p) for p, t in zip(per, frames)]
    finally:
        unpatch(model)


class _FirstChannelScorer:
    """Relevance from the VLM's own features (channel 0): deterministic, no CLIP needed."""

    def score_features(self, question, features, grid):
        return features[..., 0]


@pytest.mark.parametrize("family", FAMILIES)
def test_relevance_pooling_follows_stage_a_on_the_spread_grid(family):
    """Relevance-guided pooling needs the token grid: the merged units are spread back over the units they
    hold (the tower still runs on fewer tokens), and pooling sees exactly those features on the full grid."""
    from vlmcompress.adapters.qwen_vl import QwenVLAdapter
    from vlmcompress.steps import pooled_count
    from vlmcompress.state import TokenState

    model = cached_model(family)
    inputs = _inputs(family, "video")
    grids = inputs["video_grid_thw"]
    config = CompressionConfig(vision_keep=0.5, keep_ratio=0.25, relevance=_FirstChannelScorer())
    merged_rows = []
    hook = model.model.visual.merger.register_forward_hook(lambda m, a, o: merged_rows.append(o.shape[0]))
    patch(model, config)
    try:
        adapter = model.vlmcompress.adapter
        generate_tokens(model, inputs, question="What is shown?")
        report = model.vlmcompress.report
        full = [t * h * w // 4 for t, h, w in grids.tolist()]
        assert [it.placeholders for it in report.items] == full
        assert [it.after_vision for it in report.items] == full                 # spread back: the grid again
        assert sum(merged_rows) == sum(qwen_tokens_after(grids, model.model.visual.config,
                                                         CompressionConfig(vision_keep=0.5)))
        token_grids = adapter.token_grids(grids)
        assert [it.grid for it in report.items] == token_grids
        ones = [TokenState.from_features(torch.zeros(1, n, 1), g) for n, g in zip(full, token_grids)]
        assert [it.after_compress for it in report.items] == [pooled_count(s, g, 0.25) for s, g in zip(ones, token_grids)]
        # every unit carries the features of the merged token that holds it
        enc = QwenVLAdapter._encode_merged(adapter, "video", dict(inputs))
        merged = adapter._vision(inputs["pixel_values_videos"], grids)
        for f, m, st in zip(enc.features, merged.features, merged.states):
            assert torch.equal(f, m[st.source[0]])
        # with frame skipping first: only the kept temporal patch is encoded, merged, spread and pooled
        from vlmcompress.frame_skip import FrameSkip
        from vlmcompress.steps import PromptGuidedPool

        model.vlmcompress.config = CompressionConfig.from_steps(
            FrameSkip(threshold=1e9), PromptGuidedPool(keep_ratio=0.25, relevance=_FirstChannelScorer()), vision_keep=0.5)
        merged_rows.clear()
        generate_tokens(model, inputs, question="What is shown?")
        report = model.vlmcompress.report
        assert [it.skipped_frames for it in report.items] == [list(range(1, t)) for t in grids[:, 0].tolist()]
        assert sum(merged_rows) == sum(qwen_tokens_after(grids.clone().index_fill_(1, torch.tensor([0]), 1),
                                                         model.model.visual.config, CompressionConfig(vision_keep=0.5)))
        for it in report.items:
            assert round(float(it.size.sum())) == it.placeholders and it.after_compress <= -(-it.placeholders // 4)
    finally:
        hook.remove()
        unpatch(model)
