"""Prompt-guided pooling steered by a CLIP scorer through ``patch(model, CompressionConfig(relevance=...))``.

Tiny random VLMs and the tiny random CLIP (``tiny_clip_scorer``). What reaches the LLM is captured with
forward pre-hooks (``input_ids`` at the VLM's base model, ``inputs_embeds`` at its language model, first
call = prefill) and compared with pooling computed here by hand from the model's own projected features,
``scorer.score(question, frames, grid)`` and :func:`prompt_guided_pool` (DESIGN.md §3.2).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import vlmcompress as vc
from vlmcompress.adapters.frames import as_scorer_frames, qwen_frames
from vlmcompress.pool import grid_for_budget, prompt_guided_pool
from vlmcompress.state import TokenState
from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, placeholder_id

KEEP = 0.25
QUESTION = "Is there a white square on the left?"


@functools.lru_cache(maxsize=1)
def _scorer():
    return vc.tiny_clip_scorer(0)


def _raw(seed: int, frames: int, size) -> np.ndarray:
    """uint8 ``[T, H, W, 3]``: noise with a white square moving right (so frames differ)."""
    rng = np.random.default_rng(seed)
    clip = np.repeat(rng.integers(0, 256, (1, *size, 3), dtype=np.uint8), frames, 0)
    side = size[0] // 4
    for t in range(frames):
        clip[t, 4:4 + side, 2 + 4 * t:2 + 4 * t + side] = 255
    return clip


def _inputs(family: str, kind: str, raw: np.ndarray, question: str = QUESTION):
    """Processor outputs for one user turn: an image (``raw[0]``) or a video (``raw``) then ``question``."""
    from PIL import Image

    media = raw if kind == "video" else Image.fromarray(raw[0])
    return chat_inputs(cached_processor(family), [([(kind, media)], question)])


def _prefill_visual(model, inputs, *, token_id, **generate_kwargs) -> torch.Tensor:
    """``[M, C]`` rows of ``inputs_embeds`` that the LLM reads at the visual placeholders in prefill."""
    seen = {}

    def grab_ids(_, args, kwargs):
        seen.setdefault("ids", kwargs.get("input_ids"))

    def grab_embeds(_, args, kwargs):
        seen.setdefault("embeds", kwargs.get("inputs_embeds"))

    hooks = [model.model.register_forward_pre_hook(grab_ids, with_kwargs=True),
             model.model.language_model.register_forward_pre_hook(grab_embeds, with_kwargs=True)]
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False, **generate_kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen["embeds"][seen["ids"] == token_id]


def _pooled(features: torch.Tensor, grid, question: str, frames, *, tail: int = 0) -> torch.Tensor:
    """Prompt-guided pooling by hand: the first ``T*H*W`` rows pooled to the budget, ``tail`` rows kept."""
    n = math.prod(grid)
    out_grid = grid_for_budget(grid, math.ceil(KEEP * n))
    relevance = _scorer().score(question, frames, grid)
    pooled = prompt_guided_pool(TokenState.from_features(features[None, :n], grid), grid, out_grid, relevance,
                                tau=vc.CompressionConfig().pool_tau)
    return torch.cat([pooled.x[0], features[n:]])


# Per case: how to get the model's own features of item 0 and its token grid, what the frames are.
def _llava_features(model, inputs):
    with torch.no_grad():
        return model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0], (1, 6, 6), 0


def _onevision_video_features(model, inputs):
    with torch.no_grad():
        out = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output[0]
    return out, (inputs["pixel_values_videos"].shape[1], 3, 3), 1     # T frames of 3×3, then one newline


def _qwen_video_features(model, inputs):
    with torch.no_grad():
        out = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output[0]
    t, h, w = inputs["video_grid_thw"][0].tolist()
    return out, (t, h // 2, w // 2), 0


CASES = {
    "llava-image": ("llava", "image", (48, 48), _llava_features),
    "llava_onevision-video": ("llava_onevision", "video", (48, 48), _onevision_video_features),
    "qwen2_vl-video": ("qwen2_vl", "video", (48, 48), _qwen_video_features),
}


def _config():
    return vc.CompressionConfig(keep_ratio=KEEP, relevance=_scorer())


# --- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_patched_generate_pools_with_clip_relevance(case):
    family, kind, size, features_of = CASES[case]
    model, raw = cached_model(family), _raw(1, 4, size)
    inputs = _inputs(family, kind, raw)
    features, grid, tail = features_of(model, inputs)
    frames = raw if kind == "video" else raw[:1]
    expected = _pooled(features, grid, QUESTION, frames, tail=tail)
    with vc.compressed(model, _config(), processor=cached_processor(family)):
        got = _prefill_visual(model, inputs, token_id=placeholder_id(model, kind))     # question read from the prompt
    assert got.shape == expected.shape and got.shape[0] < features.shape[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["llava-image", "qwen2_vl-video"])
def test_different_questions_give_different_pooled_features(case):
    family, kind, size, _ = CASES[case]
    model, inputs = cached_model(family), _inputs(family, kind, _raw(2, 4, size))
    token_id = placeholder_id(model, kind)
    with vc.compressed(model, _config(), processor=cached_processor(family)):
        a = _prefill_visual(model, inputs, token_id=token_id, question="a white square")
        b = _prefill_visual(model, inputs, token_id=token_id, question="the noisy background at the bottom right")
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=KEEP)):
        plain = _prefill_visual(model, inputs, token_id=token_id)
    assert a.shape == b.shape == plain.shape
    assert not torch.allclose(a, b, atol=1e-3)
    assert not torch.allclose(a, plain, atol=1e-3)


def test_question_is_read_from_the_prompt_without_the_chat_template():
    class Recorder:
        def __init__(self):
            self.questions = []

        def score(self, question, frames, target_grid):
            self.questions.append(question)
            return _scorer().score(question, frames, target_grid)

    for family, kind, size in [("llava", "image", (48, 48)), ("qwen2_vl", "video", (48, 48))]:
        recorder = Recorder()
        model = cached_model(family)
        config = vc.CompressionConfig(keep_ratio=KEEP, relevance=recorder)
        with vc.compressed(model, config, processor=cached_processor(family)):
            model.generate(**_inputs(family, kind, _raw(3, 4, size), "What moves?"), max_new_tokens=1, do_sample=False)
        assert recorder.questions == ["What moves?"], family


def test_no_question_is_a_clear_error():
    model = cached_model("llava")
    inputs = _inputs("llava", "image", _raw(4, 1, (48, 48)))
    with vc.compressed(model, _config()):                    # no processor: the prompt cannot be read
        with pytest.raises(ValueError, match="no question is known"):
            model.generate(**inputs, max_new_tokens=1)
        with pytest.raises(ValueError, match="non-empty"):
            model.generate(**inputs, max_new_tokens=1, question="  ")


# --- frames ----------------------------------------------------------------------------------------
FRAME_CASES = {
    "llava-image": ("llava", "image", "image", (48, 48), 1),
    "llava_onevision-image": ("llava_onevision", "image", "image", (48, 48), 1),   # any-res: base tile
    "llava_onevision-video": ("llava_onevision", "video", "video", (48, 48), 4),
    "qwen2_vl-image": ("qwen2_vl", "image", "image", (48, 80), 1),
    "qwen2_vl-video-T3": ("qwen2_vl", "video", "video", (48, 48), 3),               # padded to 4 frames
    "qwen3_vl-video": ("qwen3_vl", "video", "video", (48, 48), 4),
    "internvl-image": ("internvl", "image", "image", (64, 64), 1),
    "internvl-video": ("internvl", "video", "image", (64, 64), 4),                  # frames arrive as images
}


@pytest.mark.parametrize("case", list(FRAME_CASES))
def test_item_frames_recovers_the_pixels(case):
    """Sizes the processors keep as they are, so the frames must come back as the raw pixels / 255."""
    family, kind, modality, size, frames = FRAME_CASES[case]
    model, raw = cached_model(family), _raw(5, frames, size)
    inputs = _inputs(family, kind, raw)
    with vc.compressed(model, vc.CompressionConfig(), processor=cached_processor(family)):
        got = model.vlmcompress.adapter.item_frames(modality, inputs, 0)
    want = torch.from_numpy(raw if kind == "video" else raw[:1]).permute(0, 3, 1, 2).float() / 255
    if family.startswith("qwen") and kind == "video" and frames % 2:
        want = torch.cat([want, want[-1:]])          # the processor repeats the last frame to fill a pair
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_item_frames_keeps_the_processor_resize():
    """A 60×40 image is resized and cropped to 48×48 by the processor: item_frames gives exactly that."""
    from PIL import Image

    raw = _raw(6, 1, (60, 40))
    inputs = _inputs("llava", "image", raw)
    resized = cached_processor("llava").image_processor(Image.fromarray(raw[0]), do_normalize=False,
                                                  return_tensors="pt")["pixel_values"]
    model = cached_model("llava")
    with vc.compressed(model, vc.CompressionConfig(), processor=cached_processor("llava")):
        got = model.vlmcompress.adapter.item_frames("image", inputs, 0)
    assert got.shape == (1, 3, 48, 48)
    torch.testing.assert_close(got, resized.float(), atol=1e-6, rtol=0)


def test_item_frames_without_processor_says_what_to_pass():
    model = cached_model("llava")
    inputs = _inputs("llava", "image", _raw(7, 1, (48, 48)))
    with vc.compressed(model, _config()):
        with pytest.raises(ValueError, match=r"processor=processor.*relevance_frames"):
            model.generate(**inputs, max_new_tokens=1, question="what?")


def test_relevance_frames_override():
    """The caller's frames are what the scorer sees (no processor needed), in either layout."""
    family, kind, size, features_of = CASES["llava_onevision-video"]
    model, raw = cached_model(family), _raw(8, 4, size)
    inputs = _inputs(family, kind, raw)
    other = np.ascontiguousarray(raw[:, :, ::-1])                     # mirrored: a different relevance map
    features, grid, tail = features_of(model, inputs)
    expected = _pooled(features, grid, QUESTION, other, tail=tail)
    own = _pooled(features, grid, QUESTION, raw, tail=tail)
    assert not torch.allclose(expected, own, atol=1e-3)
    token_id = model.config.video_token_id
    channels_first = torch.from_numpy(other).permute(0, 3, 1, 2).float() / 255
    with vc.compressed(model, _config()):
        got = _prefill_visual(model, inputs, token_id=token_id, question=QUESTION, relevance_frames=[other])
        got_float = _prefill_visual(model, inputs, token_id=token_id, question=QUESTION,
                                    relevance_frames=[channels_first])
        with pytest.raises(ValueError, match="relevance_frames has 2 entries"):
            model.generate(**inputs, max_new_tokens=1, question=QUESTION, relevance_frames=[other, other])
        with pytest.raises(TypeError, match="relevance_frames must be a list"):
            model.generate(**inputs, max_new_tokens=1, question=QUESTION, relevance_frames=other)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_float, expected, atol=1e-5, rtol=1e-5)


