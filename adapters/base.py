"""What an adapter must tell the shared pipeline about one model family.

An adapter is thin: it knows where the placeholder tokens, the vision encoder entry points and the
position function of its family live. Everything else (finding the items, compressing them,
shrinking the sequence, positions, padding) is the family-independent pipeline in ``pipeline.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmcompress.state import TokenState


@dataclass
class EncodedItems:
    """The visual items of one modality, in placeholder order.

    Attributes:
        features: one ``[N_i, C]`` tensor per image/video, as the projector produced them.
        grids: ``(T, H, W)`` LLM-token grid of each item when its features are a plain raster grid,
            else ``None`` (e.g. LLaVA-NeXT's any-res tiles with row-end tokens).
        placeholders: how many placeholder tokens each item has in ``input_ids`` (equals
            ``N_i`` unless the vision tower already merged tokens).
        states: optional per-item ``TokenState`` from a merging vision tower (stage A), whose ``pos``
            is in patch-grid coordinates; ``None`` when the tower did not merge.
        keep_tail: optional per-item count of trailing feature rows that must reach the LLM unchanged
            (LLaVA-OneVision's one ``image_newline`` token after each video). They are left out of
            compression, and ``grids[i]`` then describes the first ``N_i - keep_tail[i]`` rows.
        extras: optional, per item, further per-token tensors ``[N_i, C_k]`` that must be compressed
            with exactly the weights of ``features`` (Qwen3-VL's DeepStack features). Similarity and
            relevance look at ``features`` only; the compressed extras reach ``encoder_output(...,
            extras=)`` as one list of ``[M_i, C_k]`` tensors per item.
        frame_skips: optional, per item, the :class:`vlmcompress.frame_skip.FrameSelection` of an item
            whose near-duplicate frames were skipped before the tower (``None``: not skipped); the
            report lists them (``ItemReport.skipped_frames``).
        token_frames: optional, per item whose ``grids[i]`` is ``None``, ``T`` when its features are still
            ``T`` consecutive equal blocks, one per frame (Qwen-VL after merging inside the tower: each
            temporal patch keeps the same number of merged units), so temporal merging can follow where
            pooling cannot; ``None`` otherwise.
    """

    features: list[torch.Tensor]
    grids: list[tuple[int, int, int] | None]
    placeholders: list[int]
    states: list[TokenState | None] | None = None
    keep_tail: list[int] | None = None
    extras: list[list[torch.Tensor]] | None = None
    frame_skips: list | None = None
    token_frames: list[int | None] | None = None


class FamilyAdapter:
    """Base class: one subclass per model family, registered by ``config.model_type``.

    Subclasses set ``model_types``, ``pixel_keys`` and implement ``encode``; families with their own
    position scheme (M-RoPE) override ``original_positions`` and ``position_kwargs``.
    """

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: Per modality, the keyword arguments that carry pixels and their metadata; the pipeline
    #: consumes them (they are replaced by ``mm_encoder_outputs``).
    pixel_keys: dict[str, tuple[str, ...]] = {}
    #: Per modality, the ``generate``/``forward`` keyword that must be present to trigger encoding.
    trigger_keys: dict[str, str] = {"image": "pixel_values", "video": "pixel_values_videos"}
    #: Per-token keyword arguments that must shrink and pad together with ``input_ids``.
    token_keys: tuple[str, ...] = ("token_type_ids",)
    #: Which stages this family supports: used for the support matrix and for clear errors.
    supports_vision_merge: bool = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    # --- where things live -------------------------------------------------------------------
    @property
    def base(self) -> torch.nn.Module:
        """The ``...Model`` under the ``...ForConditionalGeneration`` head."""
        return self.model.model

    @property
    def language_model(self) -> torch.nn.Module:
        """The LLM (a Llama/Qwen-style ``...Model``) whose attention reads the visual tokens."""
        return self.base.language_model

    def token_id(self, modality: str) -> int | None:
        """The placeholder token of ``modality`` (``image_token_id`` / ``video_token_id`` of the config)."""
        return getattr(self.model.config, f"{modality}_token_id", None)

    def pad_token_id(self) -> int:
        for cfg in (self.model.config, getattr(self.model.config, "text_config", None)):
            value = getattr(cfg, "pad_token_id", None) if cfg is not None else None
            if value is not None:
                return int(value)
        return 0

    def modalities(self, kwargs: dict) -> list[str]:
        return [m for m, key in self.trigger_keys.items() if kwargs.get(key) is not None]

    # --- family-specific ---------------------------------------------------------------------
    def encode(self, modality: str, kwargs: dict) -> EncodedItems:
        """Run the vision encoder and projector for ``modality`` with the family's own code."""
        raise NotImplementedError

    def item_frames(self, modality: str, kwargs: dict, index: int) -> torch.Tensor | None:
        """The pixels of item ``index`` of ``modality`` as the vision tower saw them, for relevance scorers
        that look at frames (``ClipRelevanceScorer``); ``None`` when the family cannot recover them.

        Returns ``[T, 3, H, W]`` float32 in ``[0, 1]`` (the processor's resize kept, its normalisation
        undone with the processor given to ``patch(..., processor=)``). The default reads an image from
        ``pixel_values [N, 3, H, W]`` and a video from ``pixel_values_videos [B, T, 3, H, W]``; families
        with tiles or flattened patches override it.
        """
        from .frames import denormalise, pixel_processor

        pixels = kwargs.get(self.trigger_keys.get(modality, ""))
        if not isinstance(pixels, torch.Tensor):
            return None
        if modality == "image" and pixels.ndim == 4:
            frames = pixels[index:index + 1]
        elif modality == "video" and pixels.ndim == 5:
            frames = pixels[index]
        else:
            return None
        return denormalise(frames, pixel_processor(self.processor, modality), what=f"{modality} {index}")

    @property
    def processor(self):
        """The processor given to ``patch(model, config, processor=...)``, or ``None``."""
        handle = self.model.__dict__.get("vlmcompress")
        return getattr(handle, "processor", None)

    def encoder_output(self, modality: str, features: list[torch.Tensor], kwargs: dict):
        """Wrap the compressed ``[M_i, C]`` features of ``modality`` the way the model's ``forward`` reads
        ``mm_encoder_outputs[modality]``. The default is a list of per-item tensors in ``pooler_output``.

        Adapters whose ``encode`` returns ``EncodedItems.extras`` also receive ``extras=`` (per item, the
        compressed extras); the pipeline passes that keyword only then."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=features)

    def original_positions(self, kwargs: dict) -> torch.Tensor:
        """``[D, B, L]`` float64 positions of the *uncompressed* sequence, as the model computes them.

        The default is the 1-D rule of Llama-style LLMs and of ``generate()``: ``cumsum(mask) - 1``.
        """
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        if mask is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        else:
            pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        return pos.to(torch.float64).unsqueeze(0)

    def grid_to_positions(self, item_positions: torch.Tensor, grid_pos: torch.Tensor, grid) -> torch.Tensor:
        """Map stage-A patch-grid coordinates ``[M, 3]`` to absolute positions ``[M, D]``.

        ``item_positions [N0, D]`` are the original positions of the item's placeholders (raster order).
        The default is the 1-D raster map, exact because positions are affine in the raster index.
        """
        t, h, w = grid
        raster = grid_pos[:, 0] * h * w + grid_pos[:, 1] * w + grid_pos[:, 2]
        return item_positions[:1].to(torch.float64) + raster.to(torch.float64).unsqueeze(-1)

    def position_kwargs(self, positions: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """What to pass to the model for new positions ``[D, B, L']`` (float64)."""
        return {"position_ids": positions[0].to(torch.float32)}

    def install(self, config) -> None:
        """Attach stage-A hooks (vision-tower merging). Families without stage A refuse it."""
        if config.compresses_vision and not self.supports_vision_merge:
            raise ValueError(
                f"vision_keep < 1 (merging inside the vision tower) is not supported for "
                f"{type(self.model).__name__}; use keep_ratio / token_budget (after the projector) instead")

    def uninstall(self) -> None:
        """Remove everything ``install`` attached."""

    def configure(self, config) -> None:
        """Called when the config changes on a patched model."""
        self.uninstall()
        self.install(config)
