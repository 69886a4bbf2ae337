"""The family-independent route from processor outputs to a shorter prefill.

1. encode every image/video with the family's own encoder (adapter),
2. compress each item (temporal merging, prompt-guided pooling or merging to a budget),
3. keep, for every compressed token, the placeholder slot of its first source (its *anchor*) and
   drop the other placeholders, so ``input_ids``, ``attention_mask`` and per-token ids shrink together,
4. place every compressed token at the centroid of its sources' original positions, with V2PE's δ,
5. hand the features to the model as ``mm_encoder_outputs``: its own code scatters them and its
   own ``generate()`` loop does the rest (cache, sampling, stopping).

One job per file: this one walks the inputs (steps 1 and 5); :mod:`.stage_b` compresses an item and
finds its anchors (2, 3), :mod:`.packing` places and packs the tokens (3, 4), :mod:`.report` holds
what a call did. The names of those modules used elsewhere are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmcompress.config import CompressionConfig
from vlmcompress.state import TokenState

from .base import FamilyAdapter
from .packing import _new_positions, _pack, _pad_value, _position_map, _to_new_layout
from .report import CompressionReport, ItemReport
from .stage_b import _anchors, _compress_keeping_tail, _order_by_first_source, _source_or_none, compress_item

__all__ = ["prepare_inputs", "compress_item", "check_ids_and_mask", "CompressionReport", "ItemReport"]


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
    token_frames: int | None = None       # EncodedItems.token_frames[i]


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
            state, widths = _append_extras(state, enc, i, modality)
            skips = getattr(enc, "frame_skips", None)
            blocks = getattr(enc, "token_frames", None)
            item = _Item(modality, row, c, state, enc.grids[i], tail=tail, extra_widths=widths,
                         skipped=list(skips[i].skipped) if skips and skips[i] is not None else None,
                         token_frames=blocks[i] if blocks else None,
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
                                            width if item.extra_widths else None, frames=item.frames,
                                            token_frames=item.token_frames)
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
