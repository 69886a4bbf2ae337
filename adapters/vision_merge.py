"""Stage A: ToMe token merging inside a Hugging Face vision tower (CLIP, SigLIP, InternVL ViT).

In every encoder layer up to the hidden state the VLM reads, the tokens are merged between the
attention (+ residual) and the MLP, as ToMe does: the metric is the layer's attention keys averaged
over heads, the plan is :func:`vlmcompress.merge.bipartite_soft_matching`, and every later attention
adds ``log(size)`` of each key to its logits (proportional attention) through the additive float
mask that eager attention and SDPA both take (DESIGN.md §3.1).

How the tower is changed, and undone (per instance, nothing at class level):

- each encoder layer gets an instance ``forward``: a short forward of our own that calls the layer's
  own submodules in the original order (a merge step cannot sit between a layer's attention and its
  MLP any other way, because the MLP residual is a local variable of the original forward). With
  nothing merged it runs exactly the original operations, so ``vision_keep = 1`` is bit-exact;
- a forward hook on each layer's key projection hands the keys to the merge step (no attention
  weights are needed, so SDPA keeps working);
- a forward hook on the patch convolution records the patch grid of the current batch.

``handle.remove()`` deletes exactly these. The merge record of the current forward (size, position in
the patch grid, source map) lives on the handle, not in a global.

Only the layers up to the selected hidden state merge (``feature_layer``, LLaVA's -2), and the
layers after it do not run at all (nothing reads them; each later hidden state repeats the selected
one), so :attr:`VisionMerge.states` describes exactly the tokens the VLM reads. The token count is known before running:
:func:`tower_tokens_after`.

One job per file: this one is the handle (install, per-forward state, remove); the closed-form
schedule is in :mod:`.vision_schedule` and the layer forwards in :mod:`.vision_layers`. The schedule's
public names stay importable from here (``merging_layers``, ``tower_schedule``, ``tower_tokens_after``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from vlmcompress.attention import combine_masks, size_log_bias
from vlmcompress.merge import MergePlan, bipartite_soft_matching
from vlmcompress.state import TokenState

from .hooks import Attachments
from .vision_layers import _find_layers
from .vision_schedule import merging_layers, tower_schedule, tower_tokens_after

__all__ = ["VisionMerge", "install_vision_merge", "merging_layers", "tower_schedule", "tower_tokens_after"]

# Attention implementations that take an additive float mask (the proportional-attention bias).
# FlashAttention takes only padding masks and flex attention a BlockMask.
_BIAS_IMPLEMENTATIONS = (None, "eager", "sdpa")


class VisionMerge:
    """ToMe merging installed on one vision tower; returned by :func:`install_vision_merge`.

    Attributes:
        feature_layer: the hidden-state index the VLM reads (may be changed between forwards).
        schedule: tokens removed per merging layer in the last forward.
        grid: ``(T=1, H, W)`` patch grid of the last forward.
    """

    def __init__(self, tower: nn.Module, config, *, protected: int, feature_layer=-1,
                 unmerge_output: bool = False) -> None:
        if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
            raise ValueError(f"protected must be an int >= 0 (1 for a CLS token), got {protected!r}")
        self.root, self.layers, self.kind = _find_layers(tower)
        self.tower = tower
        self.config = config
        self.protected = protected
        self.feature_layer = feature_layer
        self.unmerge_output = bool(unmerge_output)
        merging_layers(len(self.layers), feature_layer)           # validate now, not mid-forward
        self._check_attention()
        self.schedule: list[int] = []
        self.grid: tuple[int, int, int] | None = None
        self._state: TokenState | None = None       # merge record of the tokens in flight
        self._selected: TokenState | None = None    # ... of the selected hidden state
        self._bias: torch.Tensor | None = None      # log(size) key bias [B,1,1,N] fp32; None while all sizes are 1
        self._keys: torch.Tensor | None = None
        self._stop = 0
        self._attached = Attachments()   # hooks and layer forwards; bound methods / partials (deepcopy-safe)
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    # --- install / remove --------------------------------------------------------------------
    def _install(self) -> None:
        conv = self.kind.patch_conv(self.root)
        self._attached.hook(conv, self._record_grid)
        for index, layer in enumerate(self.layers):
            self._attached.hook(self.kind.keys(layer), self._record_keys)
            # accelerate (device_map=...) keeps the real forward in `_old_forward` behind its own
            # instance forward that moves the inputs; wrap that one so the device hooks keep working.
            name = "_old_forward" if "_hf_hook" in layer.__dict__ and "_old_forward" in layer.__dict__ else "forward"
            if name == "forward" and "forward" in layer.__dict__:
                raise RuntimeError(f"layer {index} of the vision tower already has an instance forward "
                                   "(patched by another tool); vision merging cannot wrap it")
            self._attached.set_attr(layer, name, functools.partial(self.kind.forward, layer, self, index))

    def remove(self) -> None:
        """Undo everything :meth:`install_vision_merge` attached (idempotent)."""
        self._attached.remove()
        self._state = self._selected = self._keys = None

    @property
    def installed(self) -> bool:
        return bool(self._attached)

    # --- results -----------------------------------------------------------------------------
    @property
    def state(self) -> TokenState | None:
        """Merge record of the selected hidden state of the last forward, batched, prefix included.

        ``x`` is that hidden state ``[B, M, C]``; ``size [B, M]`` float32; ``pos [B, M, 3]`` in patch-grid
        coordinates ``(0, h, w)`` (a prefix token ``i`` sits at ``(0, 0, i - protected)``); ``source
        [B, N0]`` maps every input token (prefix included) to the token that holds it.
        """
        return self._selected

    @property
    def states(self) -> list[TokenState] | None:
        """Per image, the record of the selected hidden state's *patch* tokens (prefix dropped).

        Each is a batch of one: ``size [1, M]``, ``pos [1, M, 3]`` patch-grid ``(0, h, w)``,
        ``source [1, P]`` mapping the ``P`` patches to ``[0, M)``, ``x`` the hidden state rows. This is
        what a family adapter puts in ``EncodedItems.states`` when its features drop the prefix.
        """
        return self.item_states(drop_prefix=True)

    def item_states(self, *, drop_prefix: bool) -> list[TokenState] | None:
        s = self._selected
        if s is None:
            return None
        p = self.protected if drop_prefix else 0
        out = []
        for b in range(s.batch):
            source = s.source[b:b + 1, p:] - p
            out.append(TokenState(x=s.x[b:b + 1, p:], size=s.size[b:b + 1, p:], pos=s.pos[b:b + 1, p:],
                                  source=source))
        return out

    # --- inside the forward ------------------------------------------------------------------
    def _check_attention(self) -> None:
        impl = getattr(getattr(self.root, "config", None), "_attn_implementation", None)
        if self.config.proportional_attention and impl not in _BIAS_IMPLEMENTATIONS:
            raise ValueError(
                f"proportional attention needs an additive attention mask, which the vision tower's "
                f"attn_implementation={impl!r} does not take; use 'sdpa' or 'eager' for the vision tower, or "
                "CompressionConfig(proportional_attention=False)")

    def _record_grid(self, module, args, output) -> None:
        # Conv output [B, C, H', W']: the patch grid of this batch.
        self.grid = (1, int(output.shape[-2]), int(output.shape[-1]))

    def _record_keys(self, module, args, output) -> None:
        self._keys = output

    def _enter(self, index: int, hidden: torch.Tensor) -> None:
        """Layer 0 starts a tower forward: fresh record and this forward's schedule."""
        if index:
            return
        self._check_attention()
        n = hidden.shape[1]
        grid = self.grid
        if grid is None or grid[1] * grid[2] != n - self.protected:
            # Not silent (issue 9, defect 8): a flat grid places merged tokens on a line, not at their
            # 2-D centroids, so stage C positions of this tower's tokens are only raster indices.
            if not getattr(self, "_warned_grid", False):
                self._warned_grid = True
                import warnings

                warnings.warn(f"vlmcompress stage A: the patch grid of this forward ({grid}) does not hold the "
                              f"{n - self.protected} patch tokens the tower runs on; merged tokens get 1-D "
                              "(raster) positions (1, 1, N). Report this with the model name.", stacklevel=2)
            grid = (1, 1, n - self.protected)
        self.grid = grid
        state = TokenState.from_features(hidden, grid, prefix=self.protected, track_source=True)
        self._state = state.replace(size=state.size.float())
        self._bias = None
        self._stop = merging_layers(len(self.layers), self.feature_layer)
        self.schedule = tower_schedule(n, self._stop, self.config, protected=self.protected)
        self._selected = self._state if self._stop == 0 else None

    def unread(self, index: int) -> bool:
        """Layer ``index`` comes after the hidden state the VLM reads (LLaVA's -2 skips the last layer).

        Such a layer is not run when this forward merges: its output is never read, and under
        ``unmerge_output`` it would run at the full, spread-back length. Its hidden state repeats the
        selected one (``last_hidden_state`` too), so only ``hidden_states[feature_layer]`` is meaningful.
        A forward that merges nothing (``vision_keep=1``) runs every layer, bit for bit the original.
        """
        return index >= self._stop and any(self.schedule)

    def _attention_mask(self, mask, dtype, device=None):
        # Before the first merge every size is 1: leave the mask alone, so nothing changes bit-wise.
        if self._bias is None or not self.config.proportional_attention:
            return mask
        # A tower split over devices (device_map): the bias follows the layer, not layer 0 (defect 9).
        device = mask.device if mask is not None else device
        return combine_masks(self._bias.to(dtype=dtype, device=device), mask)

    def _merge(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        keys, self._keys = self._keys, None
        r = self.schedule[index] if index < len(self.schedule) else 0
        if r == 0:
            return hidden
        if keys is None:
            raise RuntimeError(f"layer {index}: the attention keys were not captured; the tower's attention "
                               "no longer calls its key projection as a module")
        b, n, _ = hidden.shape
        metric = keys.reshape(b, n, self.kind.heads(self.layers[index]), -1).mean(2)
        plan = _first_member_order(bipartite_soft_matching(metric, r, protected=self.protected))
        state = self._state
        if state.x.device != hidden.device:      # device_map: this layer lives on another device
            state = TokenState(hidden, state.size.to(hidden.device), state.pos.to(hidden.device),
                               None if state.source is None else state.source.to(hidden.device))
        self._state = plan.merge(state.replace(x=hidden))
        self._bias = size_log_bias(self._state.size)      # once per merge, reused by the later layers
        return self._state.x

    def _after_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if index + 1 != self._stop:
            return hidden
        state = self._state
        if state.size.device != hidden.device:
            state = TokenState(hidden, state.size.to(hidden.device), state.pos.to(hidden.device),
                               None if state.source is None else state.source.to(hidden.device))
            self._state = state
        self._selected = self._state.replace(x=hidden)
        if self.unmerge_output and self._bias is not None:
            # Spread the merged tokens back over their patches: later layers and the VLM see the
            # original length (attention over duplicates equals proportional attention).
            hidden = hidden.gather(1, self._state.source.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            full = TokenState.from_features(hidden, self.grid, prefix=self.protected, track_source=True)
            self._state = self._selected = full.replace(size=full.size.float())
            self._bias = None
        return hidden


def _first_member_order(plan: MergePlan) -> MergePlan:
    """The same merge with output slots ordered by the first input token of each group.

    Tokens in flight are kept ordered by the first original patch they hold (their *anchor*; raster
    order before any merge, CLS first), so each VLM feature maps to an increasing placeholder slot.
    Bipartite matching numbers slots by the surviving B token, which can come after an A token it
    absorbed; this relabelling fixes that, at no cost to the ViT (attention is order-free).
    """
    if plan.is_identity:
        return plan
    b, n = plan.dst.shape
    arange = torch.arange(n, device=plan.dst.device).expand(b, n)
    first = torch.full((b, plan.num_out), n, device=plan.dst.device, dtype=torch.int64)
    first = first.scatter_reduce(1, plan.dst, arange, reduce="amin")
    order = first.argsort(1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(plan.num_out, device=order.device).expand_as(order))
    return MergePlan(dst=rank.gather(1, plan.dst), num_out=plan.num_out)


def install_vision_merge(vision_tower: nn.Module, config, *, protected: int, feature_layer=-1,
                         unmerge_output: bool = False) -> VisionMerge:
    """Make ``vision_tower`` merge tokens (ToMe) per ``config``; ``handle.remove()`` undoes it.

    Args:
        vision_tower: a ``CLIPVisionModel``, ``SiglipVisionModel`` or ``InternVLVisionModel`` (or a
            module holding one as ``.vision_model``).
        config: a :class:`vlmcompress.CompressionConfig`: ``vision_keep``, ``vision_ramp``,
            ``proportional_attention``.
        protected: leading tokens that never merge: 1 for CLIP and InternVL (CLS), 0 for SigLIP.
        feature_layer: hidden-state index (or indices) the VLM reads; layers after it do not merge.
        unmerge_output: spread the selected hidden state back to the original length (each patch gets
            its token's value). For families whose code needs the full patch grid after the tower
            (LLaVA-NeXT/OneVision tile packing and pooling, InternVL's pixel shuffle): the ViT still
            runs on fewer tokens, the LLM sees the usual count.

    Returns:
        A :class:`VisionMerge` handle: ``.state`` / ``.states`` / ``.schedule`` after each forward.
    """
    handle = VisionMerge(vision_tower, config, protected=protected, feature_layer=feature_layer,
                         unmerge_output=unmerge_output)
    return handle


class TowerOnlyMerge:
    """Mixin: stage A for families whose code needs the full patch grid after the vision tower
    (LLaVA-NeXT/OneVision tile packing and pooling, InternVL's pixel shuffle).

    The tower merges per ``config.vision_keep`` and runs its layers on fewer tokens; the hidden state
    the VLM reads is spread back to every patch, so the family's own code and the LLM see the usual
    count. The saving is vision-tower compute; stage B reduces what the LLM reads.
    """

    supports_vision_merge = True
    #: leading tokens of the tower's sequence that never merge (1 for a CLS token, 0 for SigLIP).
    vision_protected = 1

    def install(self, config) -> None:
        super().install(config)
        self._vision = None
        if config.compresses_vision:
            layer = getattr(self.model.config, "vision_feature_layer", -1)
            self._vision = install_vision_merge(self.base.vision_tower, config, protected=self.vision_protected,
                                                feature_layer=layer, unmerge_output=True)

    def uninstall(self) -> None:
        if getattr(self, "_vision", None) is not None:
            self._vision.remove()
            self._vision = None
        super().uninstall()
