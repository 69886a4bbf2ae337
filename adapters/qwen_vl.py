"""Qwen2-VL (``qwen2_vl``), Qwen2.5-VL (``qwen2_5_vl``) and Qwen3-VL (``qwen3_vl``, ``qwen3_vl_moe``).

What the three share (transformers 5.x):

- Vision tower + 2×2 patch merger; ``get_image_features`` / ``get_video_features`` return one
  ``[T·H'·W', C]`` tensor per image/video (``H' = H / merge``), rows in raster ``(t, h', w')`` order:
  the processor lays the patches out merge-window by merge-window and the model's own
  ``get_rope_index`` gives placeholder ``k`` of an item the (t, h', w') of raster index ``k``.
- M-RoPE: 3-D positions from ``model.model.get_rope_index(input_ids, mm_token_type_ids, grids...,
  attention_mask)``; ``forward`` also accepts ``position_ids`` of shape ``[4, B, L]`` (row 0 the text
  positions the causal mask is built from, rows 1–3 t/h/w). ``generate()`` continues a given
  ``position_ids`` by ``last + 1`` per step, and manual decoding uses ``model.model.rope_deltas``; we set
  both, so KV-cache decoding continues after the shorter prefill.
- ``mm_token_type_ids`` (0 text, 1 image, 2 video) shrinks with ``input_ids``.

Where they differ:

- Qwen2.5-VL spaces video frames in t by ``tokens_per_second · second_per_grid_ts`` (kept as given: the
  positions come from the model's own ``get_rope_index``).
- Qwen3-VL writes every temporal patch group of a video as its own ``<t seconds><|vision_start|>`` …
  ``<|vision_end|>`` run, so one video's placeholders span several runs; and its tower returns
  DeepStack features (per token, added to the LLM hidden states after the first layers), which are
  compressed with exactly the weights of the main features (``EncodedItems.extras``).

Stage A (``vision_keep < 1``) merges 2×2 merger units inside the tower (``qwen_vision_merge.py``); the
features then hold fewer tokens than the placeholders, with a merge record (size, centroid in the
LLM-token grid, source) per item, and stage B merges (no grid) rather than pools.
"""
from __future__ import annotations

import inspect

import torch

from .base import EncodedItems, FamilyAdapter
from .registry import register

# Inputs of get_rope_index that travel in the processor outputs.
_ROPE_KEYS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")


