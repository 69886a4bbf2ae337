"""Fused unmerge (gather back to the original length and order): Triton kernel, host function, autograd.

The same kernel, with per-token weights, is the backward of the size-weighted merge
(``grad_x[i] = grad_out[dst[i]] · size[i] / size_out[dst[i]]``), so a merge's backward is one pass too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import acc_dtype

# Triton type of each accumulation dtype (kernels/reference.acc_dtype).
TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _gather_kernel(
    p_y, p_dst, p_w, p_wout, p_out,
    N, M, C,
    s_yb, s_ym, s_yc,
    WEIGHTED: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (block of BLOCK_N output tokens, channel block, sample):
    # out[i, c] = y[dst[i], c], times size[i] / size_out[dst[i]] when WEIGHTED.
    i_n, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_n = o_n < N
    m_c = o_c < C
    # [BLOCK_N] slot of each token; an out-of-range slot is masked instead of read out of bounds
    b_d = tl.load(p_dst + i_b * N + o_n, mask=m_n, other=0)
    m_n = m_n & (b_d >= 0) & (b_d < M)
    m = m_n[:, None] & m_c[None, :]
    # [BLOCK_N, BLOCK_C]
    b_y = tl.load(p_y + i_b * s_yb + b_d[:, None] * s_ym + o_c[None, :] * s_yc, mask=m, other=0)
    if WEIGHTED:
        b_w = tl.load(p_w + i_b * N + o_n, mask=m_n, other=0).to(ACC)
        b_wo = tl.load(p_wout + i_b * M + b_d, mask=m_n, other=1).to(ACC)
        b_y = b_y.to(ACC) * (b_w / b_wo)[:, None]
    tl.store(p_out + (i_b * N + o_n[:, None]) * C + o_c[None, :], b_y, mask=m_n[:, None] & m_c[None, :])


def gather_rows(y, dst, *, size=None, size_out=None, acc=None, block_n=None, block_c=None):
    """``out[b, i] = y[b, dst[b, i]]`` (times ``size[b, i] / size_out[b, dst[b, i]]`` when given).

    Args:
        y: ``[B, M, C]`` (any strides).
        dst: ``[B, N]`` int64 in ``[0, M)``.
        size: optional ``[B, N]`` weights; ``size_out``: ``[B, M]`` their per-slot sums.
        acc: dtype of the weighted product (default fp32, fp64 for fp64 ``y``).

    Returns:
        ``[B, N, C]`` contiguous, in ``y.dtype``.
    """
    bsz, m, c = y.shape
    n = dst.shape[1]
    weighted = size is not None
    # The kernel indexes dst, size and size_out as row-major [B, N] / [B, M] (y uses its strides): an
    # expanded dst (stride 0 on B) would otherwise be read past its storage.
    dst = dst.contiguous()
    if weighted:
        size, size_out = size.contiguous(), size_out.contiguous()
    if acc is None:
        acc = acc_dtype(y.dtype)
    out = torch.empty(bsz, n, c, device=y.device, dtype=y.dtype)
    block_n = block_n or 4
    block_c = block_c or min(512, max(16, triton.next_power_of_2(c)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(c, block_c), bsz)
    _gather_kernel[grid](
        y, dst, size if weighted else dst, size_out if weighted else dst, out,
        n, m, c, *y.stride(),
        WEIGHTED=weighted, ACC=TL_ACC[acc], BLOCK_N=block_n, BLOCK_C=block_c,
    )
    return out


class UnmergeFunction(torch.autograd.Function):
    """Autograd for the gather: its backward sums the gradients of all tokens that share a slot."""

    @staticmethod
    def forward(ctx, y, dst, block_n=None, block_c=None):
        ctx.save_for_backward(dst)
        ctx.num_slots = y.shape[1]
        return gather_rows(y, dst, block_n=block_n, block_c=block_c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (dst,) = ctx.saved_tensors
        from .merge import segment_sum  # merge.py imports this module

        grad_y, _, _ = segment_sum(grad_out, dst, ctx.num_slots)
        return grad_y, None, None, None


def unmerge_tokens_triton(y, dst, *, block_n=None, block_c=None):
    """Fused :func:`vlmcompress.kernels.reference.unmerge_tokens` (same arguments and result)."""
    return UnmergeFunction.apply(y, dst, block_n, block_c)
