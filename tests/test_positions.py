"""V2PE positions (vlmcompress.positions): 1-D rule, M-RoPE block scaling, float rotary tables."""
from __future__ import annotations

import math

import pytest
import torch

from vlmcompress.positions import (
    V2PE_DELTAS,
    raster_offsets,
    rotary_cos_sin,
    scale_visual_blocks,
    v2pe_delta_for,
    v2pe_position_ids,
)
from vlmcompress.state import TokenState


def mask(*bits) -> torch.Tensor:
    """``[1, L]`` bool visual mask from 0/1 values."""
    return torch.tensor([bits], dtype=torch.bool)


def naive_v2pe(visual: list[bool], delta: float) -> list[float]:
    """The V2PE rule written token by token: the spec the vectorised version must follow."""
    out, prev = [], None
    for is_visual in visual:
        if prev is None:
            p = 0.0
        elif is_visual:
            p = prev + delta
        else:
            p = math.ceil(prev) + 1.0
        out.append(p)
        prev = p
    return out


def random_masks(seed: int, batch: int = 3, length: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Blocky masks: runs of visual and text tokens, as real prompts have.
    runs = torch.randint(1, 8, (batch, length), generator=g)
    values = torch.rand(batch, length, generator=g) < 0.5
    return torch.stack([values[b].repeat_interleave(runs[b])[:length] for b in range(batch)])


# ---------------------------------------------------------------- 1-D V2PE


@pytest.mark.parametrize("delta", [0.5, 0.25, 1 / 256], ids=lambda d: f"delta{d:g}")
def test_text_steps_one_visual_steps_delta(delta):
    pos = v2pe_position_ids(mask(0, 0, 0, 1, 1, 1, 1, 1, 0, 0), delta)[0]
    assert pos[:3].tolist() == [0.0, 1.0, 2.0]
    assert pos[3:8].tolist() == [2.0 + delta * k for k in range(1, 6)]
    first_text = math.ceil(2.0 + 5 * delta) + 1
    assert pos[8:].tolist() == [first_text, first_text + 1]


def test_text_after_block_at_ceil_of_block_end():
    # Block of 5 after a token at p0 = 2 with delta 0.3 ends at 3.5; next text at ceil(3.5) + 1 = 5.
    pos = v2pe_position_ids(mask(0, 0, 0, 1, 1, 1, 1, 1, 0), 0.3)[0]
    assert pos[-1].item() == 5.0
    assert torch.allclose(pos[3:8], torch.tensor([2.3, 2.6, 2.9, 3.2, 3.5], dtype=torch.float64))


def test_block_end_on_an_integer_is_not_pushed_by_rounding():
    # 0.28 * 25 == 7.000000000000001 in float64; the text after must still go to 7 + 1, not 9.
    assert 0.28 * 25 > 7.0
    pos = v2pe_position_ids(mask(0, *[1] * 25, 0), 0.28)[0]
    assert pos[-1].item() == 8.0


def test_sequence_starting_with_a_visual_block_starts_at_zero():
    pos = v2pe_position_ids(mask(1, 1, 1, 0, 0), 0.5)[0]
    assert pos.tolist() == [0.0, 0.5, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("delta", [1.0, 0.5, 0.3, 1 / 16, 1 / 256], ids=lambda d: f"delta{d:g}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_token_by_token_rule(delta, seed):
    masks = random_masks(seed)
    pos = v2pe_position_ids(masks, delta)
    for b in range(masks.shape[0]):
        want = torch.tensor(naive_v2pe(masks[b].tolist(), delta), dtype=torch.float64)
        torch.testing.assert_close(pos[b], want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("delta", [1.0, 0.5, 1 / 256], ids=lambda d: f"delta{d:g}")
def test_monotone_and_text_positions_are_integers(delta):
    masks = random_masks(5, batch=4, length=64)
    pos = v2pe_position_ids(masks, delta)
    assert (pos[:, 1:] > pos[:, :-1]).all()  # strictly increasing, in fact
    text = pos[~masks]
    assert torch.equal(text, text.round())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_delta_one_is_arange_bit_for_bit(dtype):
    masks = random_masks(3, batch=2, length=50)
    pos = v2pe_position_ids(masks, 1.0, dtype=dtype)
    assert pos.dtype == dtype
    assert torch.equal(pos, torch.arange(50, dtype=dtype).expand(2, 50))


def test_left_padding_matches_hf_convention_and_unpadded_run():
    masks = random_masks(7, batch=2, length=20)
    attention = torch.ones(2, 20, dtype=torch.long)
    attention[1, :6] = 0  # left padding on the second sample
    # delta = 1 gives exactly what HF builds from the mask.
    hf = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1).to(torch.float64)
    assert torch.equal(v2pe_position_ids(masks, 1.0, attention_mask=attention), hf)
    # delta < 1: the real tokens get what they would get without the padding.
    pos = v2pe_position_ids(masks, 0.25, attention_mask=attention.bool())
    alone = v2pe_position_ids(masks[1:, 6:], 0.25)
    assert torch.equal(pos[1, 6:], alone[0])
    assert torch.equal(pos[1, :6], torch.ones(6, dtype=torch.float64))
    assert torch.equal(pos[0], v2pe_position_ids(masks[:1], 0.25)[0])


def test_batch_equals_singles():
    masks = random_masks(11, batch=4, length=30)
    offsets = torch.rand(4, 30, dtype=torch.float64).cumsum(-1) + 1  # increasing everywhere
    pos = v2pe_position_ids(masks, 0.125, visual_offsets=offsets)
    for b in range(4):
        single = v2pe_position_ids(masks[b:b + 1], 0.125, visual_offsets=offsets[b:b + 1])
        assert torch.equal(pos[b], single[0])


def test_default_offsets_are_one_to_n():
    m = mask(0, 1, 1, 1, 0, 1, 1, 0)
    offsets = torch.tensor([[9.0, 1, 2, 3, 9, 1, 2, 9]])  # text entries are ignored
    assert torch.equal(v2pe_position_ids(m, 0.25, visual_offsets=offsets), v2pe_position_ids(m, 0.25))


def test_merged_tokens_keep_their_true_position():
    # Six original patches (offsets 1..6) merged into three tokens whose centroids are at raster
    # index 0.5, 2 and 4.5 (offsets 1.5, 3, 5.5). After a text token at 0 with delta 1/2 they sit at
    # 0.75, 1.5, 2.75; the text after goes to ceil(2.75) + 1 = 4.
    m = mask(0, 1, 1, 1, 0)
    offsets = torch.tensor([[0.0, 1.5, 3.0, 5.5, 0.0]], dtype=torch.float64)
    pos = v2pe_position_ids(m, 0.5, visual_offsets=offsets)[0]
    assert pos.tolist() == [0.0, 0.75, 1.5, 2.75, 4.0]


def test_raster_offsets_from_token_state():
    grid = (2, 2, 3)
    state = TokenState.from_features(torch.randn(1, 12, 4), grid)
    offsets = raster_offsets(state.pos, grid)
    assert torch.equal(offsets[0], torch.arange(1, 13, dtype=torch.float64))
    # A merged token's offset is the size-weighted mean of its patches' offsets (linear map).
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    centroid = (state.pos[0, [4, 9]].double() * weights[:, None]).sum(0) / weights.sum()
    merged = raster_offsets(centroid.view(1, 1, 3), grid)
    assert merged.item() == pytest.approx((offsets[0, 4] * 1 + offsets[0, 9] * 3).item() / 4)


@pytest.mark.parametrize("delta", [0.0, -0.5, 1.5, float("nan"), float("inf")], ids=str)
def test_bad_delta_raises(delta):
    with pytest.raises(ValueError, match="delta"):
        v2pe_position_ids(mask(0, 1, 0), delta)


def test_bad_inputs_raise():
    with pytest.raises(TypeError, match="delta"):
        v2pe_position_ids(mask(0, 1), "0.5")
    with pytest.raises(TypeError, match="delta"):
        v2pe_position_ids(mask(0, 1), True)
    with pytest.raises(TypeError, match="visual_mask"):
        v2pe_position_ids(torch.tensor([[0, 1]]), 0.5)
    with pytest.raises(ValueError, match="visual_mask"):
        v2pe_position_ids(torch.tensor([0, 1], dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="attention_mask"):
        v2pe_position_ids(mask(0, 1), 0.5, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        v2pe_position_ids(mask(0, 1), 0.5, attention_mask=torch.tensor([[2, 1]]))
    with pytest.raises(ValueError, match="visual_offsets"):
        v2pe_position_ids(mask(0, 1, 1), 0.5, visual_offsets=torch.tensor([[0.0, 3.0, 2.0]]))
    with pytest.raises(ValueError, match="visual_offsets"):
        v2pe_position_ids(mask(0, 1, 1), 0.5, visual_offsets=torch.tensor([[0.0, 0.0, 2.0]]))
    with pytest.raises(TypeError, match="visual_offsets"):
        v2pe_position_ids(mask(0, 1, 1), 0.5, visual_offsets=torch.ones(1, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        v2pe_position_ids(mask(0, 1), 0.5, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "num_visual, budget, want",
    [(0, 1, 1.0), (100, 100, 1.0), (101, 100, 0.5), (1000, 10, 1 / 128), (2560, 10, 1 / 256)],
    ids=lambda v: str(v),
)
def test_delta_for_budget(num_visual, budget, want):
    delta = v2pe_delta_for(num_visual, budget)
    assert delta == want and delta in V2PE_DELTAS
    assert num_visual * delta <= budget
    if delta < 1:
        assert num_visual * delta * 2 > budget  # the largest delta that fits


def test_delta_for_rejects_impossible_budget_and_bad_ints():
    with pytest.raises(ValueError, match="budget"):
        v2pe_delta_for(2561, 10)
    with pytest.raises(ValueError, match="num_visual"):
        v2pe_delta_for(-1, 10)
    with pytest.raises(ValueError, match="budget"):
        v2pe_delta_for(10, 0)


# ---------------------------------------------------------------- rotary


def test_rotary_matches_transformers_llama_at_integer_positions():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         intermediate_size=64, vocab_size=32)
    theta = config.rope_parameters["rope_theta"]
    positions = torch.arange(0, 6000, 37)[:162].view(2, -1)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    for given in (positions, positions.float()):
        cos, sin = rotary_cos_sin(given, 16, theta)
        assert cos.shape == (2, positions.shape[1], 16)
        assert torch.equal(cos, cos_hf) and torch.equal(sin, sin_hf)


def test_rotary_float64_at_integer_positions_equals_integer_computation():
    positions = torch.arange(0, 4096, 7).view(1, -1)
    cos64, sin64 = rotary_cos_sin(positions.double(), 32, dtype=torch.float64)
    inv_freq = [1.0 / 10000.0 ** (2 * k / 32) for k in range(16)]
    want = torch.tensor([[p * f for f in inv_freq] for p in positions[0].tolist()], dtype=torch.float64)
    want = torch.cat([want, want], -1)
    torch.testing.assert_close(cos64[0], want.cos(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sin64[0], want.sin(), rtol=0, atol=1e-12)
    # And the float32 path agrees with it to float32 accuracy of the phases (~pos * 2**-24).
    cos32, _ = rotary_cos_sin(positions, 32)
    assert (cos32.double() - cos64).abs().max() < 1e-3


def test_fractional_positions_need_fp32_not_bf16():
    pos = torch.tensor([[1000.5]])
    assert pos.bfloat16().float().item() == 1000.0  # bf16 cannot hold it: 8 mantissa bits
    cos_f32, _ = rotary_cos_sin(pos, 64)
    cos_rounded, _ = rotary_cos_sin(pos.bfloat16().float(), 64)
    assert (cos_f32 - cos_rounded).abs().max() > 0.4  # the fastest frequency turns by 0.5 rad
    want = math.cos(1000.5)  # inv_freq[0] == 1
    assert cos_f32[0, 0, 0].item() == pytest.approx(want, abs=1e-4)
    with pytest.raises(TypeError, match="bfloat16"):
        rotary_cos_sin(pos.bfloat16(), 64)


def test_rotary_bad_inputs():
    with pytest.raises(ValueError, match="dim"):
        rotary_cos_sin(torch.zeros(1, 2), 7)
    with pytest.raises(ValueError, match="base"):
        rotary_cos_sin(torch.zeros(1, 2), 8, base=0.0)
    with pytest.raises(ValueError, match="position_ids"):
        rotary_cos_sin(torch.tensor([[float("nan")]]), 8)
    with pytest.raises(TypeError, match="dtype must be a floating"):
        rotary_cos_sin(torch.zeros(1, 2), 8, dtype=torch.int64)    # cos/sin would round to 0 and 1


# ---------------------------------------------------------------- M-RoPE (Qwen2-VL family)


def _text_config() -> dict:
    return dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=0,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]))


@pytest.fixture(scope="module")
def qwen2_vl():
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    config = Qwen2VLConfig(
        text_config=_text_config(),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=64, mlp_ratio=1,
                           spatial_merge_size=2, patch_size=2, temporal_patch_size=2),
    )
    return Qwen2VLModel(config).eval()


@pytest.fixture(scope="module")
def qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config=_text_config(),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=64,
                           spatial_merge_size=2, patch_size=2, temporal_patch_size=2,
                           tokens_per_second=2, fullatt_block_indexes=[0]),
    )
    return Qwen2_5_VLModel(config).eval()


# Sample 0: text, an image of 2x3 merged tokens, text. Sample 1: text, a video of 3 frames x 2x1 tokens
# (more frames than rows: Qwen's text after it restarts below the temporal maximum), text.
TYPES = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                      [0, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0]])
IMAGE_GRID = torch.tensor([[1, 4, 6]])
VIDEO_GRID = torch.tensor([[3, 4, 2]])


