"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters on tiny random models: identity, planned token counts,
equivalence to a hand-built reference, batching, attention back-ends, KV-cache decoding, save/load."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from vlmcompress.adapters import patch, prepare_inputs, unpatch  # noqa: E402
from vlmcompress.config import CompressionConfig  # noqa: E402
from vlmcompress.pool import grid_for_budget  # noqa: E402
from vlmcompress.testing.adapter_checks import window_pool  # noqa: E402
from vlmcompress.testing.adapter_checks import (NEW_TOKENS, cached_model, cached_processor, chat_inputs,  # noqa: E402
                                                generate_tokens, llm_calls, planned_tokens)
from vlmcompress.testing.tiny_models import save_tiny_checkpoint  # noqa: E402

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
CASES = [(f, k) for f in FAMILIES for k in ("image", "video")]
IDS = [f"{f}-{k}" for f, k in CASES]

IMAGE_SIZES = [(64, 64), (48, 80)]                       # (H, W) of sample 0 and sample 1
# Frames and sizes chosen so pooling and temporal merging both have work (grids in the comments).
VIDEO = {"qwen2_vl": (8, [(48, 96), (48, 48)]),         # (4, 3, 6) and (4, 3, 3) tokens
         "qwen2_5_vl": (8, [(48, 96), (48, 48)]),
         "qwen3_vl": (6, [(64, 96), (64, 64)])}          # (3, 2, 3) and (3, 2, 2): 3 frame-group runs
PROMPTS = ["Describe this in one sentence.", "What is the man on the left doing, and what color is the car?"]
KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def _media(family: str, kind: str, i: int):
    rng = np.random.default_rng(100 + i)
    if kind == "image":
        from PIL import Image

        h, w = IMAGE_SIZES[i]
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    frames, sizes = VIDEO[family]
    h, w = sizes[i]
    # A still background with per-frame noise and a bright square moving right: consecutive frames are
    # similar but never identical, so temporal matching has no exact ties for rounding noise to break.
    base = rng.integers(40, 216, (1, h, w, 3))
    clip = (base + rng.integers(-30, 31, (frames, h, w, 3))).astype(np.uint8)
    for t in range(frames):
        clip[t, h // 3: h // 3 + 12, 4 * t: 4 * t + 12] = 255
    return clip


def _inputs(family: str, kind: str, rows=(0, 1), processor=None):
    """Processor outputs for samples ``rows`` (sample i always has the same media and prompt)."""
    return chat_inputs(processor or cached_processor(family),
                       [([(kind, _media(family, kind, i))], PROMPTS[i]) for i in rows])


def _config(kind: str, **extra) -> CompressionConfig:
    video = {"temporal_keep": 0.5} if kind == "video" else {}
    return CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5, **{**video, **extra})


