"""Variable visual position encoding (V2PE; Ge et al. 2024) and float rotary embeddings.

Text tokens advance the position by 1, visual tokens by a step ``delta`` (δ) in ``(0, 1]``, so a long
video occupies a short positional span and stays inside the context the LLM was trained on. The text
after a visual block goes back to integer positions: ``ceil(last visual position) + 1``.

Positions are float and must stay in float32 or wider: bfloat16 has 8 mantissa bits, so past 256 it
cannot even hold every integer (1000.5 and 1001 both round to 1000), and rotary phases at those
positions are meaningless. Everything here computes in float64 and casts at the end.

Three operators:

- :func:`v2pe_position_ids`: 1-D positions ``[B, L]`` for a sequence with visual tokens (LLaVA,
  InternVL and other families with plain RoPE).
- :func:`scale_visual_blocks`: the same rule applied to a model's own positions: Qwen2-VL style 3-D
  M-RoPE positions ``[3, B, L]`` (as returned by ``get_rope_index``) or 1-D ``[1, B, L]``, plus the
  matching ``rope_deltas`` for decoding. The adapters' pipeline places every token with it.
- :func:`rotary_cos_sin`: ``cos``/``sin`` tables at float positions, in Hugging Face's
  ``rotate_half`` layout.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from ._checks import check_int, check_tensor

__all__ = [
    "V2PE_DELTAS",
    "raster_offsets",
    "rotary_cos_sin",
    "scale_visual_blocks",
    "v2pe_delta_for",
    "v2pe_position_ids",
]

#: The steps V2PE trains with: 1, 1/2, 1/4, ..., 1/256 (powers of two, so ``p0 + δ·k`` is exact in float).
V2PE_DELTAS: tuple[float, ...] = tuple(1.0 / 2**k for k in range(9))

# A block end within this relative distance of an integer counts as that integer, so that a δ like
# 0.28 (0.28 * 25 == 7.000000000000001 in float64) doesn't push the next text one position further.
_CEIL_RTOL = 1e-9


def _ceil(value: float) -> float:
    nearest = round(value)
    if abs(value - nearest) <= _CEIL_RTOL * max(1.0, abs(value)):
        return float(nearest)
    return float(math.ceil(value))


def _check_delta(delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, Real):
        raise TypeError(f"delta must be a real number in (0, 1], got {type(delta).__name__}")
    delta = float(delta)
    if not (0.0 < delta <= 1.0):  # also rejects NaN
        raise ValueError(f"delta must be in (0, 1] (V2PE uses 1, 1/2, ..., 1/256), got {delta}")
    return delta


def _check_float_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64 (lower precision breaks positions), got {dtype}")


def _check_bool_mask(name: str, mask, shape: tuple[int, int] | None = None) -> None:
    check_tensor(name, mask, ndim=2, shape=shape)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True marks visual tokens), got {mask.dtype}")


def _real_tokens(attention_mask, shape: tuple[int, int], device) -> torch.Tensor:
    """``[B, L]`` bool: True where a token is real (not padding)."""
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    check_tensor("attention_mask", attention_mask, ndim=2, shape=shape)
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be a bool or integer 0/1 tensor, got {attention_mask.dtype}")
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    return attention_mask.bool()


def _runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values of a 1-D bool tensor, as ``(start, end, value)``."""
    n = mask.numel()
    if n == 0:
        return []
    starts = [0] + (torch.nonzero(mask[1:] != mask[:-1]).flatten() + 1).tolist()
    ends = starts[1:] + [n]
    values = mask[starts].tolist()
    return list(zip(starts, ends, values))