@register
class QwenVLAdapter(FamilyAdapter):
    """Qwen2-VL and Qwen2.5-VL. The grids and ``second_per_grid_ts`` stay in the kwargs (only the pixels
    are consumed): the model needs them to compute its own positions when nothing is compressed."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    pixel_keys = {"image": ("pixel_values",), "video": ("pixel_values_videos",)}
    trigger_keys = {"image": "pixel_values", "video": "pixel_values_videos"}
    token_keys = ("token_type_ids", "mm_token_type_ids")
    supports_vision_merge = True

    _grid_key = {"image": "image_grid_thw", "video": "video_grid_thw"}

    # --- stage A -----------------------------------------------------------------------------
    def install(self, config) -> None:
        super().install(config)
        from vlmcompress.frame_skip import FrameSkip
        from vlmcompress.steps import PromptGuidedPool

        self._vision = None
        self._pending_grids = []     # full LLM-token grids of the items of the last encode with a merge record
        steps = config.stage_b_steps()
        # A FrameSkip first in the steps runs here, before the tower (later ones run as stage-B plans).
        self._skip = steps[0] if steps and isinstance(steps[0], FrameSkip) else None
        self.frame_skips = []        # per video of the last call: its FrameSelection (kept / skipped temporal patches)
        # Relevance-guided pooling needs the token grid, which merged units no longer form: then the merged
        # units are spread back over the units they hold after the tower (tower-only, as LLaVA-OneVision).
        self._spread = any(isinstance(s, PromptGuidedPool) and s.relevance is not None for s in steps)
        if config.compresses_vision:
            from .qwen_vision_merge import QwenVisionMerge

            self._vision = QwenVisionMerge(self.base.visual, config)

    def uninstall(self) -> None:
        self._vision = None
        super().uninstall()

    def _pixels_and_grid(self, modality: str, kwargs: dict):
        """The item pixels and their ``*_grid_thw`` from the processor outputs (both are needed)."""
        grid_thw = kwargs.get(self._grid_key[modality])
        if grid_thw is None:
            raise ValueError(f"{type(self.model).__name__} needs {self._grid_key[modality]} next to "
                             f"{self.trigger_keys[modality]}: pass the processor outputs unchanged")
        return kwargs[self.trigger_keys[modality]], grid_thw

    def _encode_merged(self, modality: str, kwargs: dict) -> EncodedItems:
        """Stage A: the merging run of the tower. The merged units are the LLM's tokens, with their merge
        record (the grids queued for ``grid_to_positions``) and per item its temporal patches
        (``EncodedItems.token_frames``: every temporal patch keeps the same number of merged units, frame
        after frame). When relevance-guided pooling follows (``self._spread``) they are spread back over the
        token grid instead: every unit gets the features of the merged token that holds it, so pooling sees
        the grid and the tower still ran on fewer tokens."""
        pixels, grid_thw = self._pixels_and_grid(modality, kwargs)
        out = self._vision(pixels, grid_thw)
        # DeepStack taps already hold the final units (they merged along inside the tower).
        extras = [[layer[i] for layer in out.deepstack] for i in range(len(out.features))] if out.deepstack else None
        if self._spread:
            rows = [s.source[0].to(f.device) for f, s in zip(out.features, out.states)]
            feats = [f[r] for f, r in zip(out.features, rows)]
            extras = [[e[r] for e in item] for item, r in zip(extras, rows)] if extras else None
            return EncodedItems(feats, self.token_grids(grid_thw), [f.shape[0] for f in feats], extras=extras)
        self._pending_grids = list(self.token_grids(grid_thw))
        blocks = [int(t) if f.shape[0] % int(t) == 0 else None for f, (t, _, _) in zip(out.features, grid_thw.tolist())]
        return EncodedItems(out.features, [None] * len(out.features), [s.source.shape[1] for s in out.states],
                            out.states, extras=extras, token_frames=blocks)

    def grid_to_positions(self, item_positions, grid_pos, grid):
        """Merge-record centroids ``(t, h', w')`` ``[M, 3]`` (in the item's full LLM-token grid) to M-RoPE
        positions ``[M, 3]``, interpolating the item's own positions (trilinear).

        Inside a frame the model's positions are affine in ``(h', w')``, so a centroid of units merged in
        the tower (whole ``t``) gets exactly the centroid of their positions, and integer centroids get the
        model's own. A fractional ``t`` (frames skipped into a kept one) is interpolated between the two
        neighbouring frames: the centroid for Qwen2-VL (positions affine in ``t``), close to it for
        Qwen2.5-VL (its ``t`` positions are truncated to ints) and Qwen3-VL (one text-separated run per frame).
        """
        if getattr(self, "_pending_grids", None):
            grid = self._pending_grids.pop(0)
        if grid is None:
            raise RuntimeError("grid_to_positions: no grid known for this item; this is a bug in vlmcompress")
        frames, h, w = grid
        p = item_positions.to(torch.float64)
        gp = grid_pos.to(torch.float64)
        axes = []
        for value, n in ((gp[:, 0], frames), (gp[:, 1], h), (gp[:, 2], w)):
            v = value.clamp(0, n - 1)
            lo = v.floor().long()
            axes.append((lo, (lo + 1).clamp(max=n - 1), (v - lo).unsqueeze(-1)))
        out = torch.zeros(gp.shape[0], p.shape[1], dtype=torch.float64, device=p.device)
        for it, ft in ((0, lambda f: 1 - f), (1, lambda f: f)):
            for ih, fh in ((0, lambda f: 1 - f), (1, lambda f: f)):
                for iw, fw in ((0, lambda f: 1 - f), (1, lambda f: f)):
                    weight = ft(axes[0][2]) * fh(axes[1][2]) * fw(axes[2][2])
                    index = (axes[0][it] * h + axes[1][ih]) * w + axes[2][iw]
                    out += weight * p[index]
        return out

    # --- encoding ----------------------------------------------------------------------------
    def _features(self, modality: str, kwargs: dict):
        pixels, grid_thw = self._pixels_and_grid(modality, kwargs)
        fn = self.base.get_image_features if modality == "image" else self.base.get_video_features
        return fn(pixels, grid_thw, return_dict=True), grid_thw

    def _encode_skipping(self, modality: str, kwargs: dict) -> EncodedItems:
        """Frame skipping before the tower: per video, the temporal patches ``self._skip`` keeps are
        encoded (with stage A when installed); the skipped ones count as merged into their kept patch
        (:func:`vlmcompress.frame_skip.skipped_state`)."""
        from vlmcompress.frame_skip import patch_proxy, skipped_state

        key, grid_key = self.trigger_keys[modality], self._grid_key[modality]
        pixels, grid_thw = kwargs[key], kwargs.get(grid_key)
        if grid_thw is None:
            raise ValueError(f"{type(self.model).__name__} needs {grid_key} next to {key}: pass the processor outputs unchanged")
        selections, rows, kept_grid, start = [], [], [], 0
        for t, h, w in grid_thw.tolist():
            item = pixels[start:start + t * h * w]
            start += t * h * w
            selection = self._skip.select(patch_proxy(item, (t, h, w)))
            selections.append(selection)
            rows += [item[k * h * w:(k + 1) * h * w] for k in selection.kept]
            kept_grid.append([len(selection.kept), h, w])
        sub = dict(kwargs)
        sub[key] = torch.cat(rows)
        sub[grid_key] = torch.tensor(kept_grid, dtype=grid_thw.dtype, device=grid_thw.device)
        enc = self._encode(modality, sub)
        full = self.token_grids(grid_thw)
        states = []
        for i, selection in enumerate(selections):
            kept_source = enc.states[i].source[0] if enc.states is not None else None
            states.append(skipped_state(enc.features[i], selection, full[i], kept_source))
        self.frame_skips = selections
        self._pending_grids = list(full)
        grids = [None] * len(full) if enc.states is not None else \
            [(len(s.kept), g[1], g[2]) for s, g in zip(selections, full)]
        return EncodedItems(enc.features, grids, [t * h * w for t, h, w in full], states, extras=enc.extras,
                            frame_skips=selections, token_frames=enc.token_frames)

    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if modality == "video" and getattr(self, "_skip", None) is not None:
            return self._encode_skipping(modality, kwargs)
        return self._encode(modality, kwargs)

    def _encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if getattr(self, "_vision", None) is not None:
            return self._encode_merged(modality, kwargs)
        out, grid_thw = self._features(modality, kwargs)
        feats, grids = self._checked(modality, out, grid_thw)
        return EncodedItems(feats, grids, [f.shape[0] for f in feats])

    def item_frames(self, modality: str, kwargs: dict, index: int):
        """Frames rebuilt from the flattened patches (``frames.qwen_frames``): an image as one frame, a
        video with all its frames (its last frame repeated if the processor padded the count to a
        multiple of the temporal patch)."""
        from .frames import denormalise, pixel_processor, qwen_frames

        pixels = kwargs.get(self.trigger_keys[modality])
        grid_thw = kwargs.get(self._grid_key[modality])
        if not isinstance(pixels, torch.Tensor) or grid_thw is None:
            return None
        counts = grid_thw.prod(-1).tolist()
        start = sum(counts[:index])
        vision = self.model.config.vision_config
        frames = qwen_frames(pixels[start:start + counts[index]], grid_thw[index].tolist(),
                             patch_size=int(vision.patch_size), merge_size=int(vision.spatial_merge_size),
                             temporal_patch_size=int(vision.temporal_patch_size))
        if modality == "image":
            frames = frames[:1]   # the other temporal_patch_size - 1 frames are copies
        return denormalise(frames, pixel_processor(self.processor, modality), what=f"{modality} {index}")

    def _checked(self, modality: str, out, grid_thw):
        feats = list(out.pooler_output)
        grids = self.token_grids(grid_thw)
        for f, g in zip(feats, grids):
            if f.shape[0] != g[0] * g[1] * g[2]:
                raise RuntimeError(f"{modality} features have {f.shape[0]} rows for the token grid {g}; "
                                   "this transformers version lays Qwen-VL features out differently")
        return feats, grids

    def token_grids(self, grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
        """LLM-token grid ``(T, H/merge, W/merge)`` of every row of ``image_grid_thw`` / ``video_grid_thw``."""
        m = int(self.model.config.vision_config.spatial_merge_size)
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in grid_thw.tolist()]

    # --- positions ---------------------------------------------------------------------------
    def original_positions(self, kwargs: dict) -> torch.Tensor:
        """``[3, B, L]`` float64 M-RoPE positions from the installed ``get_rope_index``."""
        if kwargs.get("mm_token_type_ids") is None:
            raise ValueError(f"{type(self.model).__name__} needs mm_token_type_ids (returned by the processor "
                             "next to input_ids) to compute its 3-D positions; pass the processor outputs unchanged")
        fn = self.base.get_rope_index
        accepted = inspect.signature(fn).parameters
        # No silent filtering (issue 9, defect 8): a renamed argument must fail loudly, not drop out.
        # second_per_grid_ts alone is optional: only Qwen2.5-VL's get_rope_index takes it (Qwen2-VL has
        # no frame timing, Qwen3-VL writes timestamps as text).
        missing = [k for k in _ROPE_KEYS if k != "second_per_grid_ts" and k not in accepted]
        if missing:
            raise RuntimeError(f"{type(self.base).__name__}.get_rope_index takes {list(accepted)}, not {missing}: this "
                               "transformers version changed it; see vlmcompress.adapters.compat for the tested range")
        args = {k: kwargs[k] for k in _ROPE_KEYS if k in accepted and kwargs.get(k) is not None}
        positions, _ = fn(kwargs["input_ids"], **args)
        return positions.to(torch.float64)

    def position_kwargs(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """``position_ids [4, B, L']``: row 0 the text positions of the shorter sequence (what ``generate``
        would build from the mask), rows 1–3 the new t/h/w. Also sets ``model.model.rope_deltas``
        (``max position + 1 - real tokens`` per row, as ``get_rope_index`` defines it) for manual decoding."""
        real = attention_mask.bool()
        text = (attention_mask.long().cumsum(-1) - 1).masked_fill(~real, 0).to(torch.float64)
        top = positions.masked_fill(~real.unsqueeze(0), float("-inf")).amax(dim=(0, 2))
        deltas = (top + 1 - real.sum(-1)).unsqueeze(1)
        if bool((deltas == deltas.round()).all()):
            deltas = deltas.long()
        else:
            deltas = deltas.to(torch.float32)
        self.base.rope_deltas = deltas
        return {"position_ids": torch.cat([text.unsqueeze(0), positions]).to(torch.float32)}


@register
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: as Qwen2-VL, plus DeepStack features that are compressed alongside."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def _encode(self, modality: str, kwargs: dict) -> EncodedItems:
        if getattr(self, "_vision", None) is not None:
            return self._encode_merged(modality, kwargs)
        out, grid_thw = self._features(modality, kwargs)
        feats, grids = self._checked(modality, out, grid_thw)
        layers = out.deepstack_features or []
        # deepstack_features: one entry per DeepStack layer, each a tuple of per-item [N_i, C] tensors.
        extras = [[layer[i] for layer in layers] for i in range(len(feats))] if layers else None
        return EncodedItems(feats, grids, [f.shape[0] for f in feats], extras=extras)

    def encoder_output(self, modality: str, features: list[torch.Tensor], kwargs: dict, extras=None):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        layers = len(extras[0]) if extras else 0
        deepstack = [tuple(item[k] for item in extras) for k in range(layers)]
        return BaseModelOutputWithDeepstackFeatures(pooler_output=tuple(features), deepstack_features=deepstack)
