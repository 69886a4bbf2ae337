"""Fused size-weighted merge (scatter) of tokens into slots: Triton kernel, host function, autograd.

Why a sort-based segmented reduction and not atomics: a ToMe or temporal merge sends many sources to
one slot (a static scene folds up to one token per frame into a single slot). With atomics every
source would ``atomic_add`` its row into an fp32 accumulator in global memory, which needs a second
pass to normalise, a zero-filled ``[B, M, C]`` fp32 buffer (2x the bf16 output), and gives a result
that depends on the order the atomics land in. Sorting ``dst`` per sample (``[B, N]`` int64, tiny next to
``[B, N, C]``) gives CSR offsets, after which one program per (slot, channel block, sample) owns its
output: it reads each source row once, accumulates ``size·x`` in registers, divides and writes once.
That is atomic-free, deterministic (sources are summed in ascending token order) and writes no
intermediate ``x·size`` tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import acc_dtype
from .unmerge import TL_ACC, gather_rows


@triton.jit
def _segment_sum_kernel(
    p_x, p_w, p_pos, p_order, p_offsets,  # inputs
    p_out, p_wout, p_pout,  # outputs
    N, M, C,
    s_xb, s_xn, s_xc,
    s_pb, s_pn, s_pc,
    WEIGHTED: tl.constexpr, NORMALIZE: tl.constexpr, HAS_POS: tl.constexpr,
    ACC: tl.constexpr, PACC: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program per (output slot i_m, channel block i_c, sample i_b). Its sources are
    # order[bos:eos] (token ids sorted by slot); it loads BLOCK_S source rows at a time.
    i_m, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    i_m = i_m.to(tl.int64)
    p_offsets += i_b * (M + 1)
    p_order += i_b * N
    bos = tl.load(p_offsets + i_m)
    eos = tl.load(p_offsets + i_m + 1)

    o_c = i_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_c = o_c < C
    b_acc = tl.zeros([BLOCK_C], dtype=ACC)
    b_wsum = tl.zeros([BLOCK_S], dtype=ACC)
    for j in range(bos, eos, BLOCK_S):
        o_s = j + tl.arange(0, BLOCK_S)
        m_s = o_s < eos
        # [BLOCK_S] source token ids
        b_src = tl.load(p_order + o_s, mask=m_s, other=0)
        if WEIGHTED:
            b_w = tl.load(p_w + i_b * N + b_src, mask=m_s, other=0).to(ACC)
        else:
            b_w = m_s.to(ACC)
        # [BLOCK_S, BLOCK_C]
        b_x = tl.load(p_x + i_b * s_xb + b_src[:, None] * s_xn + o_c[None, :] * s_xc,
                      mask=m_s[:, None] & m_c[None, :], other=0).to(ACC)
        b_acc += tl.sum(b_x * b_w[:, None], axis=0)
        b_wsum += b_w
    b_total = tl.sum(b_wsum, axis=0)
    if NORMALIZE:
        b_acc = b_acc / b_total
    tl.store(p_out + (i_b * M + i_m) * C + o_c, b_acc, mask=m_c)

    # The first channel block also writes the slot's size and its size-weighted position.
    if i_c == 0:
        if WEIGHTED:
            tl.store(p_wout + i_b * M + i_m, b_total)
        if HAS_POS:
            o_p = tl.arange(0, 4)
            m_p = o_p < 3
            b_pacc = tl.zeros([4], dtype=PACC)
            for j in range(bos, eos, BLOCK_S):
                o_s = j + tl.arange(0, BLOCK_S)
                m_s = o_s < eos
                b_src = tl.load(p_order + o_s, mask=m_s, other=0)
                # weights rounded to ACC first, as the reference does
                b_w = tl.load(p_w + i_b * N + b_src, mask=m_s, other=0).to(ACC).to(PACC)
                # [BLOCK_S, 4], the fourth column masked
                b_p = tl.load(p_pos + i_b * s_pb + b_src[:, None] * s_pn + o_p[None, :] * s_pc,
                              mask=m_s[:, None] & m_p[None, :], other=0).to(PACC)
                b_pacc += tl.sum(b_p * b_w[:, None], axis=0)
            b_pacc = b_pacc / b_total.to(PACC)
            tl.store(p_pout + (i_b * M + i_m) * 3 + o_p, b_pacc, mask=m_p)


def segment_plan(dst: torch.Tensor, num_out: int):
    """CSR form of a destination map.

    ``dst [B, N]`` int64 → ``order [B, N]`` (token ids sorted by slot, ascending within a slot) and
    ``offsets [B, M + 1]`` (slot ``m`` owns ``order[offsets[m]:offsets[m + 1]]``). Slots outside
    ``[0, M)`` own nothing, so out-of-range entries of ``dst`` are dropped rather than written out of
    bounds; ``dst`` must be in range (the dispatch checks it for CPU tensors).
    """
    b = dst.shape[0]
    sorted_dst, order = torch.sort(dst, dim=1, stable=True)
    slots = torch.arange(num_out + 1, device=dst.device, dtype=dst.dtype).expand(b, num_out + 1)
    offsets = torch.searchsorted(sorted_dst, slots.contiguous())
    return order, offsets


def _blocks(c: int, block_s: int | None, block_c: int | None):
    # 4 x 512 elements per program: wide enough to stream a 1152-channel row in 3 blocks, small enough
    # to keep a slot's partial sums in registers.
    return block_s or 4, block_c or min(512, max(16, triton.next_power_of_2(c)))


def segment_sum(x, dst, num_out, *, size=None, pos=None, block_s=None, block_c=None):
    """Sum (or, with ``size``, size-weighted mean) of the rows of ``x`` per slot.

    Args:
        x: ``[B, N, C]``.
        dst: ``[B, N]`` int64 slot of each row, in ``[0, num_out)``.
        num_out: ``M``.
        size: optional ``[B, N]`` weights. With it the output is ``Σ size·x / Σ size`` per slot;
            without it the plain sum ``Σ x`` (the backward of a gather).
        pos: optional ``[B, N, 3]`` (needs ``size``): also returns the weighted mean position.

    Returns:
        ``(out [B, M, C] in x.dtype, size_out [B, M] in the accumulation dtype or None,
        pos_out [B, M, 3] in pos.dtype or None)``.
    """
    bsz, n, c = x.shape
    acc = acc_dtype(x.dtype)
    weighted, has_pos = size is not None, pos is not None
    if weighted:
        size = size.contiguous()  # the kernel indexes size as [B, N] row-major (x and pos use strides)
    pacc = torch.promote_types(pos.dtype, acc) if has_pos else acc
    order, offsets = segment_plan(dst, num_out)
    out = torch.empty(bsz, num_out, c, device=x.device, dtype=x.dtype)
    size_out = torch.empty(bsz, num_out, device=x.device, dtype=acc) if weighted else None
    pos_out = torch.empty(bsz, num_out, 3, device=x.device, dtype=pos.dtype) if has_pos else None
    block_s, block_c = _blocks(c, block_s, block_c)
    grid = (num_out, triton.cdiv(c, block_c), bsz)
    pos_arg = pos if has_pos else x
    _segment_sum_kernel[grid](
        x, size if weighted else x, pos_arg, order, offsets,
        out, size_out if weighted else out, pos_out if has_pos else out,
        n, num_out, c,
        *x.stride(), *pos_arg.stride(),
        WEIGHTED=weighted, NORMALIZE=weighted, HAS_POS=has_pos,
        ACC=TL_ACC[acc], PACC=TL_ACC[pacc],
        BLOCK_S=block_s, BLOCK_C=block_c,
    )
    return out, size_out, pos_out


class MergeFunction(torch.autograd.Function):
    """Autograd for the fused merge.

    Backward of a size-weighted mean is a weighted gather:
    ``grad_x[i] = grad_x_out[dst[i]] · size[i] / size_out[dst[i]]`` (the same for ``pos``). ``size``
    gets no gradient (the dispatch sends ``size`` that requires grad to the reference), and
    ``size_out`` is marked non-differentiable.
    """

    @staticmethod
    def forward(ctx, x, size, pos, dst, num_out, block_s=None, block_c=None):
        x_out, size_acc, pos_out = segment_sum(x, dst, num_out, size=size, pos=pos, block_s=block_s, block_c=block_c)
        ctx.save_for_backward(size, dst, size_acc)
        ctx.pos_acc = torch.promote_types(pos.dtype, size_acc.dtype)
        size_out = size_acc.to(size.dtype)
        ctx.mark_non_differentiable(size_out)
        return x_out, size_out, pos_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x_out, grad_size_out, grad_pos_out):
        size, dst, size_acc = ctx.saved_tensors
        grad_x = grad_pos = None
        if ctx.needs_input_grad[0] and grad_x_out is not None:
            grad_x = gather_rows(grad_x_out, dst, size=size, size_out=size_acc)
        if ctx.needs_input_grad[2] and grad_pos_out is not None:
            grad_pos = gather_rows(grad_pos_out, dst, size=size, size_out=size_acc, acc=ctx.pos_acc)
        return grad_x, None, grad_pos, None, None, None, None


def merge_tokens_triton(x, size, pos, dst, num_out, *, block_s=None, block_c=None):
    """Fused :func:`vlmcompress.kernels.reference.merge_tokens` (same arguments and results)."""
    return MergeFunction.apply(x, size, pos, dst, num_out, block_s, block_c)
