"""Stage A for the Qwen-VL towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ToMe merging of 2×2 merger units.

Why these towers need their own merging (``vision_merge.py`` serves CLIP/SigLIP/InternVL):

- The tower packs all images/frames of a call into one sequence split by ``cu_seqlens`` (one segment
  per temporal patch), and its final merger concatenates the ``m×m`` neighbouring patches of each
  *unit* (``m = spatial_merge_size``, 2). So the unit is what merges here: a unit's ``m²`` patches
  move together (patch ``(i, j)`` of the merged unit is the size-weighted average of patch ``(i, j)``
  of its members), and the merger still sees whole units.
- Matching is per attention segment: per frame (Qwen2/3-VL), per window (Qwen2.5-VL, whose windows
  lie inside frames, so a unit never leaves its window nor its frame). After every merge the window
  and frame boundaries (``cu_seqlens``) are recomputed from the per-segment counts.
- 2-D rotary positions are taken at the merged unit's centroid: patch ``(i, j)`` of a unit at
  centroid ``(h', w')`` sits at ``(m·h' + i, m·w' + j)`` (float), through the tower's own rotary
  module (its ``forward`` multiplies float positions; at integer centroids it is the model's table).
- Proportional attention: after the first merge, attention is computed here (SDPA per segment length,
  ``log(size)`` of each key as an additive bias); before it, the blocks' own attention runs, so a
  tower that merges nothing is bit-exact.
- Qwen3-VL's DeepStack taps (hidden states after some layers, each through its own merger) ride along
  with the later merges as extra channels, so every tap has exactly the final units, in their order.

Nothing is patched on the model: :class:`QwenVisionMerge` runs the tower's submodules in the tower's
order (``forward`` of transformers 5.24) and the adapter calls it instead of ``get_*_features``.
The token counts are known before running: :func:`qwen_tokens_after`.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmcompress.merge import MergePlan, bipartite_soft_matching
from vlmcompress.schedule import tokens_after
from vlmcompress.state import TokenState

__all__ = ["QwenTowerOutput", "QwenVisionMerge", "qwen_segments", "qwen_tokens_after"]

# Tower classes whose forward this module reproduces (transformers 5.24).
_TOWERS = ("Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",
           "Qwen3VLVisionModel", "Qwen3VLMoeVisionModel")


# --- segments and counts, in closed form -----------------------------------------------------

def _window_counts(h: int, w: int, window: int) -> list[int]:
    """Units per attention window of one ``h×w``-unit frame, in the tower's window order (row-major
    windows of ``window×window`` units; edge windows are cut, empty ones do not exist)."""
    counts = []
    for i in range(0, h, window):
        for j in range(0, w, window):
            counts.append(min(window, h - i) * min(window, w - j))
    return counts


def qwen_segments(grid_thw, vision_config) -> list[list[tuple[int, int]]]:
    """The merge segments of every item, in the tower's packed order.

    Args:
        grid_thw: ``[num_items, 3]`` (tensor or nested list) patch grid ``(t, h, w)`` of each image/video.
        vision_config: the tower's config (``spatial_merge_size``; Qwen2.5-VL's ``window_size``,
            ``patch_size`` and ``fullatt_block_indexes``).

    Returns:
        Per item, a list of ``(frame, units)``: a segment of ``units`` merger units inside temporal
        patch ``frame`` of that item. One segment per frame, or one per window for windowed towers.
    """
    m = int(vision_config.spatial_merge_size)
    window = _window_units(vision_config)
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else [list(r) for r in grid_thw]
    out = []
    for t, h, w in rows:
        hu, wu = int(h) // m, int(w) // m
        per_frame = _window_counts(hu, wu, window) if window else [hu * wu]
        out.append([(f, c) for f in range(int(t)) for c in per_frame])
    return out


def _window_units(vision_config) -> int | None:
    """Window side in merger units for Qwen2.5-VL (``window_size // merge // patch``), else ``None``."""
    if getattr(vision_config, "fullatt_block_indexes", None) is None or not getattr(vision_config, "window_size", 0):
        return None
    m = int(vision_config.spatial_merge_size)
    return int(vision_config.window_size) // m // int(vision_config.patch_size)


@functools.lru_cache(maxsize=4096)
def _segment_schedule(units: int, layers: int, vision_keep: float, vision_ramp: float) -> tuple[int, ...]:
    from .vision_merge import tower_schedule

    cfg = _Keep(vision_keep, vision_ramp)
    return tuple(tower_schedule(units, layers, cfg))


@dataclass(frozen=True)
class _Keep:
    vision_keep: float
    vision_ramp: float


def qwen_tokens_after(grid_thw, vision_config, config) -> list[int]:
    """LLM tokens each item has after stage A (closed form, before running anything).

    Every segment of ``n`` units follows :func:`adapters.vision_merge.tower_schedule` over all
    ``vision_config.depth`` layers: ``ceil(vision_keep · n)`` units, raised to what ``depth`` halvings
    can reach. The tokens of an item are the sum over its segments.
    """
    depth = int(vision_config.depth)
    counts = []
    for segments in qwen_segments(grid_thw, vision_config):
        total = 0
        for _, n in segments:
            total += tokens_after(n, list(_segment_schedule(n, depth, float(config.vision_keep),
                                                            float(config.vision_ramp))))
        counts.append(total)
    return counts


# --- the run ----------------------------------------------------------------------------------

@dataclass
class QwenTowerOutput:
    """What one merging tower run returns, per item in ``grid_thw`` order.

    Attributes:
        features: per item ``[M_i, C_out]`` merger outputs, ordered by the first original unit each holds.
        deepstack: per DeepStack layer, per item ``[M_i, C_out]`` (empty list for towers without taps).
        states: per item a batch-of-one :class:`TokenState`: ``x`` the features ``[1, M_i, C_out]``,
            ``size [1, M_i]`` float32 (units = LLM tokens each stands for; sums to ``T·H'·W'``),
            ``pos [1, M_i, 3]`` float64 ``(t, h', w')`` centroid in the item's LLM-token grid,
            ``source [1, T·H'·W']`` the token holding each original unit (raster order).
        schedule: per item, per segment, the units removed in each layer.
    """

    features: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]]
    states: list[TokenState]
    schedule: list[list[tuple[int, ...]]]


