"""InternVL 3.x (``internvl``) adapter.

Tiny random model (``vlmcompress.testing.tiny_models``): 64-px tiles of 4×4 tokens; a 64×64 image is one
tile (16 tokens), a 64×128 image two tiles + a thumbnail (48 tokens); a video's frames arrive as one-tile
images written ``Frame{i}: <img>…</img>``. Every check compares the patched model with the unpatched one,
fed either the same processor outputs (identity) or, by hand, ``inputs_embeds`` and ``position_ids`` built
here with torch pooling and the V2PE rule (DESIGN.md §3.2/§3.3).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from vlmcompress.adapters import compressed, patch, unpatch
from vlmcompress.config import CompressionConfig
from vlmcompress.pool import grid_for_budget
from vlmcompress.testing.adapter_checks import (cached_model, cached_processor, chat_inputs, generate_tokens,
                                                left_pad, llm_calls, merge_groups, planned_tokens, random_media,
                                                window_pool)

FAMILY = "internvl"
FRAMES = 4
TILE = 16                     # tokens per tile (4×4 after pixel shuffle)
SIDE = 4
_PROMPTS = ["Describe this.", "What is the man on the left doing, and what color is the car?"]
COMPRESS = {"image": CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5),
            "video": CompressionConfig(keep_ratio=0.25, temporal_threshold=0.9, v2pe_delta=0.5)}
# Video runs with the processor known to patch() (frames of a video form one item) and without it
# (every frame compressed on its own).
CASES = [("image", True), ("video", True), ("video", False)]
IDS = ["image", "video-grouped", "video-per-frame"]


# --- helpers -----------------------------------------------------------------------------------
_media = functools.partial(random_media, size=(64, 64), frame_size=(64, 64), frames=FRAMES)


def _inputs(samples):
    """Processor outputs for one-turn chats; ``samples`` is a list of (blocks, prompt), each block
    ``(kind, media)``. Left padding."""
    return chat_inputs(cached_processor(FAMILY), samples)


def _sample(kind: str, i: int):
    """Two different samples: a one-tile and a three-tile image (different token counts), or a static and
    a moving video (different temporal-merge counts); prompts of different lengths."""
    media = _media(kind, seed=10 + i, size=[(64, 64), (64, 128)][i], static=(i == 0))
    return [(kind, media)], _PROMPTS[i]


def _batch(kind: str):
    return _inputs([_sample(kind, 0), _sample(kind, 1)])


def _processor_for(grouped: bool):
    return cached_processor(FAMILY) if grouped else None


def _items(kind: str, grouped: bool, n_visual: int):
    """(placeholders, grid) of the items of one row with ``n_visual`` image tokens, from what the processor
    writes: a one-tile image is a 4×4 grid, a multi-tile image no grid, a video a T×4×4 grid (grouped)
    or T one-tile images."""
    if kind == "image":
        return [(n_visual, (1, SIDE, SIDE) if n_visual == TILE else None)]
    if grouped:
        return [(n_visual, (n_visual // TILE, SIDE, SIDE))]
    return [(TILE, (1, SIDE, SIDE))] * (n_visual // TILE)


def _n_visual(model, inputs) -> list[int]:
    return (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()


# --- identity and unpatch ----------------------------------------------------------------------
@pytest.mark.parametrize("kind,grouped", CASES, ids=IDS)
def test_identity_config_and_unpatch_are_exact(kind, grouped):
    model = cached_model(FAMILY)
    inputs = _batch(kind)
    before = set(model.__dict__)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = generate_tokens(model, inputs)

    patch(model, CompressionConfig(), processor=_processor_for(grouped))
    try:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, ref)
        assert torch.equal(generate_tokens(model, inputs), ref_tokens)
        assert model.vlmcompress.report.visual_after == model.vlmcompress.report.visual_before
        model.vlmcompress.config = COMPRESS[kind]           # change config on the patched model
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] < ref.shape[1]
    finally:
        unpatch(model)

    assert set(model.__dict__) == before
    assert not hasattr(model, "vlmcompress")
    assert model.forward.__func__ is type(model).forward
    assert model.generate.__func__ is type(model).generate
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(generate_tokens(model, inputs), ref_tokens)


# --- compressed prefill and generation ---------------------------------------------------------
@pytest.mark.parametrize("kind,grouped", CASES, ids=IDS)
def test_prefill_length_is_planned_and_generate_works(kind, grouped):
    model = cached_model(FAMILY)
    inputs = _batch(kind)
    mask = inputs["attention_mask"]
    n_visual = _n_visual(model, inputs)
    # temporal_keep is the closed-form variant of temporal merging.
    config = CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5, temporal_keep=0.5 if kind == "video" else 1.0)
    plans = [[planned_tokens(n, g, config) for n, g in _items(kind, grouped, nv)] for nv in n_visual]
    rows = [int(mask[b].sum()) - nv + sum(plans[b]) for b, nv in enumerate(n_visual)]

    with compressed(model, config, processor=_processor_for(grouped)):
        with llm_calls(model) as calls:
            out = generate_tokens(model, inputs)
        report = model.vlmcompress.report
        assert [[i.after_compress for i in report.items if i.row == b] for b in range(2)] == plans
        prefill_len, prefill_pos = calls[0]
        assert report.prefill_after == rows
        assert prefill_len == max(rows)
        # generate() hands back the caller's prompt followed by the new tokens.
        prompt = inputs["input_ids"].shape[1]
        assert out.shape == (2, prompt + 4) and torch.equal(out[:, :prompt], inputs["input_ids"])
        # Decoding read one token per step, continuing after the last V2PE position.
        assert [c[0] for c in calls[1:]] == [1, 1, 1]
        assert torch.equal(calls[1][1][:, 0], prefill_pos[:, -1] + 1)
        assert prefill_pos.dtype == torch.float32
        # Greedy: the first new token is the argmax of the patched forward's last logits.
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[1] == max(rows)
        assert torch.equal(out[:, prompt], logits[:, -1].argmax(-1))
        # KV cache on and off agree; sampling runs and is reproducible under a seed.
        assert torch.equal(generate_tokens(model, inputs, use_cache=False), out)
        torch.manual_seed(0)
        s1 = generate_tokens(model, inputs, do_sample=True, top_k=50)
        torch.manual_seed(0)
        s2 = generate_tokens(model, inputs, do_sample=True, top_k=50)
        assert s1.shape == out.shape and torch.equal(s1, s2)
        # Rows repeated by generate() (different counts per row) get their own features back:
        # top_k=1 sampling is greedy, so each returned sequence and its logits equal its row's.
        greedy = generate_tokens(model, inputs, output_logits=True, return_dict_in_generate=True)
        rep = generate_tokens(model, inputs, do_sample=True, top_k=1, num_return_sequences=2,
                   output_logits=True, return_dict_in_generate=True)
        assert torch.equal(rep.sequences, out.repeat_interleave(2, dim=0))
        for a, b in zip(rep.logits, greedy.logits):
            torch.testing.assert_close(a, b.repeat_interleave(2, dim=0), atol=1e-5, rtol=1e-5)

        model.vlmcompress.config = COMPRESS[kind]           # the data-dependent temporal threshold
        out = generate_tokens(model, inputs)
        report = model.vlmcompress.report
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        assert report.visual_after < report.visual_before
        text = [int(mask[b].sum()) - n for b, n in enumerate(n_visual)]
        visual = [sum(i.after_compress for i in report.items if i.row == b) for b in range(2)]
        assert report.prefill_after == [t + v for t, v in zip(text, visual)]


# --- equivalence to a reference built by hand --------------------------------------------------
def _v2pe(visual: list[bool], delta: float) -> torch.Tensor:
    """New positions of an unpadded row: text advances by 1, a visual token by δ, and the text after a
    run of ``n`` that followed text at ``p`` sits at ``ceil(p + n·δ) + 1`` (DESIGN.md §3.3)."""
    pos, last, run = [], -1.0, 0
    for v in visual:
        if v:
            run += 1
            pos.append(last + delta * run)
        else:
            last = (math.ceil(last + delta * run) + 1) if run else last + 1
            run = 0
            pos.append(last)
    return torch.tensor(pos, dtype=torch.float64)


def _compress_by_hand(feats, cols, pos, grid, config):
    """One item: ``feats [N, C]``, its placeholder columns and V2PE positions. Returns per output token
    (feature, position, anchor column): the mean of its sources, their mean position, their first column."""
    n = feats.shape[0]
    target = math.ceil(config.keep_ratio * n)
    if grid is not None:
        out_grid = grid_for_budget(grid, target)
        x = window_pool(feats.double(), grid, out_grid).to(feats.dtype)
        p = window_pool(pos[:, None], grid, out_grid)[:, 0]
        c = window_pool(cols[:, None].double(), grid, out_grid, op="min")[:, 0].long()
        return x, p, c
    groups = merge_groups(feats, target)
    x = torch.stack([feats[g].double().mean(0) for g in groups]).to(feats.dtype)
    return x, torch.stack([pos[g].mean() for g in groups]), torch.stack([cols[g].min() for g in groups])


def _reference(model, kind, grouped, inputs, config):
    """``inputs_embeds``, ``attention_mask``, ``position_ids`` for the unpatched model, built by hand."""
    token_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"]).pooler_output.flatten(0, 1)
    used = 0
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        visual = ids == token_id
        pos = _v2pe(visual.tolist(), config.v2pe_delta)
        cols = torch.nonzero(visual)[:, 0]
        with torch.no_grad():
            emb = embed(ids).clone()
        keep = ~visual
        start = 0
        for n, grid in _items(kind, grouped, int(visual.sum())):
            c = cols[start:start + n]
            x, p, anchor = _compress_by_hand(feats[used:used + n], c, pos[c], grid, config)
            emb[anchor], pos[anchor], keep[anchor] = x, p, True
            start, used = start + n, used + n
        rows.append((emb[keep], pos[keep]))
    assert used == feats.shape[0]
    return left_pad(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind,grouped", CASES, ids=IDS)
def test_matches_hand_built_reference(kind, grouped, attn):
    model = cached_model(FAMILY, attn)
    inputs = _batch(kind)
    config = CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5)
    ref_inputs = _reference(model, kind, grouped, inputs, config)
    real = ref_inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_logits = model(**ref_inputs).logits
    ref_tokens = generate_tokens(model, ref_inputs)                  # new tokens only (inputs_embeds)

    with compressed(model, config, processor=_processor_for(grouped)):
        with torch.no_grad(), llm_calls(model) as calls:
            logits = model(**inputs).logits
        assert logits.shape[1] == real.shape[1]
        assert torch.allclose(calls[0][1][real], ref_inputs["position_ids"][real])
        torch.testing.assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-5)
        out = generate_tokens(model, inputs)
    assert torch.equal(out[:, -4:], ref_tokens)


# --- batch independence ------------------------------------------------------------------------
@pytest.mark.parametrize("kind,grouped", CASES, ids=IDS)
def test_batch_of_two_equals_each_alone(kind, grouped):
    model = cached_model(FAMILY)
    batch = _batch(kind)
    with compressed(model, COMPRESS[kind], processor=_processor_for(grouped)):
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        out = generate_tokens(model, batch)
        report = model.vlmcompress.report
        counts = [[i.after_compress for i in report.items if i.row == b] for b in range(2)]
        if kind == "video" and grouped:     # the static video collapses across frames, the moving one less
            assert sum(counts[0]) < sum(counts[1])
        for i in range(2):
            single = _inputs([_sample(kind, i)])
            with torch.no_grad():
                torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-4, rtol=1e-4)
            assert torch.equal(generate_tokens(model, single)[0, -4:], out[i, -4:])
            assert [it.after_compress for it in model.vlmcompress.report.items] == counts[i]


# --- which blocks form one item ----------------------------------------------------------------
def test_frames_of_a_video_form_one_item_only_with_the_processor():
    model = cached_model(FAMILY)
    image, video = _media("image", 1), _media("video", 2)
    # One row: an image, two videos back to back, two images; the other row: one image.
    inputs = _inputs([([("image", image), ("video", video), ("video", video), ("image", image), ("image", image)],
                       "Compare."), ([("image", image)], "Hi")])
    config = CompressionConfig(keep_ratio=0.5)
    with compressed(model, config, processor=cached_processor(FAMILY)):
        model(**inputs)
        grouped = [(i.row, i.placeholders) for i in model.vlmcompress.report.items]
    with compressed(model, config):
        model(**inputs)
        alone = [(i.row, i.placeholders) for i in model.vlmcompress.report.items]
    assert grouped == [(0, TILE), (0, FRAMES * TILE), (0, FRAMES * TILE), (0, TILE), (0, TILE), (1, TILE)]
    assert alone == [(0, TILE)] * (2 + 2 * FRAMES + 1) + [(1, TILE)]


def test_temporal_merging_collapses_a_static_video():
    """A static video grouped as one item: every later frame merges into the first (cosine 1), and each
    frame's features reach the LLM in its own block only where tokens survive."""
    model = cached_model(FAMILY)
    inputs = _inputs([([("video", _media("video", 3, static=True))], "What happens?")])
    with compressed(model, CompressionConfig(temporal_threshold=0.99), processor=cached_processor(FAMILY)):
        generate_tokens(model, inputs)
        (item,) = model.vlmcompress.report.items
    assert (item.placeholders, item.after_compress) == (FRAMES * TILE, TILE)


# --- save / reload, stage A --------------------------------------------------------------------
def test_save_reload_then_patch(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = cached_model(FAMILY)
    inputs = _batch("video")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    with compressed(model, COMPRESS["video"], processor=cached_processor(FAMILY)):
        expected = generate_tokens(model, inputs)
    patch(loaded, COMPRESS["video"], processor=cached_processor(FAMILY))
    assert torch.equal(generate_tokens(loaded, inputs), expected)
    assert loaded.vlmcompress.report.visual_after < loaded.vlmcompress.report.visual_before
