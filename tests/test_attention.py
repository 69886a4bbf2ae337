"""Proportional attention: log-size key bias equals attention over duplicated tokens."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmcompress.attention import combine_masks, proportional_attention, proportional_sdpa, size_log_bias


def _plain(q, k, v, mask=None):
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask
    return logits.softmax(-1) @ v.double()


def _case(seed=0, b=2, h=3, nq=5, n=6, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(b, h, n, d, generator=g)
    v = torch.randn(b, h, n, 7, generator=g)
    size = torch.randint(1, 5, (b, n), generator=g).float()
    return q, k, v, size


def _duplicated(k, v, size, b):
    reps = size[b].long()
    return k[b].repeat_interleave(reps, dim=1), v[b].repeat_interleave(reps, dim=1)


def test_size_log_bias_shape_and_values():
    size = torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 1.0]])
    bias = size_log_bias(size)
    assert bias.shape == (2, 1, 1, 3) and bias.dtype == torch.float32
    torch.testing.assert_close(bias[:, 0, 0], size.log())
    assert size_log_bias(size.long()).dtype == torch.float32
    assert size_log_bias(size, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("impl", [proportional_attention, proportional_sdpa], ids=["reference", "sdpa"])
def test_equals_attention_over_duplicated_tokens(impl):
    q, k, v, size = _case()
    out = impl(q, k, v, size)
    for b in range(2):
        kd, vd = _duplicated(k, v, size, b)
        assert kd.shape[1] == int(size[b].sum())
        torch.testing.assert_close(out[b], _plain(q[b], kd, vd).float(), rtol=1e-5, atol=1e-5)


def test_bias_on_query_axis_does_not_duplicate():
    q, k, v, size = _case(seed=1, nq=6, n=6)
    wrong_bias = size.log()[:, None, :, None]                # [B, 1, Nq, 1]: one constant per softmax row
    wrong = _plain(q, k, v, wrong_bias).float()
    # softmax cancels a per-row constant: the query bias is a no-op ...
    torch.testing.assert_close(wrong, _plain(q, k, v).float(), rtol=1e-5, atol=1e-5)
    # ... so it misses the duplication result that the key bias reproduces
    for b in range(2):
        kd, vd = _duplicated(k, v, size, b)
        dup = _plain(q[b], kd, vd).float()
        assert not torch.allclose(wrong[b], dup, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(proportional_attention(q, k, v, size)[b], dup, rtol=1e-5, atol=1e-5)


def test_sdpa_with_bias_equals_reference_with_masks():
    q, k, v, size = _case(seed=2)
    allowed = torch.rand(2, 1, 5, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    allowed[..., 0] = True                                   # every query sees at least one key
    additive = torch.randn(1, 3, 5, 6)
    for mask in (None, allowed, additive):
        ref = proportional_attention(q, k, v, size, attn_mask=mask)
        torch.testing.assert_close(proportional_sdpa(q, k, v, size, attn_mask=mask), ref, rtol=1e-5, atol=1e-5)
        direct = F.scaled_dot_product_attention(q, k, v, attn_mask=combine_masks(size_log_bias(size), mask))
        torch.testing.assert_close(direct, ref, rtol=1e-5, atol=1e-5)


def test_bool_mask_equals_dropping_keys():
    q, k, v, size = _case(seed=4)
    allowed = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    allowed[..., 4:] = False
    out = proportional_attention(q, k, v, size, attn_mask=allowed)
    torch.testing.assert_close(out, proportional_attention(q, k[:, :, :4], v[:, :, :4], size[:, :4]))


def test_size_zero_masks_the_key():
    q, k, v, size = _case(seed=5)
    size[:, 2] = 0
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(proportional_attention(q, k, v, size),
                               proportional_attention(q, k[:, :, keep], v[:, :, keep], size[:, keep]))


def test_all_ones_size_is_plain_attention():
    q, k, v, _ = _case(seed=6)
    ones = torch.ones(2, 6)
    torch.testing.assert_close(proportional_sdpa(q, k, v, ones), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_is_finite_and_close(dtype):
    q, k, v, size = _case(seed=7)
    size = size * 100                                         # large merged tokens
    ref = proportional_attention(q, k, v, size)
    for impl in (proportional_attention, proportional_sdpa):
        out = impl(q.to(dtype), k.to(dtype), v.to(dtype), size.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("call,err,match", [
    (lambda q, k, v, s: size_log_bias(s[0]), ValueError, "size must have 2 dimensions"),
    (lambda q, k, v, s: size_log_bias(-s), ValueError, "size must be >= 0"),
    (lambda q, k, v, s: size_log_bias(s, torch.int64), TypeError, "floating dtype"),
    (lambda q, k, v, s: proportional_attention(q[0], k, v, s), ValueError, "q must have 4 dimensions"),
    (lambda q, k, v, s: proportional_attention(q, k[..., :4], v, s), ValueError, "k must have shape"),
    (lambda q, k, v, s: proportional_attention(q, k, v, s[:, :3]), ValueError, "size must have shape"),
    (lambda q, k, v, s: combine_masks(size_log_bias(s), torch.ones(2, 1, 1, 4, dtype=torch.bool)), ValueError, "does not broadcast"),
    (lambda q, k, v, s: combine_masks(size_log_bias(s), torch.ones(2, 1, 1, 6, dtype=torch.int32)), TypeError, "bool or floating"),
    (lambda q, k, v, s: size_log_bias(s, "float32"), TypeError, r"dtype must be a floating dtype \(a torch.dtype"),
    (lambda q, k, v, s: proportional_sdpa(q, k.double(), v, s), TypeError, "k must have q's dtype"),
    (lambda q, k, v, s: proportional_sdpa(q, k, v.half(), s), TypeError, "v must have q's dtype"),
], ids=["size-rank", "negative-size", "int-dtype", "q-rank", "k-shape", "size-shape", "mask-shape", "int-mask",
        "str-dtype", "sdpa-k-dtype", "sdpa-v-dtype"])
def test_bad_input(call, err, match):
    q, k, v, size = _case()
    with pytest.raises(err, match=match):
        call(q, k, v, size)


def test_after_merging_exact_duplicates_equals_unmerged_attention():
    from vlmcompress.merge import bipartite_soft_matching
    from vlmcompress.state import TokenState

    torch.manual_seed(8)
    x = torch.randn(2, 6, 8).repeat_interleave(2, dim=1)     # tokens 2i and 2i+1 are identical
    merged = bipartite_soft_matching(x, 6).merge(TokenState.from_features(x))
    assert merged.num_tokens == 6 and torch.equal(merged.size, torch.full((2, 6), 2.0))
    q = torch.randn(2, 1, 4, 8)
    kv = merged.x[:, None]
    out = proportional_sdpa(q, kv, kv, merged.size)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, x[:, None], x[:, None]), rtol=1e-5, atol=1e-5)
