"""Frame skipping (vlmcompress/frame_skip.py): selection, the token record of skipped frames, the step, and
the Qwen adapters that skip before the tower (a static video encodes one temporal patch)."""
from __future__ import annotations

import math

import pytest
import torch

from vlmcompress.config import CompressionConfig
from vlmcompress.frame_skip import (FrameSkip, expand_skipped, frame_proxy, select_frames, skip_plan,
                                    skipped_state)
from vlmcompress.state import TokenState, grid_positions
from vlmcompress.steps import PromptGuidedPool, StepContext, apply_steps


def _frames(pattern, size=(32, 48), seed=0):
    """uint8 ``[T, H, W, 3]``: frame t is random image ``pattern[t]`` (equal letters, equal frames)."""
    gen = torch.Generator().manual_seed(seed)
    images = {k: torch.randint(0, 256, (*size, 3), generator=gen, dtype=torch.uint8) for k in sorted(set(pattern))}
    return torch.stack([images[k] for k in pattern])


# --- selection -----------------------------------------------------------------------------------
def test_threshold_skips_duplicates_of_the_last_kept_frame():
    frames = _frames("aaabbcaa")
    sel = select_frames(frame_proxy(frames), threshold=0.0)
    assert sel.kept == [0, 3, 5, 6] and sel.skipped == [1, 2, 4, 7]
    assert sel.owner == (0, 0, 0, 3, 3, 5, 6, 6)
    assert sel.distance[1] == 0.0 and sel.distance[3] > 0.1


def test_threshold_compares_with_the_last_kept_frame_not_the_previous_one():
    # A slow drift: every frame is close to its predecessor, but the drift adds up.
    base = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    ramp = torch.linspace(0, 1, 16)[:, None, None]                 # brightening left to right
    frames = torch.cat([base + 0.05 * t * ramp[None] for t in range(10)])
    proxy = frame_proxy(frames, cell=4)
    step = float(select_frames(proxy, threshold=0.0).distance[1])
    sel = select_frames(proxy, threshold=1.5 * step)
    assert 1 < len(sel.kept) < 10                                 # neither everything nor one frame
    assert sel.kept[1] == 2                                       # 2 steps from frame 0 exceed 1.5 steps


def test_budget_keeps_the_biggest_changes_and_exactly_the_budget():
    frames = _frames("aaaabbbcdd")
    sel = select_frames(frame_proxy(frames), budget=4)
    assert sel.kept == [0, 4, 7, 8]
    assert len(select_frames(frame_proxy(frames), budget=20).kept) == 10
    assert select_frames(frame_proxy(frames), budget=1).kept == [0]


def test_groups_skip_whole_temporal_patches():
    # Qwen encodes 2 frames per temporal patch: a patch is skipped only when both of its frames repeat.
    frames = _frames("aaaaabab")   # units (aa)(aa)(ab)(ab)
    sel = select_frames(frame_proxy(frames), threshold=0.0, group=2)
    assert sel.group == 2 and sel.owner == (0, 0, 2, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(threshold=-0.1), "threshold"), (dict(threshold=float("nan")), "threshold"),
    (dict(threshold=math.inf), "threshold"), (dict(threshold=True), "threshold"),
    (dict(budget=0), "budget"), (dict(budget=2.5), "budget"), (dict(), "exactly one"),
    (dict(threshold=0.1, budget=2), "exactly one"), (dict(threshold=0.1, group=3), "units of 3"),
], ids=["negative", "nan", "inf", "bool", "budget0", "budget-float", "neither", "both", "group"])
def test_bad_settings_raise_clear_errors(kwargs, match):
    proxy = frame_proxy(_frames("aabb"))
    with pytest.raises(ValueError, match=match):
        select_frames(proxy, **kwargs)
    if "group" not in kwargs:
        with pytest.raises(ValueError, match=match):
            FrameSkip(**kwargs)