def _rope_index(model, types, attention_mask=None, **extra):
    input_ids = torch.where(types == 0, 5, 6)
    return model.get_rope_index(input_ids, types, image_grid_thw=IMAGE_GRID, video_grid_thw=VIDEO_GRID,
                                attention_mask=attention_mask, **extra)


def test_mrope_delta_one_is_identity(qwen2_vl):
    pos, deltas = _rope_index(qwen2_vl, TYPES)
    new, new_deltas = scale_visual_blocks(pos, TYPES != 0, 1.0)
    assert new.dtype == torch.float64
    assert torch.equal(new, pos.to(torch.float64))
    assert torch.equal(new_deltas, deltas)


def test_mrope_delta_one_is_identity_with_left_padding(qwen2_vl):
    types = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
                          [0, 0, 0, 2, 2, 2, 2, 2, 2, 0, 0, 0]])
    attention = torch.ones_like(types)
    attention[1, :2] = 0
    pos, deltas = _rope_index(qwen2_vl, types, attention_mask=attention)
    new, new_deltas = scale_visual_blocks(pos, types != 0, 1.0, attention_mask=attention)
    assert torch.equal(new, pos.double()) and torch.equal(new_deltas, deltas)
    # delta < 1: padded slots keep the model's fill value, real tokens match the unpadded sample.
    new, new_deltas = scale_visual_blocks(pos, types != 0, 0.5, attention_mask=attention)
    alone_pos, _ = _rope_index(qwen2_vl, types[1:, 2:])
    alone, alone_deltas = scale_visual_blocks(alone_pos, types[1:, 2:] != 0, 0.5)
    assert torch.equal(new[:, 1, 2:], alone[:, 0]) and new_deltas[1].item() == alone_deltas[0].item()
    assert torch.equal(new[:, 1, :2], pos[:, 1, :2].double())


