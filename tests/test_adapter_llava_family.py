"""Adapters of the LLaVA family: LLaVA 1.5, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision.

Tiny random models (``vlmcompress.testing.tiny_models``); every check compares the patched model with
the unpatched one, either fed the same processor outputs (identity) or fed by hand with
``inputs_embeds`` and ``position_ids`` built here from the rules in DESIGN.md §3.2/§3.3.
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
                                                left_pad, llm_calls, merge_groups, placeholder_id, planned_tokens,
                                                random_media, window_pool)

FRAMES = 4
# (family, kind): every modality each family supports in transformers.
CASES = [
    ("llava", "image"),
    ("llava_next", "image"),
    ("llava_next_video", "image"),
    ("llava_next_video", "video"),
    ("llava_onevision", "image"),
    ("llava_onevision", "video"),
    # One sample with one any-res image, one with two images (OneVision writes each as a base tile +
    # one newline token): two runs in one row, a grid with a kept tail.
    ("llava_onevision", "images"),
]
IDS = [f"{f}-{k}" for f, k in CASES]
FAMILIES = ["llava", "llava_next", "llava_next_video", "llava_onevision"]


# --- fixtures and helpers ----------------------------------------------------------------------
_media = functools.partial(random_media, size=(48, 48), frame_size=(48, 48), frames=FRAMES)


def _inputs(family: str, kind: str, samples):
    """Processor outputs for one-turn chats; ``samples`` is a list of (media, prompt). Left padding."""
    block = "video" if kind == "video" else "image"
    return chat_inputs(cached_processor(family),
                       [([(block, m) for m in (media if isinstance(media, list) else [media])], prompt)
                        for media, prompt in samples])


# Two different samples: different media (and, for images, different sizes, hence token counts) and
# prompts of different lengths. A static and a moving video give different temporal-merge counts.
_PROMPTS = ["Describe this.", "What is the man on the left doing, and what color is the car?"]


def _sample(kind: str, i: int):
    if kind == "images":
        return [_media("image", seed=20 + i + j, size=[(48, 48), (48, 96)][j]) for j in range(i + 1)], _PROMPTS[i]
    media = _media(kind, seed=10 + i, size=[(48, 48), (48, 96)][i], static=(i == 0))
    return media, _PROMPTS[i]


def _batch(family: str, kind: str):
    return _inputs(family, kind, [_sample(kind, 0), _sample(kind, 1)])


def _layout(family: str, kind: str, n: int):
    """(grid of the compressible head, kept tail tokens) of one item of ``n`` placeholders, from what
    each family writes (see tiny_models' notes): LLaVA 1.5 a 6×6 grid; any-res images no grid;
    LLaVA-NeXT-Video T×3×3 pooled frames; OneVision T×3×3 frames + one newline token, and a single
    6×6 base tile + one newline token for each image of a several-image sample."""
    if family == "llava":
        return (1, 6, 6), 0
    if kind != "video":
        return ((1, 6, 6), 1) if n == 37 else (None, 0)
    if family == "llava_next_video":
        return (FRAMES, 3, 3), 0
    return (FRAMES, 3, 3), 1


def _planned(family: str, kind: str, n: int, config: CompressionConfig) -> int:
    """Tokens one item of ``n`` placeholders sends to the LLM, in closed form, before running anything."""
    grid, tail = _layout(family, kind, n)
    return planned_tokens(n, grid, config, tail=tail)


COMPRESS = {"image": CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5),
            "images": CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5),
            "video": CompressionConfig(keep_ratio=0.25, temporal_threshold=0.9, v2pe_delta=0.5)}


# --- identity and unpatch ----------------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_identity_config_and_unpatch_are_exact(family, kind):
    model = cached_model(family)
    inputs = _batch(family, kind)
    before = set(model.__dict__)
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = generate_tokens(model, inputs)

    patch(model, CompressionConfig())
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
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_prefill_length_is_planned_and_generate_works(family, kind):
    model = cached_model(family)
    inputs = _batch(family, kind)
    mask = inputs["attention_mask"]
    token_id = placeholder_id(model, kind)
    n_visual = (inputs["input_ids"] == token_id).sum(1).tolist()
    # temporal_keep is the closed-form variant of temporal merging.
    config = CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5, temporal_keep=0.5 if kind == "video" else 1.0)
    rows = [int(mask[b].sum()) - n_visual[b]
            + sum(_planned(family, kind, n, config) for _, n in _runs(inputs["input_ids"][b], token_id))
            for b in range(2)]

    with compressed(model, config):
        with llm_calls(model) as calls:
            out = generate_tokens(model, inputs)
        report = model.vlmcompress.report
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

        model.vlmcompress.config = COMPRESS[kind]           # the data-dependent temporal threshold
        out = generate_tokens(model, inputs)
        report = model.vlmcompress.report
        assert out.shape[1] == inputs["input_ids"].shape[1] + 4
        assert report.visual_after < report.visual_before
        text = [int(mask[b].sum()) - n for b, n in enumerate(n_visual)]
        visual = [sum(i.after_compress for i in report.items if i.row == b) for b in range(2)]
        assert report.prefill_after == [t + v for t, v in zip(text, visual)]


# --- equivalence to a reference built by hand --------------------------------------------------
def _item_features(model, family, kind, inputs):
    """The model's own (uncompressed) features per item, ``[N_i, C]``."""
    base = model.model
    with torch.no_grad():
        if kind == "video":
            return list(base.get_video_features(inputs["pixel_values_videos"]).pooler_output)
        kw = {k: inputs[k] for k in ("image_sizes", "batch_num_images") if k in inputs}
        return list(base.get_image_features(inputs["pixel_values"], **kw).pooler_output)


def _pool_by_hand(feats, grid, out_grid):
    """The mean over each pooling window, and each output's mean raster index (its centroid offset
    inside the run)."""
    raster = torch.arange(math.prod(grid), dtype=torch.float64)[:, None]
    return window_pool(feats.double(), grid, out_grid).to(feats.dtype), window_pool(raster, grid, out_grid)[:, 0]


def _merge_by_hand(feats, target):
    """Bipartite merging to ``target`` tokens: the groups come from the library's matching, the merged
    features (plain mean over each group's original tokens) and centroids are computed here. Tokens
    are ordered by the first original token they hold."""
    groups = sorted(merge_groups(feats, target), key=lambda g: int(g[0]))
    means = torch.stack([feats[g].double().mean(0) for g in groups]).to(feats.dtype)
    return means, torch.stack([g.double().mean() for g in groups])


def _runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of every run of ``token_id`` in a 1-D id tensor."""
    hit = (ids == token_id).tolist() + [False]
    runs, start = [], None
    for i, h in enumerate(hit):
        if h and start is None:
            start = i
        elif not h and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _reference(model, family, kind, inputs, config):
    """``inputs_embeds``, ``attention_mask``, ``position_ids`` for the unpatched model, built by hand."""
    token_id = placeholder_id(model, kind)
    delta = config.v2pe_delta
    embed = model.get_input_embeddings()
    feats = iter(_item_features(model, family, kind, inputs))
    rows = []
    for b in range(inputs["input_ids"].shape[0]):
        ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        embs, poss, cursor, next_pos = [], [], 0, 0
        for start, n in _runs(ids, token_id):
            f = next(feats)
            assert f.shape[0] == n
            grid, tail = _layout(family, kind, n)
            target = math.ceil(config.keep_ratio * (n - tail))
            if grid is None:
                vis, raster = _merge_by_hand(f, target)
            else:
                vis, raster = _pool_by_hand(f[:n - tail], grid, grid_for_budget(grid, target))
            if tail:
                vis = torch.cat([vis, f[n - tail:]])
                raster = torch.cat([raster, torch.arange(n - tail, n, dtype=torch.float64)])
            text = next_pos + torch.arange(start - cursor, dtype=torch.float64)   # text: +1 per token
            p0 = float(text[-1])                         # position of the text token before the run
            poss += [text, p0 + delta * (raster + 1)]    # centroid of the sources' original positions
            next_pos = math.ceil(p0 + delta * n) + 1     # V2PE: the next text token
            with torch.no_grad():
                embs += [embed(ids[cursor:start]), vis]
            cursor = start + n
        poss.append(next_pos + torch.arange(ids.numel() - cursor, dtype=torch.float64))
        with torch.no_grad():
            embs.append(embed(ids[cursor:]))
        rows.append((torch.cat(embs), torch.cat(poss)))
    return left_pad(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_matches_hand_built_reference(family, kind, attn):
    model = cached_model(family, attn)
    inputs = _batch(family, kind)
    config = CompressionConfig(keep_ratio=0.25, v2pe_delta=0.5)
    ref_inputs = _reference(model, family, kind, inputs, config)
    real = ref_inputs["attention_mask"].bool()
    with torch.no_grad():
        ref_logits = model(**ref_inputs).logits
    ref_tokens = generate_tokens(model, ref_inputs)                  # new tokens only (inputs_embeds)

    with compressed(model, config):
        with torch.no_grad(), llm_calls(model) as calls:
            logits = model(**inputs).logits
        assert torch.allclose(calls[0][1][real], ref_inputs["position_ids"][real])
        torch.testing.assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-5)
        out = generate_tokens(model, inputs)
    assert torch.equal(out[:, -4:], ref_tokens)


# --- batch independence ------------------------------------------------------------------------
@pytest.mark.parametrize("family,kind", CASES, ids=IDS)
def test_batch_of_two_equals_each_alone(family, kind):
    model = cached_model(family)
    config = COMPRESS[kind]
    batch = _batch(family, kind)
    with compressed(model, config):
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
        out = generate_tokens(model, batch)
        report = model.vlmcompress.report
        if kind == "video":        # the static and the moving video keep different counts
            assert report.items[0].after_compress < report.items[1].after_compress
        for i in range(2):
            single = _inputs(family, kind, [_sample(kind, i)])
            with torch.no_grad():
                torch.testing.assert_close(model(**single).logits[:, -1], logits[i:i + 1], atol=1e-4, rtol=1e-4)
            assert torch.equal(generate_tokens(model, single)[0, -4:], out[i, -4:])
            assert model.vlmcompress.report.items[0].after_compress == report.items[i].after_compress


# --- save / reload -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_save_reload_then_patch(family, tmp_path):
    from transformers import AutoModelForImageTextToText

    kind = "video" if family in ("llava_next_video", "llava_onevision") else "image"
    model = cached_model(family)
    inputs = _batch(family, kind)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, local_files_only=True).eval()
    with compressed(model, COMPRESS[kind]):
        expected = generate_tokens(model, inputs)
    patch(loaded, COMPRESS[kind])
    assert torch.equal(generate_tokens(loaded, inputs), expected)
    assert loaded.vlmcompress.report.visual_after < loaded.vlmcompress.report.visual_before


# --- bad input ---------------------------------------------------------------------------------
def test_unsupported_model_names_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    text = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="model_type='llama'") as err:
        patch(text, CompressionConfig(keep_ratio=0.5))
    for family in FAMILIES:
        assert family in str(err.value)
    assert not hasattr(text, "vlmcompress")


@pytest.mark.parametrize("bad", [{"keep_ratio": 0.5}, "balanced", 0.5], ids=["dict", "str", "float"])
def test_wrong_config_type_raises_type_error(bad):
    model = cached_model("llava_next")
    with pytest.raises(TypeError, match="CompressionConfig"):
        patch(model, bad)
    assert "forward" not in model.__dict__
    with compressed(model, CompressionConfig()):
        with pytest.raises(TypeError, match="CompressionConfig"):
            model.vlmcompress.config = bad


def test_onevision_video_beam_search_and_unequal_counts():
    """OneVision's forward reads video features as one tensor. Equal compressed counts go stacked, so
    generate() can repeat them per row (beam search = each row alone); different counts travel
    concatenated, which generate() cannot repeat row by row: a clear error, not features in the wrong rows."""
    model = cached_model("llava_onevision")
    inputs = _batch("llava_onevision", "video")
    singles = [_inputs("llava_onevision", "video", [_sample("video", i)]) for i in range(2)]
    beams = {"num_beams": 2, "num_return_sequences": 2}
    with compressed(model, CompressionConfig(keep_ratio=0.25)):
        out = generate_tokens(model, inputs, **beams)
        for i in range(2):
            assert torch.equal(generate_tokens(model, singles[i], **beams)[:, -4:], out[2 * i:2 * i + 2, -4:])
    with compressed(model, COMPRESS["video"]):
        with pytest.raises(ValueError, match="num_return_sequences"):
            generate_tokens(model, inputs, do_sample=True, num_return_sequences=2)
        assert generate_tokens(model, singles[1], do_sample=True, num_return_sequences=2).shape[0] == 2
