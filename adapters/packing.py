"""Positions and sequence packing: where each kept token sits in the new layout (V2PE, centroids) and
how rows shrink to the kept tokens (padding on the caller's side)."""
from __future__ import annotations

import torch

from vlmcompress.state import TokenState


def _position_map(positions: torch.Tensor, real: torch.Tensor, visual: torch.Tensor,
                  delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every token of the uncompressed sequence goes in the new layout: V2PE per placeholder run
    (:func:`vlmcompress.positions.scale_visual_blocks` on the model's own positions).

    Inside a run the map is affine, ``δ·c + a`` (``a`` the run's offset), and it does not depend on how
    many tokens compression keeps, so a compressed token is placed at the centroid of its sources'
    *mapped* positions: ``δ·centroid + mean offset``. For an item inside one run that is the run's
    affine map of the centroid; for an item spread over several runs (a Qwen3-VL video, one run per frame
    group) each source keeps its own run's offset. With δ = 1 and nothing merged this is the identity.

    Returns ``(mapped [D, B, L], offset [B, L])`` (offset 0 outside placeholder runs).
    """
    from vlmcompress.positions import scale_visual_blocks

    mapped, _ = scale_visual_blocks(positions, visual, delta, attention_mask=real)
    offset = torch.where(visual, mapped[0] - delta * positions[0].to(mapped), torch.zeros_like(mapped[0]))
    return mapped, offset


def _to_new_layout(state: TokenState, offset: torch.Tensor, dims: int, delta: float) -> TokenState:
    """Move a fresh item state from original to new-layout positions: ``δ·pos + offset`` per token, the
    offset averaged over each token's sources when a merging tower already combined placeholders."""
    n0 = offset.numel()
    off = offset.to(state.pos)
    if state.num_tokens != n0:
        if state.source is not None and state.source.shape[1] == n0:
            src = state.source[0].to(off.device)
            total = torch.zeros(state.num_tokens, dtype=off.dtype, device=off.device).index_add_(0, src, off)
            count = torch.zeros_like(total).index_add_(0, src, torch.ones_like(off))
            off = total / count.clamp(min=1)
        else:
            off = off[:1].expand(state.num_tokens)
    pos = state.pos.clone()
    pos[0, :, :dims] = delta * pos[0, :, :dims] + off.unsqueeze(-1)
    return state.replace(pos=pos)


def _new_positions(mapped: torch.Tensor, items: list) -> torch.Tensor:
    """New absolute positions ``[D, B, L]`` (valid where ``keep``): the mapped text positions, and at
    each kept placeholder slot the position of the compressed token anchored there (already mapped)."""
    dims = mapped.shape[0]
    new = mapped.clone()
    for item in items:
        slots = item.slots[item.anchors].to(new.device)
        new[:, item.row, slots] = item.state.pos[0, :, :dims].T.to(new)
    return new


def _pack(values: torch.Tensor, keep: torch.Tensor, length: int, pad, left: bool) -> torch.Tensor:
    rows = []
    for b in range(values.shape[0]):
        kept = values[b][keep[b]]
        fill = values.new_full((length - kept.shape[0],), pad)
        rows.append(torch.cat([fill, kept]) if left else torch.cat([kept, fill]))
    return torch.stack(rows)


def _pad_value(ids, mask, adapter) -> int:
    pads = ids[mask == 0]
    return int(pads[0]) if pads.numel() else adapter.pad_token_id()