def test_mrope_delta_one_is_identity_qwen2_5_video_with_time_interval(qwen2_5_vl):
    seconds = torch.tensor([2.0])  # temporal positions step by tokens_per_second * 2 = 4
    pos, deltas = _rope_index(qwen2_5_vl, TYPES, second_per_grid_ts=seconds)
    assert pos[0, 1, 1:7].tolist() == [1, 1, 5, 5, 9, 9]  # the layout this test relies on
    new, new_deltas = scale_visual_blocks(pos, TYPES != 0, 1.0)
    assert torch.equal(new, pos.double()) and torch.equal(new_deltas, deltas)
    # delta 1/4: the block follows text at p0 = 0, so t = 1, 5, 9 -> 0 + (t - 0) / 4; Qwen's text after the
    # block is at q = 3, now at ceil(0 + (3 - 1 - 0) / 4) + 1 = 2.
    new, new_deltas = scale_visual_blocks(pos, TYPES != 0, 0.25)
    assert new[0, 1, 1:7].tolist() == [0.25, 0.25, 1.25, 1.25, 2.25, 2.25]
    assert new[:, 1, 7:].tolist() == [[2, 3, 4, 5]] * 3
    assert new_deltas[1].item() == 5 + 1 - 11
    assert new_deltas[1].item() < deltas[1].item()


