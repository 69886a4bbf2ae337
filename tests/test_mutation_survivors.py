"""Tests for the four single-line mutations a mutation check found uncaught (issue 9), and a second,
independent test of stage-A size bookkeeping. Each compares against a value built by hand here."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vlmcompress as vc
from vlmcompress.adapters.pipeline import prepare_inputs
from vlmcompress.attention import combine_masks, size_log_bias
from vlmcompress.merge import temporal_matching
from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, generate_tokens


def _image(seed=0, size=(48, 48)):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


# --- V2PE alone: the positions the model receives ---------------------------------------------------------
@pytest.mark.parametrize("delta", [0.5, 0.25])
def test_v2pe_alone_gives_the_hand_built_positions(delta):
    """Mutation: dropping the new positions when nothing is merged went unnoticed."""
    model = cached_model("llava")
    inputs = chat_inputs(cached_processor("llava"), [([("image", _image())], "What is this?")])
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).tolist()
    # DESIGN §3.3 by hand: visual token c of a run after p0 sits at p0 + δ(c - p0); the text after the run,
    # originally at P, moves to ceil(p0 + δ(P - 1 - p0)) + 1 and every later token by the same shift.
    expected, shift, i = [], 0.0, 0
    while i < len(visual):
        if not visual[i]:
            expected.append(i + shift)
            i += 1
            continue
        j = i
        while j < len(visual) and visual[j]:
            j += 1
        p0 = i - 1 + shift
        expected += [p0 + delta * (c - (i - 1)) for c in range(i, j)]
        shift = math.ceil(p0 + delta * (j - 1 - (i - 1))) + 1 - j
        i = j
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True)
    try:
        with vc.compressed(model, vc.CompressionConfig(v2pe_delta=delta)):
            generate_tokens(model, inputs)
    finally:
        hook.remove()
    got = seen[0]
    assert got is not None and got.shape == (1, len(visual))
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(seen[1][0, -1]) == expected[-1] + 1          # decoding continues after the last one


# --- padding side ------------------------------------------------------------------------------------------
def test_right_padded_batch_stays_right_padded():
    """Mutation: always packing to the left went unnoticed (the README promises the caller's side)."""
    model = cached_model("llava")
    proc = cached_processor("llava")
    samples = [([("image", _image(0))], "What?"), ([("image", _image(1))], "What colour is the square in the corner?")]
    inputs = chat_inputs(proc, samples)
    # chat_inputs pads left; build the right-padded twin of the same rows.
    mask = inputs["attention_mask"]
    right = {k: v.clone() for k, v in inputs.items()}
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        for key in ("input_ids", "attention_mask"):
            row = inputs[key][b]
            right[key][b] = torch.cat([row[row.shape[0] - n:], row[:row.shape[0] - n]])
    assert bool((right["attention_mask"][:, -1] == 0).any()) and bool(right["attention_mask"][:, 0].all())
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.25)) as m:
        out, _ = prepare_inputs(m.vlmcompress.adapter, m.vlmcompress.config, dict(right))
        left, _ = prepare_inputs(m.vlmcompress.adapter, m.vlmcompress.config, dict(inputs))
    new = out["attention_mask"]
    assert bool(new[:, 0].all()) and bool((new[:, -1] == 0).any())              # still right-padded
    assert bool(left["attention_mask"][:, -1].all()) and bool((left["attention_mask"][:, 0] == 0).any())
    for b in range(new.shape[0]):                                               # same tokens, other side
        assert torch.equal(out["input_ids"][b][new[b].bool()], left["input_ids"][b][left["attention_mask"][b].bool()])


# --- combine_masks against a hand-built sum ----------------------------------------------------------------
def test_combine_masks_is_bias_plus_mask():
    """Mutation: returning the mask without the bias survived (the old test called combine_masks on both sides)."""
    size = torch.tensor([[1.0, 2.0, 4.0, 1.0]])
    bias = size_log_bias(size)                                     # [1, 1, 1, 4]
    logs = [0.0, math.log(2.0), math.log(4.0), 0.0]
    float_mask = torch.tensor([[[[0.0, -1.5, 0.0, -1e9]]]])
    got = combine_masks(bias, float_mask)
    expected = torch.tensor([[[[0.0, math.log(2.0) - 1.5, math.log(4.0), -1e9]]]])
    torch.testing.assert_close(got, expected)
    bool_mask = torch.tensor([[[[True, True, False, True]]]])
    got = combine_masks(bias, bool_mask)
    assert got[0, 0, 0].tolist() == pytest.approx([logs[0], logs[1], float("-inf"), logs[3]])
    assert combine_masks(bias, None)[0, 0, 0].tolist() == pytest.approx(logs)


# --- the temporal threshold is strict ------------------------------------------------------------------------
def test_temporal_threshold_is_strictly_greater():
    """Mutation: ``cosine > threshold`` → ``>=`` survived: no test sat on the boundary. Cosines here are
    exact (0 and 1): a match at exactly the threshold does not merge."""
    e = torch.eye(3)
    # frame 0: e0, e1; frame 1: e2 (cosine 0 with both) and e0 (cosine 1 with frame 0's e0)
    metric = torch.stack([e[0], e[1], e[2], e[0]]).unsqueeze(0)
    assert temporal_matching(metric, 2, threshold=0.0).num_out == 3            # only the cosine-1 pair merges
    assert temporal_matching(metric, 2, threshold=-0.5).num_out == 2           # below: both merge
    assert temporal_matching(metric, 2, threshold=1.0).num_out == 4            # exactly 1 is not > 1


# --- stage A: sizes carry the tower's merges, the ratio counts original tokens -----------------------------
def test_stage_a_sizes_and_keep_ratio_count_original_tokens():
    """A second, independent check of stage-A bookkeeping: after merging in the tower, each token's size is
    how many patches it holds (not reset to 1), and keep_ratio is of the placeholders, not of the tower's
    output."""
    model = cached_model("llava")
    inputs = chat_inputs(cached_processor("llava"), [([("image", _image(2))], "What is this?")])
    with vc.compressed(model, vc.CompressionConfig(vision_keep=0.5, keep_ratio=0.25)) as m:
        generate_tokens(m, inputs)
        item = m.vlmcompress.report.items[0]
    placeholders = item.placeholders
    assert item.after_vision < placeholders                               # the tower merged
    assert float(item.size.sum()) == placeholders                          # sizes count original patches
    assert bool((item.size > 1).any())
    assert item.after_compress == math.ceil(0.25 * placeholders)           # ratio of the placeholders
    # the source map covers every placeholder, each held by exactly one LLM token
    assert item.source.shape == (placeholders,)
    assert torch.equal(torch.bincount(item.source, minlength=item.after_compress).float(), item.size.float())
