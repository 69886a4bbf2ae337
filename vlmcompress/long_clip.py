"""Long-CLIP text context: stretch CLIP's 77-row text position table to 248 rows, training-free.

Long-CLIP (Zhang et al. 2024) and PPLLaVA keep the first 20 rows (CLIP learned them well; most
captions are short) and stretch the rest 4× by linear interpolation: ``20 + 57·4 = 248``. Because the
text tower is causal and pools at the end-of-text token, a prompt that fits in the first ``keep``
positions sees exactly the original rows and gives the original embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from ._checks import check_int, check_tensor

__all__ = ["stretch_positional_embedding", "apply_long_context", "stretched_length"]


def stretched_length(length: int, keep: int = 20, factor: int = 4) -> int:
    """Rows after stretching: ``keep + (length - keep) * factor`` (77 → 248 with the defaults)."""
    # the same limits as stretch_positional_embedding, so both agree on what a valid table is
    check_int("length", length, minimum=2)
    check_int("factor", factor, minimum=1)
    check_int("keep", keep, minimum=0, maximum=length - 1)
    return keep + (length - keep) * factor


def stretch_positional_embedding(table: torch.Tensor, keep: int = 20, factor: int = 4) -> torch.Tensor:
    """Long-CLIP stretch of a text position table.

    Args:
        table: ``[L, D]`` float position table (``L = 77`` for CLIP).
        keep: leading rows copied unchanged.
        factor: stretch of the remaining ``L - keep`` rows.

    Returns:
        ``[keep + (L - keep)·factor, D]`` in the table's dtype. Rows ``< keep`` are the original rows.
        Row ``keep + factor·i + j`` (``0 <= j < factor``) is ``(1 - j/factor)·p[keep+i] + (j/factor)·p[keep+i+1]``;
        past the last original row, which has no successor, the last difference is extrapolated:
        ``p[L-1] + (j/factor)·(p[L-1] - p[L-2])`` (as Long-CLIP does).
    """
    check_tensor("table", table, ndim=2, floating=True)
    length = table.shape[0]
    check_int("factor", factor, minimum=1)
    if length < 2:
        raise ValueError(f"table must have at least 2 rows (the last difference is extrapolated), got {length}")
    check_int("keep", keep, minimum=0, maximum=length - 1)
    acc = torch.promote_types(table.dtype, torch.float32)
    p = table.to(acc)
    tail = p[keep:]  # [L - keep, D]
    nxt = torch.cat([tail[1:], 2 * p[-1:] - p[-2:-1]], 0)  # successor of each row; the last extrapolated
    frac = torch.arange(factor, device=table.device, dtype=acc) / factor  # j / factor
    # Same arithmetic as Long-CLIP's a·(factor-j)/factor + b·j/factor, vectorised over rows.
    stretched = tail.unsqueeze(1) + frac.view(1, -1, 1) * (nxt - tail).unsqueeze(1)  # [L-keep, factor, D]
    # Rows < keep only go through a widening cast and back: bit-exact copies.
    return torch.cat([p[:keep], stretched.reshape(-1, p.shape[1])], 0).to(table.dtype)


def _text_tower(model: nn.Module) -> nn.Module:
    """The module that owns ``positional_embedding``/``attn_mask``/``context_length`` for the text side.

    open_clip's ``CLIP`` keeps them on the model itself; ``CustomTextCLIP`` (and CoCa) on ``model.text``.
    """
    if isinstance(getattr(model, "positional_embedding", None), torch.Tensor) and hasattr(model, "token_embedding"):
        return model
    text = getattr(model, "text", None)
    if text is not None and isinstance(getattr(text, "positional_embedding", None), torch.Tensor):
        return text
    raise TypeError(
        f"apply_long_context needs an open_clip model whose text tower has a learned positional_embedding "
        f"(CLIP or CustomTextCLIP); {type(model).__name__} has none (a Hugging Face text tower is not supported)"
    )


def apply_long_context(model: nn.Module, keep: int = 20, factor: int = 4) -> int:
    """Stretch an open_clip model's text context in place (Long-CLIP, 77 → 248 by default).

    Replaces the text ``positional_embedding`` with :func:`stretch_positional_embedding` of it, rebuilds
    the causal ``attn_mask`` at the new length (left ``None`` for towers without one, e.g. SigLIP) and
    sets ``context_length``. Tokenize with the new context length afterwards
    (``tokenizer.context_length = model.context_length``). Calling it again on a stretched model does
    nothing.

    Returns:
        The new context length.
    """
    tower = _text_tower(model)
    done = getattr(tower, "_vlmcompress_long_context", None)
    if done is not None:
        return done
    old = tower.positional_embedding
    new_table = stretch_positional_embedding(old.detach(), keep=keep, factor=factor)
    new_len = new_table.shape[0]
    tower.positional_embedding = nn.Parameter(new_table, requires_grad=old.requires_grad)
    mask = getattr(tower, "attn_mask", None)
    if mask is not None:
        # Same construction as open_clip's build_causal_mask: -inf above the diagonal, 0 elsewhere.
        causal = torch.full((new_len, new_len), float("-inf"), device=mask.device, dtype=mask.dtype).triu_(1)
        tower.register_buffer("attn_mask", causal, persistent=False)
    tower.context_length = new_len
    if hasattr(tower, "num_pos"):
        tower.num_pos = new_len
    if tower is not model and hasattr(model, "context_length"):
        model.context_length = new_len
    tower._vlmcompress_long_context = new_len
    return new_len