def test_mrope_image_block_scaled_by_hand(qwen2_vl):
    pos, deltas = _rope_index(qwen2_vl, TYPES)
    new, new_deltas = scale_visual_blocks(pos, TYPES != 0, 0.5)
    # Image tokens start at s = 2 (after text at p0 = 1) with h offsets 0,0,0,1,1,1 and w offsets 0,1,2,0,1,2:
    # p0 + δ(p - p0) puts the first at 1.5, as V2PE's 1-D rule puts a block's first token at p0 + δ.
    assert new[0, 0, 2:8].tolist() == [1.5] * 6
    assert new[1, 0, 2:8].tolist() == [1.5, 1.5, 1.5, 2.0, 2.0, 2.0]
    assert new[2, 0, 2:8].tolist() == [1.5, 2.0, 2.5, 1.5, 2.0, 2.5]
    # Qwen's text after the block is at q = 5; now ceil(1 + 0.5 * (5 - 1 - 1)) + 1 = 4.
    assert new[:, 0, 8:].tolist() == [[4.0, 5.0, 6.0]] * 3
    assert new[:, 0, :2].tolist() == [[0.0, 1.0]] * 3
    assert new_deltas[0].item() == 6 + 1 - 11 and deltas[0].item() == 7 + 1 - 11


@pytest.mark.parametrize("delta", [0.5, 0.25, 1 / 256], ids=lambda d: f"delta{d:g}")
def test_mrope_smaller_delta_shrinks_span_and_keeps_text_integer(qwen2_vl, delta):
    pos, deltas = _rope_index(qwen2_vl, TYPES)
    new, new_deltas = scale_visual_blocks(pos, TYPES != 0, delta, dtype=torch.float32)
    assert new.dtype == torch.float32
    text = new[:, TYPES == 0]
    assert torch.equal(text, text.round())
    assert (new.amax(dim=(0, 2)) <= pos.amax(dim=(0, 2))).all()
    assert (new_deltas <= deltas).all()
    # Every axis is non-decreasing along text tokens, and the first text after a block is past the
    # block's start.
    for b in range(2):
        t = new[0, b, TYPES[b] == 0]
        assert (t[1:] > t[:-1]).all()
    # Decoding continues right after the prefill: rope_deltas + length == ceil(max) + 1.
    assert ((new_deltas[:, 0] + 11).float() == new.amax(dim=(0, 2)).ceil() + 1).all()