class QwenVisionMerge:
    """ToMe merging of merger units in a Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision tower.

    Call it as the tower: ``handle(pixel_values, grid_thw)`` with the processor's flattened patches
    ``[P, C·t·p·p]`` and ``grid_thw [num_items, 3]``. Holds no hook on the model; dropping it undoes it.
    """

    def __init__(self, tower: nn.Module, config) -> None:
        name = type(tower).__name__
        if name not in _TOWERS:
            raise TypeError(f"Qwen-VL vision merging supports the towers {', '.join(_TOWERS)}; got {name}")
        if not config.compresses_vision:
            # Nothing to do at keep 1: the adapter should not install stage A at all, but a handle at keep 1
            # runs the tower's own operations (bit for bit), which is what the identity test checks.
            pass
        self.tower = tower
        self.config = config
        self.vision_config = tower.config
        self.merge = int(tower.spatial_merge_size)
        self.unit = self.merge * self.merge
        self.windowed = _window_units(self.vision_config) is not None
        self.full_layers = set(getattr(tower, "fullatt_block_indexes", None) or [])
        self.taps = list(getattr(tower, "deepstack_visual_indexes", None) or [])
        module = sys.modules[type(tower).__module__]
        self._rotate = module.apply_rotary_pos_emb_vision    # the tower's own rotary application
        # unit offsets (i, j) of the m² patches of a unit, in the processor's block order (i-major)
        ii, jj = torch.meshgrid(torch.arange(self.merge), torch.arange(self.merge), indexing="ij")
        self._offsets = torch.stack([ii.flatten(), jj.flatten()], -1).float()

    def tokens_after(self, grid_thw) -> list[int]:
        """Closed-form LLM tokens per item: :func:`qwen_tokens_after` for this tower and config."""
        return qwen_tokens_after(grid_thw, self.vision_config, self.config)

    # --- the forward -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> QwenTowerOutput:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import (get_vision_attention_seqlens, get_vision_position_ids,
                                               get_vision_window_index)

        tower, vcfg, m, unit = self.tower, self.vision_config, self.merge, self.unit
        if not isinstance(grid_thw, torch.Tensor) or grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must be a [num_items, 3] tensor, got {getattr(grid_thw, 'shape', grid_thw)}")
        # --- as the tower's forward, up to the blocks
        position_ids = get_vision_position_ids(grid_thw, m)
        cu_frames, max_frames = get_vision_attention_seqlens(grid_thw, vcfg)
        hidden = tower.patch_embed(pixel_values.type(tower.dtype))
        if hasattr(tower, "pos_embed"):      # Qwen3-VL: learned table interpolated to each grid
            from transformers.vision_utils import get_vision_interpolation_indices_and_weights

            idx, wts = get_vision_interpolation_indices_and_weights(
                grid_thw, num_grid_per_side=tower.num_grid_per_side, mode=tower.interpolation_mode,
                align_corners=tower.interpolation_align_corners, spatial_merge_size=vcfg.spatial_merge_size)
            hidden = hidden + (tower.pos_embed(idx) * wts[:, :, None]).sum(1).to(hidden.dtype)
        rotary = tower.rotary_pos_emb(hidden, position_ids)
        units0 = hidden.shape[0] // unit
        if self.windowed:
            window_index, cu_windows = get_vision_window_index(grid_thw, m, tower.window_size, tower.patch_size)
            max_windows = get_max_seqlen(cu_windows, vcfg, kwargs={}, kwarg_name="max_window_seqlen")
            hidden = tower.permute_input_for_window_attn(hidden, window_index, seq_len=hidden.shape[0])
            rotary = tuple(tower.permute_input_for_window_attn(f, window_index, seq_len=f.shape[0]) for f in rotary)
        else:
            window_index = torch.arange(units0, device=hidden.device)
            cu_windows, max_windows = cu_frames, max_frames

        # --- the unit record, in packed order
        segments = qwen_segments(grid_thw, vcfg)
        seg_n0 = [n for item in segments for _, n in item]
        seg_frame, frame = [], 0                       # packed frame id of each segment
        for item in segments:
            for k, (f, _) in enumerate(item):
                if k and f != item[k - 1][0]:
                    frame += 1
                seg_frame.append(frame)
            frame += 1
        depth = len(tower.blocks)
        keep, ramp = float(self.config.vision_keep), float(self.config.vision_ramp)
        schedules = [_segment_schedule(n, depth, keep, ramp) for n in seg_n0]
        counts = torch.tensor(seg_n0)
        if int(counts.sum()) != units0:
            raise RuntimeError(f"the tower's segments hold {int(counts.sum())} units but the input has {units0}; "
                               "this transformers version lays Qwen-VL patches out differently")
        pos = self._unit_positions(grid_thw, position_ids, hidden.device)[window_index]   # [U, 3] float64
        size = torch.ones(units0, dtype=torch.float32, device=hidden.device)
        # source: original (raster, item after item) unit -> packed unit
        source = torch.argsort(window_index).unsqueeze(0)
        taps: list[torch.Tensor] = []
        merged = False
        bias = None

        for index, block in enumerate(tower.blocks):
            full = (not self.windowed) or index in self.full_layers
            rs = [s[index] for s in schedules]
            want_keys = any(rs)
            normed = block.norm1(hidden)
            if not merged:
                cu = cu_frames if full else cu_windows
                keys = {}
                handle = block.attn.qkv.register_forward_hook(
                    lambda mod, args, out: keys.__setitem__("qkv", out)) if want_keys else None
                try:
                    attn = block.attn(normed, cu_seqlens=cu, position_embeddings=rotary,
                                      max_seqlen=max_frames if full else max_windows)
                finally:
                    if handle is not None:
                        handle.remove()
                qkv = keys.get("qkv")
            else:
                lengths = self._frame_lengths(counts, seg_frame) if full else counts
                attn, qkv = self._attention(block.attn, normed, (lengths * unit).tolist(), rotary, bias)
            hidden = hidden + attn
            if want_keys:
                if qkv is None:
                    raise RuntimeError("the attention keys were not captured: the tower's attention no longer "
                                       "calls its qkv projection as a module")
                heads = block.attn.num_heads
                metric = qkv.reshape(hidden.shape[0], 3, heads, -1)[:, 1].float().mean(1)   # [P, hd]
                metric = metric.reshape(-1, unit * metric.shape[-1])                      # [U, m²·hd]
                plan, counts = self._plan(metric, counts, rs)
                width = hidden.shape[-1]
                x = torch.cat([hidden.reshape(-1, unit * width), *(t.reshape(-1, unit * width) for t in taps)], -1)
                state = plan.merge(TokenState(x.unsqueeze(0), size.unsqueeze(0), pos.unsqueeze(0), source))
                size, pos, source = state.size[0], state.pos[0], state.source
                parts = state.x[0].split(unit * width, -1)
                hidden = parts[0].reshape(-1, width)
                taps = [p.reshape(-1, width) for p in parts[1:]]
                merged = True
                bias = size.log().repeat_interleave(unit) if self.config.proportional_attention else None
                if index + 1 < depth:      # the next layer's attention rotates at the new centroids
                    rotary = tower.rotary_pos_emb(hidden, self.patch_positions(pos))
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in self.taps:
                taps.append(hidden)

        features = tower.merger(hidden)
        deep = [tower.deepstack_merger_list[k](t) for k, t in enumerate(taps)]
        return self._per_item(grid_thw, features, deep, size, pos, source, segments, schedules)

    # --- pieces --------------------------------------------------------------------------------
    def patch_positions(self, unit_pos: torch.Tensor) -> torch.Tensor:
        """Rotary positions ``[U·m², 2]`` float32 ``(h, w)`` of the patches of units at ``unit_pos [U, 3]``
        ``(t, h', w')``: patch ``(i, j)`` of a unit sits at ``(m·h' + i, m·w' + j)``, the centroid of the
        members' patch ``(i, j)``. At integer ``unit_pos`` these are the tower's own position ids."""
        offsets = self._offsets.to(unit_pos.device)
        return (unit_pos[:, None, 1:].float() * self.merge + offsets).reshape(-1, 2)

    def unit_positions(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """``[U0, 3]`` float64 ``(t, h', w')`` of every unit of ``grid_thw``, raster order, item after item."""
        from transformers.vision_utils import get_vision_position_ids

        return self._unit_positions(grid_thw, get_vision_position_ids(grid_thw, self.merge), grid_thw.device)

    def _unit_positions(self, grid_thw, position_ids, device) -> torch.Tensor:
        """``[U0, 3]`` float64 ``(t, h', w')`` of every unit in raster order, item after item."""
        m, unit = self.merge, self.unit
        first = position_ids[::unit].to(torch.float64) / m               # first patch of each unit
        t = torch.cat([torch.arange(int(g[0])).repeat_interleave(int(g[1] * g[2]) // unit) for g in grid_thw.tolist()])
        return torch.cat([t.to(torch.float64).unsqueeze(-1), first], -1).to(device)

    @staticmethod
    def _frame_lengths(counts: torch.Tensor, seg_frame: list[int]) -> torch.Tensor:
        """Units per frame (full-attention segment) from the units per window."""
        ids = torch.tensor(seg_frame)
        return torch.zeros(int(ids.max()) + 1, dtype=counts.dtype).index_add_(0, ids, counts)

    def _attention(self, attn: nn.Module, x: torch.Tensor, lengths: list[int], rotary, bias):
        """The block's attention over segments of ``lengths`` patches, with ``bias [P]`` (log size) on
        every key; segments of equal length run as one SDPA batch. Returns ``(output [P, C], qkv)``."""
        n = x.shape[0]
        qkv = attn.qkv(x)
        q, k, v = qkv.reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = rotary
        q, k = self._rotate(q, k, cos, sin)
        out = torch.empty_like(q)
        starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
        by_length: dict[int, list[int]] = {}
        for s, length in zip(starts.tolist(), lengths):
            by_length.setdefault(length, []).append(s)
        for length, firsts in by_length.items():
            idx = (torch.tensor(firsts)[:, None] + torch.arange(length)).to(x.device)      # [S, L]
            qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))                       # [S, H, L, d]
            mask = None if bias is None else bias[idx][:, None, None, :].to(qs.dtype)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=attn.scaling)
            out[idx] = o.transpose(1, 2)
        return attn.proj(out.reshape(n, -1)), qkv

    def _plan(self, metric: torch.Tensor, counts: torch.Tensor, rs: list[int]) -> tuple[MergePlan, torch.Tensor]:
        """One plan over all units: bipartite matching inside every segment (segments of equal length and
        equal ``r`` as one batch). Returns the plan ``[1, U]`` and the new units per segment."""
        new_counts = counts - torch.tensor(rs)
        starts = torch.cat([torch.zeros(1, dtype=counts.dtype), counts.cumsum(0)[:-1]])
        new_starts = torch.cat([torch.zeros(1, dtype=counts.dtype), new_counts.cumsum(0)[:-1]])
        dst = torch.empty(metric.shape[0], dtype=torch.int64, device=metric.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for s, (n, r) in enumerate(zip(counts.tolist(), rs)):
            groups.setdefault((n, r), []).append(s)
        for (n, r), segs in groups.items():
            seg = torch.tensor(segs)
            idx = (starts[seg][:, None] + torch.arange(n)).to(metric.device)                 # [S, n]
            local = bipartite_soft_matching(metric[idx], r).dst if r else \
                torch.arange(n, device=metric.device).expand(len(segs), n)
            dst[idx.flatten()] = (new_starts[seg].to(metric.device)[:, None] + local).flatten()
        return MergePlan(dst=dst.unsqueeze(0), num_out=int(new_counts.sum())), new_counts

    def _per_item(self, grid_thw, features, deep, size, pos, source, segments, schedules) -> QwenTowerOutput:
        """Order the units by the first original unit each holds (raster order when nothing merged: the
        tower's own output order) and split them per item."""
        src = source[0]
        n0, u = src.numel(), features.shape[0]
        first = torch.full((u,), n0, dtype=torch.int64, device=src.device)
        first = first.scatter_reduce(0, src, torch.arange(n0, device=src.device), reduce="amin")
        order = first.argsort()
        rank = torch.empty_like(order)
        rank[order] = torch.arange(u, device=order.device)
        features, size, pos, src = features[order], size[order], pos[order], rank[src]
        deep = [d[order] for d in deep]
        originals = [int(g[0] * g[1] * g[2]) // self.unit for g in grid_thw.tolist()]
        bounds = torch.tensor([0] + originals).cumsum(0)
        cuts = torch.searchsorted(first[order].cpu(), bounds).tolist()
        feats, states, per_deep, per_sched = [], [], [[] for _ in deep], []
        k = 0
        for i, count in enumerate(originals):
            a, b = cuts[i], cuts[i + 1]
            x = features[a:b]
            feats.append(x)
            for d, layer in zip(per_deep, deep):
                d.append(layer[a:b])
            item_source = src[int(bounds[i]):int(bounds[i + 1])] - a
            states.append(TokenState(x.unsqueeze(0), size[a:b].unsqueeze(0), pos[a:b].unsqueeze(0),
                                     item_source.unsqueeze(0)))
            per_sched.append(list(schedules[k:k + len(segments[i])]))
            k += len(segments[i])
        return QwenTowerOutput(feats, per_deep, states, per_sched)
