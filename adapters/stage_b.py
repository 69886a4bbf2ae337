"""Stage B for one item: the config's steps (:mod:`vlmcompress.steps`) applied to its tokens, then the
tokens ordered by the first placeholder slot each holds (its *anchor*), which is where it goes in the
shrunk sequence."""
from __future__ import annotations

import torch

from vlmcompress.config import CompressionConfig
from vlmcompress.state import TokenState


def compress_item(state: TokenState, grid, config: CompressionConfig, *, question: str | None = None,
                  metric_channels: int | None = None, frames=None, token_frames: int | None = None) -> TokenState:
    """Stage B for one item (``state`` holds a batch of one): ``config.stage_b_steps()`` applied in order
    (:func:`vlmcompress.steps.apply_steps`). With ``metric_channels``, similarity and relevance look only
    at the first ``metric_channels`` feature channels; the rest (``EncodedItems.extras``) ride along with
    the same weights. ``frames`` (the item's frames, or a zero-argument callable returning them) go to a
    relevance scorer that scores pixels (``score``). ``token_frames``: ``T`` when a grid-less item's tokens
    are still ``T`` equal blocks, one per frame (:attr:`EncodedItems.token_frames`)."""
    from vlmcompress.steps import StepContext, apply_steps

    steps = config.stage_b_steps()
    if not steps:
        return state
    ctx = StepContext(question=question, frames=_scorer_frames(frames), metric_channels=metric_channels,
                      token_frames=token_frames)
    state, _ = apply_steps(state, grid, steps, ctx)
    return state


def _scorer_frames(frames):
    """A zero-argument callable giving the frames in the ``[T, H, W, 3]`` layout scorers take (or None)."""
    def get():
        pixels = frames() if callable(frames) else frames
        if pixels is None:
            return None
        from .frames import as_scorer_frames

        return as_scorer_frames(pixels, what="relevance frames")
    return get


def _compress_keeping_tail(state: TokenState, tail: int, grid, config: CompressionConfig, question,
                           metric_channels: int | None = None, frames=None, token_frames: int | None = None) -> TokenState:
    """``compress_item`` on all but the last ``tail`` tokens, which are appended unchanged."""
    if not tail:
        return compress_item(state, grid, config, question=question, metric_channels=metric_channels,
                             frames=frames, token_frames=token_frames)
    n = state.num_tokens
    if not 0 < tail < n:
        raise ValueError(f"keep_tail must be in [0, {n}) for an item of {n} tokens, got {tail}")
    head = TokenState(state.x[:, :n - tail], state.size[:, :n - tail], state.pos[:, :n - tail],
                      torch.arange(n - tail, device=state.x.device).unsqueeze(0))
    head = compress_item(head, grid, config, question=question, metric_channels=metric_channels, frames=frames,
                         token_frames=token_frames)
    m = head.num_tokens
    # Fresh states from _initial_state have source = arange(n); compose with the head's map.
    source = torch.cat([head.source, torch.arange(m, m + tail, device=state.x.device).unsqueeze(0)], 1)
    source = source.gather(1, state.source)
    return TokenState(torch.cat([head.x, state.x[:, n - tail:]], 1), torch.cat([head.size, state.size[:, n - tail:]], 1),
                      torch.cat([head.pos, state.pos[:, n - tail:]], 1), source)


def _order_by_first_source(state: TokenState) -> TokenState:
    """Reorder tokens by the first original token each holds.

    Pooling and temporal merging already give that order; bipartite merging keeps its survivors in
    order, but a survivor may hold an earlier token that merged into it, so the first sources can be
    out of order. Sorting (a permutation of whole tokens) keeps every token's features, size and
    centroid and makes the anchor slots increase.
    """
    m = state.num_tokens
    order = _first_sources(state).argsort(stable=True)
    if bool((order == torch.arange(m, device=order.device)).all()):
        return state
    rank = torch.empty_like(order)
    rank[order] = torch.arange(m, device=order.device)
    # -1 marks a dropped patch (RandomDrop): it stays -1.
    source = torch.where(state.source >= 0, rank[state.source.clamp(min=0)], state.source)
    return TokenState(state.x[:, order], state.size[:, order], state.pos[:, order], source)


def _first_sources(state: TokenState) -> torch.Tensor:
    """``[M]`` the first original token each output token holds (``N0`` for a token holding none)."""
    src = state.source[0]
    slots = torch.arange(src.numel(), device=src.device)
    kept = src >= 0                       # -1: a patch a step dropped (RandomDrop); it anchors nothing
    first = torch.full((state.num_tokens,), src.numel(), dtype=torch.long, device=src.device)
    return first.scatter_reduce(0, src[kept], slots[kept], reduce="amin")


def _anchors(state: TokenState) -> torch.Tensor:
    """Slot of each output token: the first original token it holds (increasing after _order_by_first_source)."""
    anchors = _first_sources(state)
    if (anchors >= state.source.shape[1]).any() or (anchors[1:] <= anchors[:-1]).any():
        raise RuntimeError("compressed tokens do not map to increasing placeholder slots; this is a bug in vlmcompress")
    return anchors


def _source_or_none(state: TokenState):
    return None if state.source is None else state.source[0].detach()
