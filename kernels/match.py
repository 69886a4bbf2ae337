"""Tiled best match (max and argmax of cosine scores) without the ``[Na, Nb]`` matrix.

Like FlashAttention's running softmax, each program keeps a running (best score, best index) for its
``BLOCK_A`` rows of ``a`` while it walks over ``b`` in ``BLOCK_B`` tiles, so extra memory is
``O(B·Na)`` instead of ``O(B·Na·Nb)`` (at N = 23,328 in one sequence the full matrix of the bipartite
split is 11,664² fp32 ≈ 544 MB).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _best_match_kernel(
    p_a, p_b, p_valid, p_score, p_index,
    NA, NB, C, COLS_PER_SPLIT,
    s_ab, s_an, s_ac,
    s_bb, s_bn, s_bc,
    HAS_VALID: tl.constexpr, ROUND: tl.constexpr, IN_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, ONE_K: tl.constexpr,
):
    # One program per (block of BLOCK_A rows of a, split of b's rows, sample); a split covers
    # b[i_s * COLS_PER_SPLIT : (i_s + 1) * COLS_PER_SPLIT] and writes its own (best, argmax).
    i_a, i_s, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = i_b.to(tl.int64)
    n_splits = tl.num_programs(1)
    j_start = i_s * COLS_PER_SPLIT
    j_end = tl.minimum(j_start + COLS_PER_SPLIT, NB)
    o_a = i_a * BLOCK_A + tl.arange(0, BLOCK_A)
    m_a = o_a < NA
    # Row offsets in int64: row · stride passes 2^31 elements at e.g. 23,328 tokens × 1152 channels × 80
    # frames' worth of rows (issue 9, defect 9); indices stay int32 (they are < NB).
    o_a64 = o_a.to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    p_a += i_b * s_ab
    p_b += i_b * s_bb
    if ONE_K:
        # C fits in one tile (e.g. a 72-channel ToMe metric): load the rows of a once.
        # [BLOCK_A, BLOCK_K]
        b_a = tl.load(p_a + o_a64[:, None] * s_an + o_k[None, :] * s_ac,
                      mask=m_a[:, None] & (o_k < C)[None, :], other=0)
        if UPCAST:
            b_a = b_a.to(tl.float32)

    b_best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    b_arg = tl.zeros([BLOCK_A], dtype=tl.int32)
    for j in range(j_start, j_end, BLOCK_B):
        o_b = j + tl.arange(0, BLOCK_B)
        m_b = o_b < j_end
        o_b64 = o_b.to(tl.int64)
        if ONE_K:
            # [BLOCK_K, BLOCK_B], b transposed by the load
            b_bt = tl.load(p_b + o_b64[None, :] * s_bn + o_k[:, None] * s_bc,
                           mask=m_b[None, :] & (o_k < C)[:, None], other=0)
            if UPCAST:
                b_bt = b_bt.to(tl.float32)
            b_s = tl.dot(b_a, b_bt, input_precision=PRECISION)
        else:
            b_s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
            for k in range(0, C, BLOCK_K):
                o_kk = k + o_k
                m_k = o_kk < C
                b_ak = tl.load(p_a + o_a64[:, None] * s_an + o_kk[None, :] * s_ac,
                               mask=m_a[:, None] & m_k[None, :], other=0)
                b_bt = tl.load(p_b + o_b64[None, :] * s_bn + o_kk[:, None] * s_bc,
                               mask=m_b[None, :] & m_k[:, None], other=0)
                if UPCAST:
                    b_ak, b_bt = b_ak.to(tl.float32), b_bt.to(tl.float32)
                b_s = tl.dot(b_ak, b_bt, b_s, input_precision=PRECISION)
        if ROUND:
            # torch.matmul returns fp16/bf16 scores; rounding the same way makes both paths see the
            # same ties, so they pick the same match.
            b_s = b_s.to(IN_DTYPE).to(tl.float32)
        m_ok = m_b
        if HAS_VALID:
            m_ok = m_ok & (tl.load(p_valid + i_b * NB + o_b, mask=m_b, other=0) != 0)
        b_s = tl.where(m_ok[None, :], b_s, float("-inf"))
        # [BLOCK_A] best of this tile, lowest index on ties
        b_tmax, b_targ = tl.max(b_s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # strictly greater: an equal score in a later tile keeps the earlier (lower) index
        m_new = b_tmax > b_best
        b_best = tl.where(m_new, b_tmax, b_best)
        b_arg = tl.where(m_new, b_targ + j, b_arg)
    o_out = (i_b * n_splits + i_s) * NA + o_a64
    tl.store(p_score + o_out, b_best, mask=m_a)
    tl.store(p_index + o_out, b_arg.to(tl.int64), mask=m_a)


_TL_IN = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def best_match_forward(a, b, b_valid=None, *, block_a=None, block_b=None, block_k=None, splits=None):
    """Tiled :func:`vlmcompress.kernels.reference.best_match` without autograd.

    ``a [B, Na, C]``, ``b [B, Nb, C]`` (same fp16/bf16/fp32 dtype), ``b_valid [B, Nb]`` bool or None →
    ``(score [B, Na] fp32, index [B, Na] int64)``. ``splits``: how many programs share one block of
    ``a``'s rows, each scanning a contiguous part of ``b`` (default: enough to fill the GPU).
    """
    bsz, na, c = a.shape
    nb = b.shape[1]
    # tl.dot needs every tile side >= 16. 64 x 64 score tiles; channels in steps of 64, or in one
    # step up to 128 so a ToMe metric (72-channel keys of SigLIP) loads its rows of a only once.
    block_a = block_a or 64
    block_b = block_b or 64
    block_k = block_k or (max(16, triton.next_power_of_2(c)) if c <= 128 else 64)
    one_k = block_k >= c
    tiles_a, tiles_b = triton.cdiv(na, block_a), triton.cdiv(nb, block_b)
    if splits is None:
        # One sequence (B = 1, N = 23,328) gives only 183 row blocks for an H200's 132 SMs: split b
        # so that every SM gets several programs (about 8 per SM in all).
        splits = max(1, min(tiles_b, 8 * _num_sms(a.device) // max(1, tiles_a * bsz)))
    cols = triton.cdiv(tiles_b, splits) * block_b
    splits = triton.cdiv(nb, cols)
    score = torch.empty(bsz, splits, na, device=a.device, dtype=torch.float32)
    index = torch.empty(bsz, splits, na, device=a.device, dtype=torch.int64)
    # The interpreter's tl.dot multiplies bf16 tiles as raw 16-bit integers (numpy has no bf16), so
    # there the tiles go to fp32 first: bf16 x bf16 products are exact in fp32, so the result is what
    # a bf16 dot with fp32 accumulation gives on the GPU.
    upcast = a.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)
    valid = b_valid.contiguous().view(torch.uint8) if b_valid is not None else a
    _best_match_kernel[(tiles_a, splits, bsz)](
        a, b, valid, score, index,
        na, nb, c, cols, *a.stride(), *b.stride(),
        HAS_VALID=b_valid is not None, ROUND=a.dtype != torch.float32, IN_DTYPE=_TL_IN[a.dtype],
        # full fp32 products: torch.matmul does not use TF32 by default, and TF32's 10-bit mantissa
        # would change which match wins
        PRECISION="ieee" if a.dtype == torch.float32 or upcast else "tf32",
        UPCAST=upcast,
        BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k, ONE_K=one_k,
    )
    if splits == 1:
        return score[:, 0], index[:, 0]
    # Combine the splits: the highest score, and among equal scores the first split, whose index is
    # the lowest, as in the reference.
    best = score.amax(1, keepdim=True)
    first = torch.where(score == best, torch.arange(splits, device=a.device)[:, None], splits).amin(1, keepdim=True)
    return best[:, 0], index.gather(1, first)[:, 0]


class BestMatchFunction(torch.autograd.Function):
    """Autograd for the tiled match. ``index`` carries no gradient; ``score[i] = a_i · b_index[i]``.

    On exact ties the whole gradient goes to the chosen (lowest-index) match, where ``amax`` in the
    reference would split it evenly.
    """

    @staticmethod
    def forward(ctx, a, b, b_valid, block_a=None, block_b=None, block_k=None, splits=None):
        score, index = best_match_forward(a, b, b_valid, block_a=block_a, block_b=block_b, block_k=block_k, splits=splits)
        ctx.save_for_backward(a, b, score, index)
        ctx.mark_non_differentiable(index)
        return score, index

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_score, grad_index):
        a, b, score, index = ctx.saved_tensors
        # rows with no valid candidate (score -inf) have no gradient
        g = torch.where(torch.isfinite(score), grad_score, 0).to(a.dtype).unsqueeze(-1)
        idx = index.unsqueeze(-1).expand(*index.shape, a.shape[-1])
        grad_a = g * b.gather(1, idx) if ctx.needs_input_grad[0] else None
        grad_b = torch.zeros_like(b).scatter_add_(1, idx, g * a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None, None, None, None


def best_match_triton(a, b, b_valid=None, block_size=None, *, block_a=None, block_b=None, block_k=None, splits=None):
    """Same arguments and results as the reference; ``block_size`` is accepted and ignored (the
    kernel always tiles, so memory is linear in ``Na`` whatever it is)."""
    return BestMatchFunction.apply(a, b, b_valid, block_a, block_b, block_k, splits)