def _grids(inputs, kind):
    return [(t, h // 2, w // 2) for t, h, w in inputs[KEYS[kind][1]].tolist()]


def _planned(grid, kind) -> int:
    """Tokens of one item on ``grid`` under ``_config(kind)``, in closed form."""
    return planned_tokens(math.prod(grid), grid, _config(kind))


def _generate(model, inputs, seed=None, **kw):
    """The new tokens ``[B, 4]``: sampled after ``torch.manual_seed(seed)`` when a seed is given, else greedy."""
    if seed is not None:
        torch.manual_seed(seed)
    return generate_tokens(model, inputs, do_sample=seed is not None, **kw)[:, -NEW_TOKENS:]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def patched():
    """Patch through this fixture so a failing test never leaves a cached model patched."""
    models = []

    def _patch(model, config):
        models.append(patch(model, config))
        return model

    yield _patch
    for m in models:
        if getattr(m, "vlmcompress", None) is not None:
            unpatch(m)


# --- identity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_identity_config_and_unpatch_are_exact(family, kind, patched):
    model, inputs = cached_model(family), _inputs(family, kind)
    ref, ref_tokens = _logits(model, inputs), _generate(model, inputs)
    patched(model, CompressionConfig())
    assert torch.equal(_logits(model, inputs), ref)
    assert model.vlmcompress.report.visual_after == model.vlmcompress.report.visual_before
    assert torch.equal(_generate(model, inputs), ref_tokens)
    model.vlmcompress.config = _config(kind)
    assert _logits(model, inputs).shape[1] < ref.shape[1]
    unpatch(model)
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    assert torch.equal(_logits(model, inputs), ref)
    assert torch.equal(_generate(model, inputs), ref_tokens)


# --- planned counts, generation ----------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_prefill_has_planned_length_and_generates(family, kind, patched):
    model, inputs = cached_model(family), _inputs(family, kind)
    before = inputs["attention_mask"].sum(1).tolist()
    grids = _grids(inputs, kind)
    expected = [before[b] - math.prod(grids[b]) + _planned(grids[b], kind) for b in range(2)]
    with llm_calls(model) as calls:
        patched(model, _config(kind))
        greedy = _generate(model, inputs)
        report = model.vlmcompress.report
        sampled = _generate(model, inputs, seed=0)
    seen = [length for length, _ in calls]
    assert report.prefill_before == before
    assert report.prefill_after == expected
    assert [i.after_compress for i in report.items] == [_planned(g, kind) for g in grids]
    assert seen[:4] == [max(expected), 1, 1, 1]          # prefill once, then KV-cache steps of one token
    vocab = model.config.text_config.vocab_size
    for out in (greedy, sampled):
        assert out.shape == (2, 4) and int(out.min()) >= 0 and int(out.max()) < vocab


def test_temporal_threshold_shrinks_video_further(patched):
    model, inputs = cached_model("qwen2_vl"), _inputs("qwen2_vl", "video")
    patched(model, CompressionConfig(keep_ratio=0.25, temporal_threshold=-1.0, v2pe_delta=0.5))
    out = _generate(model, inputs)
    report = model.vlmcompress.report
    # Every later frame matches above cosine -1, so each video collapses to one pooled frame of tokens.
    per_frame = [math.prod(grid_for_budget(g, math.ceil(0.25 * math.prod(g)))[1:]) for g in _grids(inputs, "video")]
    assert [i.after_compress for i in report.items] == per_frame
    assert out.shape == (2, 4)


# --- equivalence to a hand-built reference -----------------------------------------------------
def _v2pe_map(pos: torch.Tensor, visual: torch.Tensor, delta: float) -> torch.Tensor:
    """DESIGN §3.3 for one unpadded row ``pos [3, L]``: a placeholder run after a token at p0 (new p0')
    maps c to p0' + δ(c - p0); the text after it, originally at P, moves to ceil(p0' + δ(P-1-p0)) + 1."""
    new, shift, i, length = pos.clone(), 0.0, 0, pos.shape[1]
    while i < length:
        if not visual[i]:
            new[:, i] = pos[:, i] + shift
            i += 1
            continue
        j = i
        while visual[j]:
            j += 1
        p0 = float(pos[:, i].min()) - 1
        new[:, i:j] = p0 + shift + delta * (pos[:, i:j] - p0)
        after = float(pos[:, j].min())
        shift = math.ceil(p0 + shift + delta * (after - 1 - p0)) + 1 - after
        i = j
    return new


def _reference_inputs(model, family, kind, inputs, keep=0.25, delta=0.5):
    """Unpatched-model inputs built by hand: window-averaged features (``window_pool`` on the token grid),
    each pooled token in the placeholder slot of its window's first token, positions = pooled V2PE-mapped
    positions of the model's own get_rope_index, 4-row position_ids."""
    base = model.model
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1 and bool(inputs["attention_mask"].all())
    pix, grid_key = KEYS[kind]
    fn = base.get_image_features if kind == "image" else base.get_video_features
    with torch.no_grad():
        enc = fn(inputs[pix], inputs[grid_key], return_dict=True)
    grid = _grids(inputs, kind)[0]
    out_grid = grid_for_budget(grid, math.ceil(keep * math.prod(grid)))

    def pool(v):  # [N, C] raster (t, h, w) -> [M, C]
        return window_pool(v, grid, out_grid)

    rope_keys = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    pos = base.get_rope_index(ids, **{k: inputs[k] for k in rope_keys if k in inputs})[0][:, 0].double()
    token = model.config.image_token_id if kind == "image" else model.config.video_token_id
    visual = (ids[0] == token).tolist()
    slots = (ids[0] == token).nonzero()[:, 0]
    mapped = _v2pe_map(pos, visual, delta)
    # Pooling's windows partition each axis: window k starts at ceil(k·I/O), its first token and anchor slot.
    firsts = [-(-torch.arange(o) * i // o) for i, o in zip(grid, out_grid)]
    starts = torch.stack(torch.meshgrid(*firsts, indexing="ij"), -1)
    first = (starts[..., 0] * grid[1] * grid[2] + starts[..., 1] * grid[2] + starts[..., 2]).flatten()
    kept = slots[first]
    keep_mask = torch.ones(ids.shape[1], dtype=torch.bool)
    keep_mask[slots] = False
    keep_mask[kept] = True
    mapped[:, kept] = pool(mapped[:, slots].T).T
    new_ids = ids[:, keep_mask]
    n = new_ids.shape[1]
    position_ids = torch.cat([torch.arange(n).double()[None], mapped[:, keep_mask]]).float().unsqueeze(1)
    feats = pool(enc.pooler_output[0])
    common = {"attention_mask": torch.ones_like(new_ids), "position_ids": position_ids}
    if family == "qwen3_vl":  # DeepStack features only enter through mm_encoder_outputs
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        out = BaseModelOutputWithDeepstackFeatures(pooler_output=(feats,),
                                                   deepstack_features=[(pool(d[0]),) for d in enc.deepstack_features])
        return {"input_ids": new_ids, "mm_encoder_outputs": {kind: out}, **common}
    embeds = base.get_input_embeddings()(new_ids).detach()
    embeds[0, new_ids[0] == token] = feats.detach()
    return {"inputs_embeds": embeds, **common}


@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_matches_hand_built_reference(family, kind, patched):
    model, inputs = cached_model(family), _inputs(family, kind, rows=(0,))
    ref = _reference_inputs(model, family, kind, inputs)
    ref_logits, ref_greedy, ref_sampled = _logits(model, ref), _generate(model, ref), _generate(model, ref, seed=3)
    patched(model, CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5))
    torch.testing.assert_close(_logits(model, inputs), ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_greedy)
    assert torch.equal(_generate(model, inputs, seed=3), ref_sampled)


# --- batching ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_batch_of_two_equals_each_alone(family, kind, patched):
    model = patched(cached_model(family), _config(kind))
    batch = _inputs(family, kind)
    assert not bool(batch["attention_mask"].all())          # different lengths: left padding
    logits, tokens = _logits(model, batch)[:, -1], _generate(model, batch)
    for b in range(2):
        alone = _inputs(family, kind, rows=(b,))
        torch.testing.assert_close(logits[b], _logits(model, alone)[0, -1], rtol=0, atol=1e-5)
        assert torch.equal(tokens[b], _generate(model, alone)[0])


# --- grid order, positions, decoding -----------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_token_grid_is_raster_in_the_models_own_positions(family, kind):
    model, inputs = cached_model(family), _inputs(family, kind)
    patch(model, CompressionConfig())
    try:
        adapter = model.vlmcompress.adapter
        pos = adapter.original_positions(inputs)
        enc = adapter.encode(kind, inputs)
    finally:
        unpatch(model)
    token = adapter.token_id(kind)
    for b, grid in enumerate(enc.grids):
        slots = (inputs["input_ids"][b] == token).nonzero()[:, 0]
        assert enc.features[b].shape[0] == slots.numel() == math.prod(grid)
        p = pos[:, b, slots].reshape(3, *grid)
        h = p[1] - p[1].amin(dim=(1, 2), keepdim=True)
        w = p[2] - p[2].amin(dim=(1, 2), keepdim=True)
        assert torch.equal(h, torch.arange(grid[1]).double().view(1, -1, 1).expand(grid))
        assert torch.equal(w, torch.arange(grid[2]).double().view(1, 1, -1).expand(grid))
        assert bool((p[0].flatten(1).amin(1)[1:] > p[0].flatten(1).amax(1)[:-1]).all())   # frames move forward


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decoding_continues_with_rope_deltas(family, patched):
    """A hand-written KV-cache loop without position_ids (the model falls back on model.model.rope_deltas)
    gives the same tokens as generate(). One unpadded row: with an attention mask, transformers 5.24's
    rope_deltas fallback builds positions for the whole mask instead of the new token (its own bug)."""
    model, inputs = cached_model(family), _inputs(family, "image", rows=(1,))
    config = _config("image")
    patched(model, config)
    expected = _generate(model, inputs)
    kw, _ = prepare_inputs(model.vlmcompress.adapter, config, inputs)
    pos, mask = kw["position_ids"], kw["attention_mask"].bool()
    top = pos[1:].masked_fill(~mask, -1e9).amax(dim=(0, 2))
    assert torch.equal(model.model.rope_deltas.flatten().double(), (top + 1 - mask.sum(1)).double())
    tokens = []
    with torch.no_grad():
        out = model(**kw, use_cache=True)
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            out = model(input_ids=nxt, cache=out.cache, use_cache=True)
    assert torch.equal(torch.cat(tokens, 1), expected)


def test_qwen3_video_frames_keep_their_runs_and_mapped_positions(patched):
    """(3, 2, 3) pooled to (2, 1, 2): the t windows are frames {0, 1} and {2}, so each window's first
    token, and its slot, is in frame group 0's and 2's runs. Group 1's run is left empty (its tokens
    live on inside the pooled tokens)."""
    model, inputs = cached_model("qwen3_vl"), _inputs("qwen3_vl", "video", rows=(0,))
    kw, report = prepare_inputs(patched(model, CompressionConfig()).vlmcompress.adapter,
                                CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5), inputs)
    ids = kw["input_ids"][0].tolist()
    start, end, pad = (model.config.vision_start_token_id, model.config.vision_end_token_id,
                       model.config.video_token_id)
    runs, i = [], 0
    while i < len(ids):  # count pads between each frame group's vision_start and vision_end
        if ids[i] == start and i + 1 < len(ids) and ids[i + 1] in (pad, end):
            j = i + 1
            while ids[j] == pad:
                j += 1
            runs.append(j - i - 1)
            i = j
        i += 1
    assert runs == [2, 0, 2]
    assert report.items[0].after_compress == 4


# --- attention back-ends, save/load -------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_eager_and_sdpa_agree(family, kind, patched):
    inputs = _inputs(family, kind)
    sdpa, eager = patched(cached_model(family), _config(kind)), patched(cached_model(family, "eager"), _config(kind))
    a, b = _logits(eager, inputs), _logits(sdpa, inputs)
    for row, n in enumerate(sdpa.vlmcompress.report.prefill_after):   # left padding: pads attend to nothing
        torch.testing.assert_close(a[row, -n:], b[row, -n:], rtol=0, atol=1e-4)
    assert torch.equal(_generate(eager, inputs), _generate(sdpa, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_then_patch(family, tmp_path, patched):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = save_tiny_checkpoint(family, tmp_path / family)
    loaded = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    kind = "video" if family == "qwen3_vl" else "image"
    inputs = _inputs(family, kind, processor=processor)
    patched(loaded, _config(kind))
    expected = _generate(patched(cached_model(family), _config(kind)), inputs)
    assert torch.equal(_generate(loaded, inputs), expected)
    assert loaded.vlmcompress.report.visual_after < loaded.vlmcompress.report.visual_before


def _mixed_inputs(family):
    """Row 0: an image and a video; row 1: a video alone (different lengths, left padding)."""
    return chat_inputs(cached_processor(family),
                       [([("image", _media(family, "image", 0)), ("video", _media(family, "video", 0))], PROMPTS[0]),
                        ([("video", _media(family, "video", 1))], PROMPTS[1])])


@pytest.mark.parametrize("family", FAMILIES)
def test_images_and_videos_in_one_batch(family, patched):
    model, inputs = cached_model(family), _mixed_inputs(family)
    ref, ref_tokens = _logits(model, inputs), _generate(model, inputs)
    patched(model, CompressionConfig())
    assert torch.equal(_logits(model, inputs), ref) and torch.equal(_generate(model, inputs), ref_tokens)
    model.vlmcompress.config = _config("video")
    out = _generate(model, inputs)
    report = model.vlmcompress.report
    grids = [_grids(inputs, "image")[0], *_grids(inputs, "video")]
    kinds = ["image", "video", "video"]
    assert [(i.modality, i.row) for i in report.items] == [("image", 0), ("video", 0), ("video", 1)]
    assert [i.after_compress for i in report.items] == [_planned(g, k) for g, k in zip(grids, kinds)]
    assert out.shape == (2, 4)


def _qwen3_vl_moe():
    """Qwen3-VL-MoE: the Qwen3-VL tiny config with a 4-expert text model (same processor and token ids)."""
    import transformers as tf

    from vlmcompress.testing.tiny_models import tiny_config

    c = tiny_config("qwen3_vl").to_dict()
    text, vision = dict(c["text_config"]), dict(c["vision_config"])
    text.pop("model_type", None)
    vision.pop("model_type", None)
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    ids = {k: c[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        return tf.AutoModelForImageTextToText.from_config(config).eval()
    finally:
        torch.random.set_rng_state(state)


def test_qwen3_vl_moe_matches_hand_built_reference(patched):
    model = _qwen3_vl_moe()
    assert model.config.model_type == "qwen3_vl_moe"
    inputs = _inputs("qwen3_vl", "video", rows=(0,))
    ref = _reference_inputs(model, "qwen3_vl", "video", inputs)
    ref_logits, ref_tokens = _logits(model, ref), _generate(model, ref)
    patched(model, CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5))
    torch.testing.assert_close(_logits(model, inputs), ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(_generate(model, inputs), ref_tokens)


# Stage A (vision_keep < 1) on these families: tests/test_qwen_vision_merge.py.