# --- the token record ----------------------------------------------------------------------------
def test_skipped_state_equals_merging_the_copies_and_sizes_add_up():
    grid = (5, 2, 3)
    sel = select_frames(frame_proxy(_frames("aabbb")), threshold=0.0)
    kept = torch.randn(len(sel.kept) * 6, 8, dtype=torch.float64)
    state = skipped_state(kept, sel, grid)
    full = expand_skipped(kept, sel, grid).unsqueeze(0)
    ref = skip_plan(sel, grid).merge(TokenState(full, torch.ones(1, 30), grid_positions(grid, dtype=torch.float64)[None],
                                                torch.arange(30)[None]))
    assert state.num_tokens == sel.tokens_after(6) == 12           # closed form = actual
    assert torch.equal(state.source, ref.source) and torch.equal(state.size, ref.size)
    torch.testing.assert_close(state.pos, ref.pos)
    torch.testing.assert_close(state.x, ref.x)
    assert torch.equal(state.x[0], kept)                           # the encoded features themselves
    assert float(state.size.sum()) == 30 and set(state.size[0].tolist()) == {2.0, 3.0}
    assert state.pos[0, 0, 0] == 0.5 and state.pos[0, 6, 0] == 3.0  # centroids of frames {0,1} and {2,3,4}


def test_skipped_state_composes_with_a_merging_tower():
    grid = (3, 2, 2)
    sel = select_frames(frame_proxy(_frames("aab")), threshold=0.0)    # kept units 0 and 2
    kept_source = torch.tensor([0, 0, 1, 2, 3, 3, 4, 4])                # the tower merged pairs
    state = skipped_state(torch.randn(5, 4), sel, grid, kept_source)
    assert state.size[0].tolist() == [4.0, 2.0, 2.0, 2.0, 2.0]
    assert float(state.size.sum()) == 12
    with pytest.raises(ValueError, match="kept_source"):
        skipped_state(torch.randn(5, 4), sel, grid, kept_source[:4])


def test_step_plans_on_tokens_when_no_adapter_skipped_before_the_tower():
    grid = (4, 2, 2)
    frame = torch.randn(1, 4, 6)
    x = torch.cat([frame, frame, torch.randn(1, 4, 6), frame], 1)       # frames a a b a
    state = TokenState.from_features(x, grid, track_source=True)
    out, new_grid = apply_steps(state, grid, [FrameSkip(threshold=0.0)], StepContext())
    assert new_grid == (3, 2, 2) and out.size[0].tolist() == [2.0] * 4 + [1.0] * 8
    # tokens that already stand for more than themselves (skipped before the tower): identity
    again, g = apply_steps(out, (3, 2, 2), [FrameSkip(threshold=0.0)], StepContext())
    assert again.num_tokens == out.num_tokens and g == (3, 2, 2)