def test_mrope_batch_equals_singles(qwen2_vl):
    pos, _ = _rope_index(qwen2_vl, TYPES)
    new, deltas = scale_visual_blocks(pos, TYPES != 0, 0.125)
    for b in range(2):
        single, single_deltas = scale_visual_blocks(pos[:, b:b + 1], TYPES[b:b + 1] != 0, 0.125)
        assert torch.equal(new[:, b], single[:, 0]) and deltas[b].item() == single_deltas[0].item()


def test_mrope_bad_inputs():
    pos = torch.zeros(3, 1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="position_ids"):
        scale_visual_blocks(torch.zeros(0, 1, 4, dtype=torch.long), mask(0, 1, 1, 0), 0.5)
    with pytest.raises(ValueError, match="visual_mask"):
        scale_visual_blocks(pos, mask(0, 1, 1), 0.5)
    with pytest.raises(ValueError, match="delta"):
        scale_visual_blocks(pos, mask(0, 1, 1, 0), 2.0)
    with pytest.raises(TypeError, match="position_ids"):
        scale_visual_blocks(pos.bfloat16(), mask(0, 1, 1, 0), 0.5)


@pytest.mark.parametrize("delta", [1.0, 0.5, 0.25, 1 / 256], ids=lambda d: f"delta{d:g}")
def test_scale_visual_blocks_on_1d_positions_equals_v2pe(delta):
    visual = mask(0, 0, 1, 1, 1, 0, 1, 1, 0, 0)
    pos = torch.arange(visual.shape[1]).expand_as(visual).unsqueeze(0)
    scaled, _ = scale_visual_blocks(pos, visual, delta)
    assert torch.equal(scaled[0], v2pe_position_ids(visual, delta))
