"""The family-independent route from processor outputs to a shorter prefill.

1. encode every image/video with the family's own encoder (adapter),
2. compress each item (temporal merging, prompt-guided pooling or merging to a budget),
3. keep, for every compressed token, the placeholder slot of its first source (its *anchor*) and
   drop the other placeholders, so ``input_ids``, ``attention_mask`` and per-token ids shrink together,
4. place every compressed token at the centroid of its sources' original positions, with V2PE's δ,
5. hand the features to the model as ``mm_encoder_outputs``: its own code scatters them and its
   own ``generate()`` loop does the rest (cache, sampling, stopping).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmcompress.config import CompressionConfig
from vlmcompress.state import TokenState

from .base import FamilyAdapter


@dataclass
class ItemReport:
    """Token counts of one image or video through the stages."""

    modality: str
    row: int
    placeholders: int      # tokens the processor reserved (what the LLM would read unpatched)
    after_vision: int      # tokens leaving the vision tower + projector (stage A)
    after_compress: int    # tokens reaching the LLM (stage B)
    grid: tuple | None = None           # (T, H, W) LLM-token grid of the item, when it has one
    source: torch.Tensor | None = None  # [placeholders] int64: which LLM token holds each original token (-1: dropped)
    size: torch.Tensor | None = None    # [after_compress] how many original tokens each one stands for
    skipped_frames: list[int] | None = None  # temporal units never encoded (FrameSkip before the tower)

    @property
    def kept_ratio(self) -> float:
        return self.after_compress / self.placeholders


@dataclass
class CompressionReport:
    """What the last patched call did; ``model.vlmcompress.report`` after a call."""

    items: list[ItemReport] = field(default_factory=list)
    prefill_before: list[int] = field(default_factory=list)   # per row, real (unpadded) tokens
    prefill_after: list[int] = field(default_factory=list)
    # [B, L'] float32, per token of the packed prompt: how many original tokens it stands for (1 for text
    # and padding). What proportional attention in the LLM adds log() of (adapters/llm_attention.py).
    token_size: torch.Tensor | None = None

    @property
    def visual_before(self) -> int:
        return sum(i.placeholders for i in self.items)

    @property
    def visual_after(self) -> int:
        return sum(i.after_compress for i in self.items)

    def summary(self) -> str:
        lines = [f"visual tokens {self.visual_before} -> {self.visual_after}; prefill per row "
                 f"{self.prefill_before} -> {self.prefill_after}"]
        for it in self.items:
            skipped = f", frames {it.skipped_frames} skipped before the tower" if it.skipped_frames else ""
            lines.append(f"  {it.modality} (row {it.row}): {it.placeholders} -> {it.after_vision} (vision) "
                         f"-> {it.after_compress} (LLM){skipped}")
        return "\n".join(lines)


@dataclass
class _Item:
    modality: str
    row: int
    slots: torch.Tensor            # [N0] placeholder indices in the row
    state: TokenState              # batch of one; pos: new-layout positions (_position_map; D cols, padded to 3)
    grid: tuple | None
    anchors: torch.Tensor | None = None   # [M] increasing indices into slots
    tail: int = 0                         # trailing tokens kept out of compression (EncodedItems.keep_tail)
    frames: object = None                 # zero-argument callable giving the item's frames (relevance scorers)
    extra_widths: tuple[int, ...] = ()    # channels of EncodedItems.extras appended to state.x
    skipped: list[int] | None = None      # EncodedItems.frame_skips[i].skipped


def prepare_inputs(adapter: FamilyAdapter, config: CompressionConfig, kwargs: dict, *,
                   question: str | list[str] | None = None,
                   relevance_frames=None) -> tuple[dict, CompressionReport]:
    """Turn processor outputs into compressed model inputs. Returns ``(new_kwargs, report)``.

    ``question`` (one str, or one per batch row) and ``relevance_frames`` (optional, one entry per
    image/video item: images in placeholder order, then videos; ``None`` entries fall back to
    ``adapter.item_frames``) feed ``config.relevance``; see :class:`CompressionConfig`."""
    ids = kwargs.get("input_ids")
    if ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError("vlmcompress needs input_ids next to the pixel inputs (to find the placeholder tokens); "
                         "inputs_embeds are not supported together with pixel inputs on a patched model")
    if kwargs.get("labels") is not None:
        raise ValueError("labels are not supported on a patched model: compression changes the sequence length")
    if relevance_frames is not None and not isinstance(relevance_frames, (list, tuple)):
        raise TypeError("relevance_frames must be a list with one entry (frames or None) per image/video, "
                        f"got {type(relevance_frames).__name__}")
    check_ids_and_mask(ids, kwargs.get("attention_mask"))
    _check_question(question, ids.shape[0])
    kwargs = dict(kwargs)
    batch, length = ids.shape
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    positions = adapter.original_positions(kwargs)            # [D, B, L] float64
    dims = positions.shape[0]
    visual = torch.zeros_like(mask, dtype=torch.bool)
    for modality in adapter.modalities(kwargs):
        visual |= ids == adapter.token_id(modality)
    mapped, offset = _position_map(positions, mask.bool(), visual & mask.bool(), config.v2pe_delta)

    items: list[_Item] = []
    encoded: dict[str, list[_Item]] = {}
    for modality in adapter.modalities(kwargs):
        enc = adapter.encode(modality, kwargs)
        token_id = adapter.token_id(modality)
        hits = (ids == token_id) & mask.bool()
        rows, cols = hits.nonzero(as_tuple=True)
        if rows.numel() != sum(enc.placeholders):
            raise ValueError(f"found {rows.numel()} {modality} placeholder tokens (id {token_id}) in input_ids "
                             f"but the {modality} inputs need {sum(enc.placeholders)}: pass input_ids exactly "
                             "as the processor returned them")
        start = 0
        encoded[modality] = []
        for i, count in enumerate(enc.placeholders):
            r, c = rows[start:start + count], cols[start:start + count]
            start += count
            if (r != r[0]).any():
                raise ValueError(f"{modality} {i} spans several batch rows; the processor output looks malformed")
            row = int(r[0])
            orig = positions[:, row, c].T                      # [N0, D]
            state = _initial_state(adapter, enc, i, orig)
            state = _to_new_layout(state, offset[row, c], dims, config.v2pe_delta)
            tail = int(enc.keep_tail[i]) if enc.keep_tail is not None else 0
            if tail and enc.states is not None and enc.states[i] is not None:
                raise ValueError(f"{modality} {i}: keep_tail together with a merging vision tower is not supported")
            state, widths = _append_extras(state, enc, i, modality)
            skips = getattr(enc, "frame_skips", None)
            item = _Item(modality, row, c, state, enc.grids[i], tail=tail, extra_widths=widths,
                         skipped=list(skips[i].skipped) if skips and skips[i] is not None else None,
                         frames=_frames_source(adapter, modality, kwargs, i, relevance_frames, len(items)))
            encoded[modality].append(item)
            items.append(item)

    if relevance_frames is not None and len(relevance_frames) != len(items):
        raise ValueError(f"relevance_frames has {len(relevance_frames)} entries but the inputs hold {len(items)} "
                         "images/videos: pass one entry (or None) per item, images first, then videos")

    report = CompressionReport()
    for item in items:
        before = item.state.num_tokens
        width = item.state.x.shape[-1] - sum(item.extra_widths)
        item.state = _compress_keeping_tail(item.state, item.tail, item.grid, config,
                                            _question_for(question, item.row),
                                            width if item.extra_widths else None, frames=item.frames)
        item.state = _order_by_first_source(item.state)
        item.anchors = _anchors(item.state).to(item.slots.device)   # features may live on another device
        report.items.append(ItemReport(item.modality, item.row, item.slots.numel(), before, item.state.num_tokens,
                                       grid=item.grid, source=_source_or_none(item.state),
                                       size=item.state.size[0].detach(), skipped_frames=item.skipped))

    keep = mask.bool().clone()
    for item in items:
        drop = torch.ones(item.slots.numel(), dtype=torch.bool, device=ids.device)
        drop[item.anchors] = False
        keep[item.row, item.slots[drop]] = False
    real = mask.bool()
    report.prefill_before = real.sum(1).tolist()
    report.prefill_after = keep.sum(1).tolist()

    moved = any(i.state.num_tokens != i.slots.numel() for i in items) or config.v2pe_delta != 1.0
    new_pos = _new_positions(mapped, items) if moved else None

    # Keep the caller's padding side; generation needs left padding, so that is the default.
    left = not (bool((mask[:, -1] == 0).any()) and bool(mask[:, 0].all()))
    new_len = max(report.prefill_after)
    sizes = torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
    for item in items:
        sizes[item.row, item.slots[item.anchors]] = item.state.size[0].float().to(ids.device)
    report.token_size = _pack(sizes, keep, new_len, 1.0, left)
    pad_id = _pad_value(ids, mask, adapter)
    out = {"input_ids": _pack(ids, keep, new_len, pad_id, left),
           "attention_mask": _pack(torch.ones_like(mask), keep, new_len, 0, left)}
    for key in adapter.token_keys:
        if kwargs.get(key) is not None:
            out[key] = _pack(kwargs[key], keep, new_len, 0, left)
    if new_pos is not None:
        packed = torch.stack([_pack(new_pos[d], keep, new_len, 0, left) for d in range(dims)])
        out.update(adapter.position_kwargs(packed, out["attention_mask"]))

    for modality, its in encoded.items():
        for key in adapter.pixel_keys.get(modality, ()):
            kwargs.pop(key, None)
        parts = [i.state.x[0].split([i.state.x.shape[-1] - sum(i.extra_widths), *i.extra_widths], -1) for i in its]
        feats = [p[0] for p in parts]
        kwargs["mm_encoder_outputs"] = dict(kwargs.get("mm_encoder_outputs") or {})
        if any(i.extra_widths for i in its):
            kwargs["mm_encoder_outputs"][modality] = adapter.encoder_output(
                modality, feats, kwargs, extras=[list(p[1:]) for p in parts])
        else:
            kwargs["mm_encoder_outputs"][modality] = adapter.encoder_output(modality, feats, kwargs)
    kwargs.update(out)
    return kwargs, report


def compress_item(state: TokenState, grid, config: CompressionConfig, *, question: str | None = None,
                  metric_channels: int | None = None, frames=None) -> TokenState:
    """Stage B for one item (``state`` holds a batch of one): ``config.stage_b_steps()`` applied in order
    (:func:`vlmcompress.steps.apply_steps`). With ``metric_channels``, similarity and relevance look only
    at the first ``metric_channels`` feature channels; the rest (``EncodedItems.extras``) ride along with
    the same weights. ``frames`` (the item's frames, or a zero-argument callable returning them) go to a
    relevance scorer that scores pixels (``score``)."""
    from vlmcompress.steps import StepContext, apply_steps

    steps = config.stage_b_steps()
    if not steps:
        return state
    ctx = StepContext(question=question, frames=_scorer_frames(frames), metric_channels=metric_channels)
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
                           metric_channels: int | None = None, frames=None) -> TokenState:
    """``compress_item`` on all but the last ``tail`` tokens, which are appended unchanged."""
    if not tail:
        return compress_item(state, grid, config, question=question, metric_channels=metric_channels,
                             frames=frames)
    n = state.num_tokens
    if not 0 < tail < n:
        raise ValueError(f"keep_tail must be in [0, {n}) for an item of {n} tokens, got {tail}")
    head = TokenState(state.x[:, :n - tail], state.size[:, :n - tail], state.pos[:, :n - tail],
                      torch.arange(n - tail, device=state.x.device).unsqueeze(0))
    head = compress_item(head, grid, config, question=question, metric_channels=metric_channels, frames=frames)
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


def _append_extras(state: TokenState, enc, i: int, modality: str) -> tuple[TokenState, tuple[int, ...]]:
    """Append item ``i``'s ``EncodedItems.extras`` to ``state.x`` as further channels, so every operator
    compresses them with the weights of the features (operators are linear in ``x``)."""
    extras = enc.extras[i] if enc.extras is not None else None
    if not extras:
        return state, ()
    # After a merging tower (Qwen3-VL stage A) the extras already hold the tower's M tokens: the same check.
    n = state.num_tokens
    for k, e in enumerate(extras):
        if e.ndim != 2 or e.shape[0] != n:
            raise ValueError(f"{modality} {i}: extras[{k}] must be [N={n}, C_k], got {tuple(e.shape)}")
    x = torch.cat([state.x, *(e.to(state.x.device, state.x.dtype).unsqueeze(0) for e in extras)], -1)
    return state.replace(x=x), tuple(int(e.shape[1]) for e in extras)


def _frames_source(adapter, modality, kwargs, index, relevance_frames, position):
    """A zero-argument callable giving item ``index``'s frames for the scorer: the caller's
    ``relevance_frames[position]`` when given, else ``adapter.item_frames`` (run only if a scorer asks)."""
    if relevance_frames is not None and position < len(relevance_frames) \
            and relevance_frames[position] is not None:
        given = relevance_frames[position]
        return lambda: given
    return lambda: adapter.item_frames(modality, kwargs, index)


def check_ids_and_mask(ids, mask) -> None:
    """Clear errors for inputs the processor would never return (before any model code sees them)."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.is_complex():
        raise TypeError("input_ids must be an integer tensor [batch, length] as the processor returns it (return_tensors='pt'), "
                        f"got {type(ids).__name__} {getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {tuple(ids.shape)}, got "
                         f"{type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")


def _check_question(question, batch: int) -> None:
    if question is None or isinstance(question, str):
        return
    if not isinstance(question, (list, tuple)) or len(question) != batch \
            or not all(q is None or isinstance(q, str) for q in question):
        raise TypeError(f"question must be a str or a list of {batch} str (one per batch row), got {question!r}")


def _question_for(question, row):
    if question is None or isinstance(question, str):
        return question
    return question[row]


def _initial_state(adapter, enc, i, orig) -> TokenState:
    feats = enc.features[i].unsqueeze(0)
    pad = torch.zeros(orig.shape[0], 3 - orig.shape[1], dtype=torch.float64, device=orig.device)
    tower = enc.states[i] if enc.states is not None else None
    if tower is None:
        n = feats.shape[1]
        if n != orig.shape[0]:
            raise ValueError(f"item {i} has {n} features for {orig.shape[0]} placeholders and no merge record")
        pos = torch.cat([orig.to(torch.float64), pad], 1) if orig.shape[1] < 3 else orig.to(torch.float64)
        size = torch.ones(1, n, dtype=torch.float32, device=feats.device)
        source = torch.arange(n, device=feats.device).unsqueeze(0)
        return TokenState(feats, size, pos.unsqueeze(0).to(feats.device), source)
    absolute = adapter.grid_to_positions(orig, tower.pos[0], enc.grids[i])      # [M, D]
    pad = torch.zeros(absolute.shape[0], 3 - absolute.shape[1], dtype=torch.float64, device=absolute.device)
    pos = torch.cat([absolute, pad], 1) if absolute.shape[1] < 3 else absolute
    return TokenState(feats, tower.size.to(torch.float32), pos.unsqueeze(0).to(feats.device), tower.source)


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


def _new_positions(mapped: torch.Tensor, items: list[_Item]) -> torch.Tensor:
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


def _source_or_none(state: TokenState):
    return None if state.source is None else state.source[0].detach()
