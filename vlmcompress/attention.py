"""Proportional attention: a merged token counts as many times as the patches it stands for.

Adding ``log(size)`` of the *key* to every logit of that key makes attention over merged tokens equal
attention over the unmerged sequence in which each token is repeated ``size`` times (DESIGN.md §3.1):
``softmax`` turns ``+log(s)`` into a factor ``s`` on that key's weight. The bias must sit on the key
axis; a per-query bias is a constant per softmax row and cancels out.

With SDPA the bias is an additive float ``attn_mask`` of shape ``[B, 1, 1, N]`` that broadcasts over
heads and queries.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import check_tensor

__all__ = ["combine_masks", "proportional_attention", "proportional_sdpa", "size_log_bias"]


def size_log_bias(size: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Additive attention bias ``log(size)`` on the key axis.

    Args:
        size: ``[B, N]`` patch counts, ``>= 0`` (a size of 0 gives ``-inf``: that key is masked).
        dtype: dtype of the bias; default ``size.dtype`` when floating, else float32. For SDPA pass the
            query's dtype. The log is taken in fp32 either way.

    Returns:
        ``[B, 1, 1, N]`` bias, broadcasting over heads and queries.
    """
    check_tensor("size", size, ndim=2)
    if dtype is None:
        dtype = size.dtype if size.is_floating_point() else torch.float32
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype (a torch.dtype such as torch.float32), got {dtype!r}")
    s = size.float()
    # One check (one device sync per call on a GPU): NaN >= 0 is False too.
    if not bool((s >= 0).all()):
        raise ValueError("size must be >= 0 (patch counts); found a negative or NaN entry")
    return s.log().to(dtype)[:, None, None, :]


def combine_masks(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Add the size bias to an existing SDPA-style mask.

    Args:
        bias: additive float bias, e.g. ``[B, 1, 1, N]`` from :func:`size_log_bias`.
        mask: ``None``; a bool mask (``True`` = may attend, SDPA's convention); or an additive float
            mask. Any shape that broadcasts with ``bias`` (typically ``[B or 1, H or 1, Nq, N]``).

    Returns:
        One additive float mask: ``bias`` where attending is allowed, ``-inf`` where a bool mask forbids
        it, ``bias + mask`` for a float mask (in the float mask's dtype).
    """
    check_tensor("bias", bias, floating=True)
    if mask is None:
        return bias
    check_tensor("mask", mask)
    try:
        torch.broadcast_shapes(bias.shape, mask.shape)
    except RuntimeError as err:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast with bias {tuple(bias.shape)}") from err
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"mask must be bool or floating (additive), got {mask.dtype}")
    return bias.to(mask.dtype) + mask


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor,
                           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``softmax(q kᵀ / sqrt(d) + log size_key + mask) v``, computed in fp32.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, N, D]``; v: ``[B, H, N, Dv]``.
        size: ``[B, N]`` patch count of every key.
        attn_mask: optional bool (``True`` = attend) or additive float mask broadcasting to
            ``[B, H, Nq, N]``.

    Returns:
        ``[B, H, Nq, Dv]`` in ``q``'s dtype.
    """
    _check_qkv(q, k, v, size)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits + combine_masks(size_log_bias(size, torch.float32), attn_mask)
    return torch.matmul(logits.softmax(-1), v.float()).to(q.dtype)


def proportional_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, **sdpa_kwargs) -> torch.Tensor:
    """The same through ``F.scaled_dot_product_attention``, with the bias as a float ``attn_mask``."""
    _check_qkv(q, k, v, size)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:  # SDPA's own error would not say which argument
            raise TypeError(f"{name} must have q's dtype {q.dtype} for SDPA, got {t.dtype}")
    mask = combine_masks(size_log_bias(size, q.dtype), attn_mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa_kwargs)


def _check_qkv(q, k, v, size) -> None:
    check_tensor("q", q, ndim=4, floating=True)
    b, h, _, d = q.shape
    check_tensor("k", k, shape=(b, h, None, d), floating=True)
    check_tensor("v", v, shape=(b, h, k.shape[2], None), floating=True)
    check_tensor("size", size, shape=(b, k.shape[2]))