# --- the Qwen adapters: skipping before the tower -----------------------------------------------
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_static_video_encodes_one_temporal_patch(family):
    from vlmcompress.adapters import patch, unpatch
    from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, generate_tokens

    model, processor = cached_model(family), cached_processor(family)
    static = _frames("a" * 8, size=(48, 64)).numpy()
    moving = _frames("abcdeeee", size=(48, 64), seed=5).numpy()
    inputs = chat_inputs(processor, [([("video", static)], "What is shown?"), ([("video", moving)], "Which colour?")])
    grids = inputs["video_grid_thw"].tolist()
    rows = []
    hook = model.model.visual.patch_embed.register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    patch(model, CompressionConfig.from_steps(FrameSkip(threshold=0.0), PromptGuidedPool(keep_ratio=0.5)))
    try:
        generate_tokens(model, inputs)
        skips = model.vlmcompress.adapter.frame_skips
        report = model.vlmcompress.report
    finally:
        hook.remove()
        unpatch(model)
    assert [s.kept for s in skips] == [[0], [0, 1, 2]]            # temporal patches (ab)(cd)(ee)(ee)
    assert skips[1].skipped == [3]
    t0, h0, w0 = grids[0]
    t1, h1, w1 = grids[1]
    assert rows == [h0 * w0 + 3 * h1 * w1]                         # the tower saw only the kept patches
    per_patch = [h0 * w0 // 4, h1 * w1 // 4]
    assert [it.after_vision for it in report.items] == [s.tokens_after(n) for s, n in zip(skips, per_patch)]
    assert [it.placeholders for it in report.items] == [t0 * per_patch[0], t1 * per_patch[1]]
    for it in report.items:
        assert float(it.size.sum()) == it.placeholders             # skipped tokens count as merged


def _static_count_run(name, items, batch_size):
    """`items` static count videos (frame 0 of count items 300.. repeated 8 times), unpatched and with
    FrameSkip(threshold=0) on the shipped model `name`: the records of the skipping run."""
    import numpy as np

    import vlmcompress as vc
    from vlmcompress.evaluation import EvalItem, evaluate
    from vlmcompress.synthetic import make_sample

    model, processor = vc.models.load(name)
    videos = []
    for i in range(items):
        s = make_sample("count", 300 + i, frames=8)
        videos.append(EvalItem(id=f"static-{i}", task="count", question=s.question, answers=(s.answer,),
                               frames=np.repeat(s.frames[:1], 8, axis=0)))
    result = evaluate(model, processor, videos, [("skip", CompressionConfig.from_steps(FrameSkip(threshold=0.0)))],
                      batch_size=batch_size)
    return [r for r in result.records if r["setting"] == "skip"]


def test_static_video_answer_of_the_trained_model_is_unchanged():
    """A static video (one count-task frame repeated) encodes one temporal patch, and the shipped
    synth-qwen2-vl gives the same one-word answer as unpatched on the full video."""
    for r in _static_count_run("synth-qwen2-vl", 4, batch_size=4):
        assert r["visual_after"] == r["visual_before"] // 4   # 8 frames = 4 temporal patches; one is encoded
        assert r["agree"], r


def test_report_lists_skipped_frames():
    from vlmcompress.adapters import patch, unpatch
    from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, generate_tokens

    model, processor = cached_model("qwen2_vl"), cached_processor("qwen2_vl")
    clip = _frames("abababcc", size=(48, 48)).numpy()              # temporal patches (ab)(ab)(ab)(cc)
    patch(model, CompressionConfig.from_steps(FrameSkip(threshold=0.0)))
    try:
        generate_tokens(model, chat_inputs(processor, [([("video", clip)], "What is shown?")]))
        report = model.vlmcompress.report
    finally:
        unpatch(model)
    assert report.items[0].skipped_frames == [1, 2]
    assert "frames [1, 2] skipped before the tower" in report.summary()


def test_step_falls_back_to_tokens_when_frames_cannot_be_recovered():
    def no_frames():
        raise ValueError("needs the processor")

    grid = (3, 1, 2)
    frame = torch.randn(1, 2, 4)
    state = TokenState.from_features(torch.cat([frame, frame, torch.randn(1, 2, 4)], 1), grid, track_source=True)
    out, new_grid = apply_steps(state, grid, [FrameSkip(threshold=0.0)], StepContext(frames=no_frames))
    assert new_grid == (2, 1, 2) and out.size[0].tolist() == [2.0, 2.0, 1.0, 1.0]


# --- LLaVA-OneVision: skipping before the tower ----------------------------------------------------
def _onevision_skip_run(config, clip, question="What is shown?"):
    from vlmcompress.adapters import patch, unpatch
    from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs

    model, processor = cached_model("llava_onevision"), cached_processor("llava_onevision")
    inputs = chat_inputs(processor, [([("video", clip)], question)])
    frames_seen = []
    hook = model.model.vision_tower.register_forward_hook(
        lambda m, args, out: frames_seen.append(out.last_hidden_state.shape[0]))
    patch(model, config)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        report = model.vlmcompress.report
        skips = list(model.vlmcompress.adapter.frame_skips)
    finally:
        hook.remove()
        unpatch(model)
    return logits, report, skips, frames_seen


def test_onevision_skips_frames_before_the_tower():
    clip = _frames("aaabbbcc", size=(40, 48)).numpy()
    logits, report, skips, frames_seen = _onevision_skip_run(CompressionConfig.from_steps(FrameSkip(threshold=0.0)), clip)
    assert skips[0].kept == [0, 3, 6] and frames_seen == [3]          # the tower saw three frames of eight
    item = report.items[0]
    per_frame = (item.placeholders - 1) // 8
    assert item.after_vision == 3 * per_frame + 1                    # kept frames + the newline token
    assert item.skipped_frames == [1, 2, 4, 5, 7]
    assert float(item.size.sum()) == item.placeholders               # skipped tokens count as merged
    assert item.size[-1] == 1.0 and torch.isfinite(logits).all()

    # The same plan made after the tower (FrameSkip second, behind an identity step) sees identical
    # frames encode identically, so skipping first changes nothing but the tower's work.
    from vlmcompress.steps import UniformPool

    after, report2, skips2, seen2 = _onevision_skip_run(
        CompressionConfig.from_steps(UniformPool(keep_ratio=1.0), FrameSkip(threshold=0.0)), clip)
    assert skips2 == [] and seen2 == [8]
    assert report2.items[0].after_compress == item.after_compress
    torch.testing.assert_close(logits, after, rtol=1e-4, atol=1e-4)


def test_onevision_static_video_answer_of_the_trained_model_is_unchanged():
    """A static video encodes one frame, and synth-onevision answers as it does on the full video.

    The one kept frame stands for eight (size 8, proportional attention) at the centroid of their
    positions, so only the positions differ from the full run; on 16 such count videos 14 answers were
    unchanged (the Qwen model: 16 of 16). Asserted: at most one change in these eight."""
    skipped = _static_count_run("synth-onevision", 8, batch_size=8)
    assert all(r["visual_after"] == (r["visual_before"] - 1) // 8 + 1 for r in skipped)  # one frame + the newline
    assert sum(r["agree"] for r in skipped) >= 7, [(r["item"], r["agree"]) for r in skipped]


def test_onevision_skip_with_stage_a_and_relevance_pooling():
    """Skipping first, then stage A in the tower and relevance-weighted pooling on the kept frames
    (the scorer is handed the kept frames, so relevance and tokens describe the same frames)."""
    import vlmcompress as vc
    from vlmcompress.synthetic import make_sample

    model, processor = vc.models.load("synth-onevision")
    scorer = vc.models.relevance_scorer()
    calls = []
    score = scorer.score
    scorer.score = lambda q, frames, grid: calls.append((len(frames), tuple(grid))) or score(q, frames, grid)
    s = make_sample("needle", 5, frames=16)
    video = s.frames.copy()
    video[8:] = video[8]                       # the second half still: one kept frame stands for eight
    inputs = processor.apply_chat_template(
        [[{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": s.question}]}]],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    config = CompressionConfig.from_steps(FrameSkip(threshold=0.0), PromptGuidedPool(keep_ratio=0.1, relevance=scorer),
                                          vision_keep=0.5)
    vc.patch(model, config, processor=processor)
    try:
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        report = model.vlmcompress.report
        kept = model.vlmcompress.adapter.frame_skips[0].kept
    finally:
        vc.unpatch(model)
    assert kept == list(range(9)) and calls == [(9, (9, 4, 4))]    # camera noise keeps the moving half
    item = report.items[0]
    assert float(item.size.sum()) == item.placeholders
    assert item.after_compress <= 0.1 * (item.placeholders - 1) + 1
    assert out.shape[1] > inputs["input_ids"].shape[1]
