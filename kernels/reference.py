"""Plain PyTorch references for the fused kernels. They are the spec, and the CPU path.

A merge is described by a destination map ``dst [B, N]`` (int64): token ``i`` of sample ``b`` ends in
output slot ``dst[b, i]`` of ``M`` slots, every slot receiving at least one token. Bipartite (ToMe) and
temporal merging both reduce to such a map, so one merge kernel and one unmerge kernel serve both.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every merge/gather: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_tokens(x: torch.Tensor, size: torch.Tensor, pos: torch.Tensor, dst: torch.Tensor, num_out: int):
    """Size-weighted merge of tokens into ``num_out`` slots.

    Args:
        x: ``[B, N, C]`` features.
        size: ``[B, N]`` patch counts (> 0).
        pos: ``[B, N, 3]`` positions (fp32 or fp64).
        dst: ``[B, N]`` int64 slot of each token, in ``[0, num_out)``.
        num_out: ``M``, the number of output slots.

    Returns:
        ``(x_out [B, M, C], size_out [B, M], pos_out [B, M, 3])`` with
        ``x_out[m] = Σ_{dst=i→m} size_i·x_i / Σ size_i``, ``size_out[m] = Σ size_i`` and ``pos_out`` the
        same weighted mean as ``x_out``. Accumulation is in fp32 (or fp64 for fp64 inputs).
    """
    b, n, c = x.shape
    acc = acc_dtype(x.dtype)
    w = size.to(acc)
    idx = dst.unsqueeze(-1)
    x_sum = x.new_zeros(b, num_out, c, dtype=acc).scatter_add(1, idx.expand(b, n, c), x.to(acc) * w.unsqueeze(-1))
    size_out = w.new_zeros(b, num_out).scatter_add(1, dst, w)
    pacc = torch.promote_types(pos.dtype, acc)
    pos_sum = pos.new_zeros(b, num_out, 3, dtype=pacc).scatter_add(1, idx.expand(b, n, 3), pos.to(pacc) * w.to(pacc).unsqueeze(-1))
    x_out = x_sum.div_(size_out.unsqueeze(-1)).to(x.dtype)
    pos_out = (pos_sum / size_out.to(pacc).unsqueeze(-1)).to(pos.dtype)
    return x_out, size_out.to(size.dtype), pos_out


def unmerge_tokens(y: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Inverse map of a merge: ``out[b, i] = y[b, dst[b, i]]``. ``y [B, M, C]``, ``dst [B, N]`` → ``[B, N, C]``."""
    return y.gather(1, dst.unsqueeze(-1).expand(*dst.shape, y.shape[-1]))


def best_match(a: torch.Tensor, b: torch.Tensor, b_valid: torch.Tensor | None = None, block_size: int | None = None):
    """For every row of ``a``, the best dot-product match among the rows of ``b``.

    Inputs are expected unit-normalised, so the score is the cosine similarity.

    Args:
        a: ``[B, Na, C]``.
        b: ``[B, Nb, C]``.
        b_valid: optional ``[B, Nb]`` bool; ``False`` rows of ``b`` can never be chosen.
        block_size: rows of ``a`` scored at a time. ``None`` builds the whole ``[B, Na, Nb]`` matrix;
            a block bounds the extra memory to ``B·block_size·Nb`` scores.

    Returns:
        ``(score [B, Na] float32, index [B, Na] int64)``. Ties go to the lowest index.
    """
    bsz, na, _ = a.shape
    if block_size is None or block_size >= na:
        return _best_match_block(a, b, b_valid)
    scores, index = [], []
    for start in range(0, na, block_size):
        s, i = _best_match_block(a[:, start:start + block_size], b, b_valid)
        scores.append(s)
        index.append(i)
    return torch.cat(scores, 1), torch.cat(index, 1)


def _best_match_block(a, b, b_valid):
    sim = torch.matmul(a, b.transpose(-1, -2)).float()
    if b_valid is not None:
        sim = sim.masked_fill(~b_valid.unsqueeze(1), float("-inf"))
    # torch.argmax documents that ties return the first index, which is the tie rule of the kernels.
    index = sim.argmax(-1)
    score = sim.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    return score, index