def v2pe_position_ids(
    visual_mask: torch.Tensor,
    delta: float,
    *,
    attention_mask: torch.Tensor | None = None,
    visual_offsets: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """1-D V2PE position ids.

    Rule, over the real tokens of each sample in order (the first real token counts from 0):

    - a text token sits at ``ceil(p) + 1``, where ``p`` is the position of the token before it
      (``p + 1`` after text; after a visual block this brings the text back to integers);
    - a visual block of ``n`` tokens that follows a token at ``p0`` puts its tokens at
      ``p0 + δ, p0 + 2δ, ..., p0 + nδ``, so the next text token sits at ``ceil(p0 + nδ) + 1``;
    - a sequence that *starts* with a visual block behaves as if a token sat at ``-δ``, so its first
      token is at 0, as in the V2PE paper.

    With ``δ = 1`` this is exactly ``0, 1, ..., L-1`` (bit-identical to ``torch.arange``).

    Args:
        visual_mask: ``[B, L]`` bool, True for visual tokens. A maximal run of True is one block.
        delta: the visual step δ in ``(0, 1]``; see :func:`v2pe_delta_for`.
        attention_mask: optional ``[B, L]`` 0/1 or bool. Padding (0) anywhere (left padding in
            practice) is skipped, and padded slots get position 1, as Hugging Face models do with
            ``cumsum(mask) - 1`` followed by ``masked_fill(mask == 0, 1)``.
        visual_offsets: optional ``[B, L]`` float, read only at visual tokens: each token's offset
            inside its block in units of original tokens, so that a token sits at ``p0 + δ·offset``.
            Default ``1, 2, ..., n``. For merged tokens pass ``1 + raster index of the centroid``
            (:func:`raster_offsets`), so a merged token keeps its true, fractional position. Offsets
            must be finite, positive and non-decreasing within a block (positions stay monotone); the
            block ends at its last offset and the next text goes to ``ceil(p0 + δ·last_offset) + 1``.
        dtype: float32 or float64 (default) of the result. Computation is float64 either way.

    Returns:
        ``[B, L]`` positions of ``dtype``; integer-valued on text tokens.
    """
    _check_bool_mask("visual_mask", visual_mask)
    delta = _check_delta(delta)
    _check_float_dtype(dtype)
    b, l = visual_mask.shape
    real = _real_tokens(attention_mask, (b, l), visual_mask.device)
    if visual_offsets is not None:
        check_tensor("visual_offsets", visual_offsets, shape=(b, l), floating=True)
        if visual_offsets.dtype in (torch.float16, torch.bfloat16):
            raise TypeError(f"visual_offsets must be float32 or float64, got {visual_offsets.dtype}")

    out = torch.ones(b, l, dtype=torch.float64, device=visual_mask.device)
    for i in range(b):
        keep = real[i]
        vis = visual_mask[i][keep]
        offsets = None if visual_offsets is None else visual_offsets[i][keep].to(torch.float64)
        pos = torch.empty(vis.numel(), dtype=torch.float64, device=visual_mask.device)
        prev = None  # position of the token before the current run
        for start, end, is_visual in _runs(vis):
            n = end - start
            if not is_visual:
                first = 0.0 if prev is None else _ceil(prev) + 1.0
                pos[start:end] = first + torch.arange(n, dtype=torch.float64, device=pos.device)
                prev = first + (n - 1)
                continue
            if offsets is None:
                block = torch.arange(1, n + 1, dtype=torch.float64, device=pos.device)
            else:
                block = offsets[start:end]
                _check_block_offsets(block, i, start)
            p0 = -delta if prev is None else prev
            pos[start:end] = p0 + delta * block
            prev = p0 + delta * block[-1].item()
        out[i, keep] = pos
    return out.to(dtype)


def _check_block_offsets(block: torch.Tensor, sample: int, start: int) -> None:
    where = f"visual_offsets[{sample}] (block starting at real token {start})"
    if not torch.isfinite(block).all():
        raise ValueError(f"{where} contains NaN or Inf; offsets must be finite")
    if (block <= 0).any():
        raise ValueError(f"{where} must be > 0 (1 + raster index), got min {block.min().item()}")
    if (block[1:] < block[:-1]).any():
        raise ValueError(f"{where} must be non-decreasing within a block (sort tokens by centroid first)")


def raster_offsets(pos: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """``visual_offsets`` for :func:`v2pe_position_ids` from token centroids.

    Args:
        pos: ``[B, N, 3]`` float (t, h, w) of each token in the original ``grid`` (``TokenState.pos``).
        grid: ``(T, H, W)`` of the original patch grid.

    Returns:
        ``[B, N]`` float64 ``1 + t·H·W + h·W + w``: the raster index of the centroid, plus one. As the
        raster index is linear in (t, h, w), this is also the size-weighted mean of the merged
        patches' own offsets.
    """
    check_tensor("pos", pos, ndim=3, floating=True, finite=True)
    if pos.shape[-1] != 3:
        raise ValueError(f"pos must have shape [B, N, 3], got {tuple(pos.shape)}")
    if len(grid) != 3:
        raise ValueError(f"grid must be (T, H, W), got {grid!r}")
    t_, h_, w_ = (check_int(f"grid[{k}]", v, minimum=1) for k, v in enumerate(grid))
    p = pos.to(torch.float64)
    return 1.0 + p[..., 0] * (h_ * w_) + p[..., 1] * w_ + p[..., 2]


def v2pe_delta_for(num_visual: int, budget: int) -> float:
    """The largest δ in :data:`V2PE_DELTAS` (1, 1/2, ..., 1/256) with ``num_visual · δ <= budget``.

    ``num_visual · δ`` is the positional span the visual tokens take (a block of ``n`` tokens after a
    token at ``p0`` ends at ``p0 + nδ``). ``budget`` is the span the caller can afford, e.g. the
    model's trained context minus the text length. Raises ``ValueError`` when even δ = 1/256 does
    not fit, rather than returning a δ the model was never trained with.
    """
    check_int("num_visual", num_visual, minimum=0)
    check_int("budget", budget, minimum=1)
    for delta in V2PE_DELTAS:
        if num_visual * delta <= budget:
            return delta
    raise ValueError(
        f"{num_visual} visual tokens need a span of {num_visual / 256:g} positions even at delta=1/256, "
        f"more than budget={budget}; reduce the number of visual tokens first"
    )


def rotary_cos_sin(
    position_ids: torch.Tensor,
    dim: int,
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary ``cos``/``sin`` at (float) positions, Hugging Face ``rotate_half`` layout.

    ``inv_freq[k] = 1 / base ** (2k / dim)``, ``freqs = pos · inv_freq``, ``emb = cat(freqs, freqs)``.
    Float32 (or integer) positions are computed in float32 exactly as ``transformers``'
    ``LlamaRotaryEmbedding`` does (identical output at integer positions); float64 positions are
    computed in float64. Half and bfloat16 positions are refused: they cannot represent fractional
    positions (or even all integers past 256).

    Args:
        position_ids: ``[B, L]`` positions (any leading shape works), float32/float64 or integer.
        dim: rotary dimension (the head dim), even.
        base: RoPE base (``rope_theta``).
        dtype: dtype of the returned tables.

    Returns:
        ``(cos, sin)``, each ``[B, L, dim]`` of ``dtype``.
    """
    check_tensor("position_ids", position_ids)
    if position_ids.dtype in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"position_ids must be float32/float64 or integer, got {position_ids.dtype}: half precision "
            "rounds positions (bfloat16(1000.5) == 1000) and breaks the rotary phases"
        )
    if position_ids.dtype == torch.bool or position_ids.is_complex():
        raise TypeError(f"position_ids must be float32/float64 or integer, got {position_ids.dtype}")
    check_int("dim", dim, minimum=2)
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    if isinstance(base, bool) or not isinstance(base, Real) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"base must be a finite number > 0, got {base!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (cos/sin lie in [-1, 1]), got {dtype!r}")
    if position_ids.is_floating_point() and not torch.isfinite(position_ids).all():
        raise ValueError("position_ids contains NaN or Inf")
    compute = torch.float64 if position_ids.dtype == torch.float64 else torch.float32
    device = position_ids.device
    # Same expression as transformers' default rope init, so float32 results match it bit for bit.
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(compute) / dim))
    freqs = position_ids.to(compute)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def scale_visual_blocks(
    position_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    delta: float,
    *,
    attention_mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """V2PE on a model's own positions: scale each visual block by δ (M-RoPE ``[3, B, L]`` or 1-D ``[1, B, L]``).

    Takes the model's own positions (for Qwen2-VL ``position_ids, rope_deltas = model.get_rope_index(...)``)
    and applies the rule of :func:`v2pe_position_ids` over the real tokens of each sample in order:

    - a visual block (maximal run of ``visual_mask``) whose first position is ``s`` (the smallest value
      in the block over all axes; Qwen puts the first token at ``t = h = w = s``) follows a token at
      ``p0 = s - 1``; with ``p0'`` that position after the shifts of earlier blocks, every position of
      the block maps to ``p0' + δ·(p - p0)`` on every axis (so the first token sits at ``p0' + δ``, as in
      the V2PE paper and :func:`v2pe_position_ids`);
    - the model's own layout puts the next token after the block at some ``q``; it goes to
      ``ceil(p0' + δ·(q - 1 - p0)) + 1``, and every later token moves by the same integer shift (for an
      image ``q - 1`` is the block's largest position; for a Qwen2-VL video with more frames than
      rows/columns the model's text restarts below the temporal maximum, and ``q`` keeps that convention);
    - text before the first block is unchanged; padded slots keep their input values (Qwen fills 0).

    With ``δ = 1`` the output equals the input bit for bit and ``rope_deltas`` equals the model's. On 1-D
    positions ``0..L-1`` it equals :func:`v2pe_position_ids`.

    Args:
        position_ids: ``[D, B, L]`` positions (D = 3 for M-RoPE's t/h/w, 1 for plain RoPE), integer or
            float32/float64.
        visual_mask: ``[B, L]`` bool, True on image/video tokens (``mm_token_type_ids != 0``). Two
            visual blocks with no token between them count as one block.
        delta: step δ in ``(0, 1]``.
        attention_mask: optional ``[B, L]`` 0/1 or bool; 0 marks padding.
        dtype: float32 or float64 (default) of the returned positions.

    Returns:
        ``(position_ids, rope_deltas)``: ``[D, B, L]`` of ``dtype``, and ``[B, 1]`` int64
        ``ceil(max position) + 1 - number of real tokens``, as Qwen2-VL's ``get_rope_index`` defines it
        (the ceil keeps decoding positions, ``cache position + rope_deltas``, integers; it changes
        nothing when the maximum is an integer).
    """
    check_tensor("position_ids", position_ids, ndim=3)
    if position_ids.shape[0] < 1:
        raise ValueError(f"position_ids must have shape [D, B, L] with D >= 1 (3 for t/h/w), got {tuple(position_ids.shape)}")
    if position_ids.dtype in (torch.float16, torch.bfloat16, torch.bool) or position_ids.is_complex():
        raise TypeError(f"position_ids must be integer or float32/float64, got {position_ids.dtype}")
    _, b, l = position_ids.shape
    _check_bool_mask("visual_mask", visual_mask, shape=(b, l))
    delta = _check_delta(delta)
    _check_float_dtype(dtype)
    real = _real_tokens(attention_mask, (b, l), position_ids.device)
    if position_ids.is_floating_point() and not torch.isfinite(position_ids).all():
        raise ValueError("position_ids contains NaN or Inf")

    source = position_ids.to(torch.float64)
    out = source.clone()
    rope_deltas = []
    for i in range(b):
        keep = real[i]
        pos = source[:, i, keep]  # [3, n]
        new = pos.clone()
        runs = _runs(visual_mask[i][keep])
        shift = 0.0  # integer-valued: how far tokens after the last block have moved
        for k, (start, end, is_visual) in enumerate(runs):
            if not is_visual:
                new[:, start:end] = pos[:, start:end] + shift
                continue
            block = pos[:, start:end]
            p0 = block.min().item() - 1.0
            p0_new = p0 + shift
            new[:, start:end] = p0_new + delta * (block - p0)
            if k + 1 < len(runs):
                q = pos[:, end].min().item()
                shift = _ceil(p0_new + delta * (q - 1.0 - p0)) + 1.0 - q
        out[:, i, keep] = new
        n = int(keep.sum())
        top = _ceil(new.max().item()) if n else -1.0
        rope_deltas.append(int(top) + 1 - n)
    deltas = torch.tensor(rope_deltas, dtype=torch.int64, device=position_ids.device).unsqueeze(1)
    return out.to(dtype), deltas
