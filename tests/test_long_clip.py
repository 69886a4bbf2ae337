"""Long-CLIP text context stretch: the table, the in-place model change, exactness for short prompts."""
from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vlmcompress.long_clip import apply_long_context, stretch_positional_embedding, stretched_length  # noqa: E402
from vlmcompress.relevance import TINY_CLIP_CONFIG, simple_tokenizer, tiny_clip_model  # noqa: E402

SHORT = ["a red dog", "what is the man holding?", "count the cars"]  # < 20 tokens with SOT/EOT
MEDIUM = "the person in the blue jacket walks past a row of parked bicycles near the old stone bridge at dusk"


def long_clip_reference(p: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's own loop (model/longclip.py, load_from_clip), transcribed for factor 4."""
    length, dim = p.shape
    new = torch.zeros(4 * length - 3 * keep, dim, dtype=p.dtype)
    for i in range(keep):
        new[i] = p[i]
    for i in range(length - 1 - keep):
        new[4 * i + keep] = p[i + keep]
        new[4 * i + 1 + keep] = 3 * p[i + keep] / 4 + 1 * p[i + 1 + keep] / 4
        new[4 * i + 2 + keep] = 2 * p[i + keep] / 4 + 2 * p[i + 1 + keep] / 4
        new[4 * i + 3 + keep] = 1 * p[i + keep] / 4 + 3 * p[i + 1 + keep] / 4
    for j in range(4):
        new[4 * length - 3 * keep - 4 + j] = p[length - 1] + j * (p[length - 1] - p[length - 2]) / 4
    return new


def test_stretch_shape_and_kept_rows():
    table = torch.randn(77, 16)
    out = stretch_positional_embedding(table)
    assert out.shape == (248, 16) == (stretched_length(77), 16)
    assert torch.equal(out[:20], table[:20])
    assert torch.equal(out[20::4][:57], table[20:])  # every 4th row from 20 is an original row


def test_stretch_matches_long_clip_formula():
    table = torch.randn(77, 8, dtype=torch.float64)
    torch.testing.assert_close(stretch_positional_embedding(table), long_clip_reference(table), rtol=1e-12, atol=1e-12)
    # Spot values: a quarter of the way between rows 20 and 21; last row extrapolated 3/4 of a step.
    out = stretch_positional_embedding(table)
    torch.testing.assert_close(out[21], 0.75 * table[20] + 0.25 * table[21])
    torch.testing.assert_close(out[247], table[76] + 0.75 * (table[76] - table[75]))


@pytest.mark.parametrize("length,keep,factor", [(77, 20, 4), (64, 10, 2), (10, 0, 3), (5, 4, 4)], ids=lambda v: str(v))
def test_stretch_generic_sizes(length, keep, factor):
    table = torch.randn(length, 4)
    out = stretch_positional_embedding(table, keep=keep, factor=factor)
    assert out.shape[0] == keep + (length - keep) * factor
    assert torch.equal(out[:keep], table[:keep])
    assert torch.equal(out[keep::factor][: length - keep], table[keep:])


def test_stretch_keeps_dtype():
    table = torch.randn(77, 8).half()
    out = stretch_positional_embedding(table)
    assert out.dtype == torch.float16 and torch.equal(out[:20], table[:20])


def test_stretch_bad_inputs():
    with pytest.raises(ValueError, match="table"):
        stretch_positional_embedding(torch.randn(77))
    with pytest.raises(TypeError, match="table"):
        stretch_positional_embedding(torch.zeros(77, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="keep"):
        stretch_positional_embedding(torch.randn(77, 4), keep=77)
    with pytest.raises(ValueError, match="factor"):
        stretch_positional_embedding(torch.randn(77, 4), factor=0)
    with pytest.raises(ValueError, match="2 rows"):
        stretch_positional_embedding(torch.randn(1, 4), keep=0)


def test_stretched_length_checks_like_the_stretch():
    assert stretched_length(77) == 248 and stretched_length(10, keep=0, factor=1) == 10
    with pytest.raises(ValueError, match="length must be >= 2"):
        stretched_length(-5)                                    # was -120 rows
    with pytest.raises(TypeError, match="length must be an int"):
        stretched_length(77.0)
    with pytest.raises(ValueError, match="keep must be <= 76"):
        stretched_length(77, keep=80)                           # was 68 rows, fewer than 77
    with pytest.raises(ValueError, match="factor must be >= 1"):
        stretched_length(77, factor=0)


def encode(model, texts, context_length):
    tok = simple_tokenizer(context_length)
    with torch.no_grad():
        return model.encode_text(tok(texts))


def test_apply_long_context_clip_model():
    model = tiny_clip_model(0)
    before_short = encode(model, SHORT, 77)
    before_medium = encode(model, [MEDIUM], 77)
    table = model.positional_embedding.detach().clone()
    assert simple_tokenizer(77)([MEDIUM]).count_nonzero() > 20  # really past the kept rows

    assert apply_long_context(model) == 248
    assert model.context_length == 248
    assert model.positional_embedding.shape == (248, 32)
    assert isinstance(model.positional_embedding, torch.nn.Parameter)
    assert torch.equal(model.positional_embedding[:20], table[:20])
    expected_mask = torch.full((248, 248), float("-inf")).triu_(1)
    assert torch.equal(model.attn_mask, expected_mask)
    assert "attn_mask" not in model.state_dict()  # stays a non-persistent buffer, as open_clip has it

    after_short = encode(model, SHORT, 248)
    assert torch.equal(after_short, before_short)  # bit-exact: only rows < 20 are ever attended to
    after_medium = encode(model, [MEDIUM], 248)
    assert not torch.allclose(after_medium, before_medium)  # longer prompts do see the stretched rows

    # Applying again changes nothing.
    assert apply_long_context(model) == 248
    assert model.positional_embedding.shape == (248, 32)


def test_apply_long_context_long_prompt_is_not_truncated_at_77():
    model = tiny_clip_model(0)
    apply_long_context(model)
    words = " ".join(["word"] * 90)  # > 77 tokens
    a = encode(model, [words + " ending in a cat"], 248)
    b = encode(model, [words + " ending in a dog"], 248)
    # At 77 tokens both prompts truncate to the same ids; at 248 the difference is seen.
    t77 = simple_tokenizer(77)
    assert torch.equal(t77([words + " ending in a cat"]), t77([words + " ending in a dog"]))
    assert not torch.allclose(a, b)


def test_apply_long_context_custom_text_clip():
    import copy

    torch.manual_seed(0)
    model = open_clip.CustomTextCLIP(**copy.deepcopy(TINY_CLIP_CONFIG)).eval()
    before = encode(model, SHORT, 77)
    apply_long_context(model)
    assert model.context_length == 248 and model.text.context_length == 248
    assert model.text.positional_embedding.shape == (248, 32)
    assert model.text.attn_mask.shape == (248, 248)
    assert torch.equal(encode(model, SHORT, 248), before)


def test_apply_long_context_rejects_models_without_a_table():
    with pytest.raises(TypeError, match="positional_embedding"):
        apply_long_context(torch.nn.Linear(2, 2))