def test_grid_less_items_are_merged_without_relevance():
    """A LLaVA-NeXT any-res image (tiles + row-end tokens) has no grid: merged to the budget, scorer unused."""
    class Never:
        def score(self, question, frames, target_grid):
            raise AssertionError("the scorer must not run for an item without a grid")

    model = cached_model("llava_next")
    inputs = _inputs("llava_next", "image", _raw(9, 1, (48, 48)))
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=KEEP, relevance=Never()), processor=cached_processor("llava_next")):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        item = model.vlmcompress.report.items[0]
    assert item.grid is None and item.after_compress == math.ceil(KEEP * item.placeholders)


def test_feature_space_scorer_is_still_supported():
    class FeatureScorer:
        def __init__(self):
            self.calls = []

        def score_features(self, question, features, grid):
            self.calls.append((question, tuple(features.shape), tuple(grid)))
            return torch.softmax(features[..., 0].float(), -1)

    scorer = FeatureScorer()
    model = cached_model("llava")
    inputs = _inputs("llava", "image", _raw(10, 1, (48, 48)))
    features, grid, _ = _llava_features(model, inputs)
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=KEEP, relevance=scorer)):
        got = _prefill_visual(model, inputs, token_id=model.config.image_token_id, question="q")
    rel = torch.softmax(features[None, :, 0], -1)
    want = prompt_guided_pool(TokenState.from_features(features[None], grid), grid,
                              grid_for_budget(grid, math.ceil(KEEP * 36)), rel, tau=0.01).x[0]
    assert scorer.calls == [("q", (1, 36, features.shape[-1]), grid)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- pieces ------------------------------------------------------------------------------------------
def test_qwen_frames_inverts_the_processor_patch_layout():
    """Patchify by the Qwen2-VL video processor's rule, then invert: exact."""
    t, c, h, w, p, m, tp = 4, 3, 32, 48, 8, 2, 2
    video = torch.randn(1, t, c, h, w)
    gh, gw = h // p, w // p
    rows = video.view(1, t // tp, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    rows = rows.reshape(t // tp * gh * gw, c * tp * p * p)
    back = qwen_frames(rows, (t // tp, gh, gw), patch_size=p, merge_size=m, temporal_patch_size=tp)
    assert torch.equal(back, video[0])
    with pytest.raises(ValueError, match="rows must be"):
        qwen_frames(rows[1:], (t // tp, gh, gw), patch_size=p, merge_size=m, temporal_patch_size=tp)


def test_as_scorer_frames_layouts():
    x = torch.rand(2, 3, 5, 7)
    assert torch.equal(as_scorer_frames(x), x.permute(0, 2, 3, 1))
    u = np.zeros((5, 7, 3), np.uint8)
    assert as_scorer_frames(u).shape == (1, 5, 7, 3) and as_scorer_frames(u).dtype == torch.uint8
    with pytest.raises(ValueError, match="3 colour channels"):
        as_scorer_frames(torch.rand(2, 4, 5, 7))
    with pytest.raises(TypeError, match="tensor or array"):
        as_scorer_frames([[1, 2, 3]])


def test_config_validates_the_scorer():
    with pytest.raises(TypeError, match="scorer instance"):
        vc.CompressionConfig(relevance=vc.ClipRelevanceScorer)
    with pytest.raises(TypeError, match="score_features"):
        vc.CompressionConfig(relevance=object())
    with pytest.raises(ValueError, match="budget_method='pool'"):
        vc.CompressionConfig(keep_ratio=0.5, relevance=_scorer(), budget_method="merge")
    assert vc.CompressionConfig(relevance=_scorer()).relevance is _scorer()
