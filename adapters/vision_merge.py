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

Only the layers up to the selected hidden state merge (``feature_layer``, LLaVA's -2), so the
selected hidden state and every later one have the same length, and :attr:`VisionMerge.states`
describes exactly the tokens the VLM reads. The token count is known before running:
:func:`tower_tokens_after`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vlmcompress.attention import combine_masks, size_log_bias
from vlmcompress.merge import MergePlan, bipartite_soft_matching
from vlmcompress.schedule import kept_count, merge_schedule, tokens_after
from vlmcompress.state import TokenState

__all__ = ["VisionMerge", "install_vision_merge", "merging_layers", "tower_schedule", "tower_tokens_after"]

# Attention implementations that take an additive float mask (the proportional-attention bias).
# FlashAttention takes only padding masks and flex attention a BlockMask.
_BIAS_IMPLEMENTATIONS = (None, "eager", "sdpa")


# --- schedule, in closed form ------------------------------------------------------------------

def merging_layers(num_layers: int, feature_layer: int | list[int] | tuple[int, ...] = -1) -> int:
    """How many encoder layers merge: those whose output is, or comes before, the selected hidden state.

    ``hidden_states`` has ``num_layers + 1`` entries (entry 0 is the embedding output); the earliest
    selected index ``s`` (negative indices count from the end, as in ``hidden_states[i]``) is the
    output of layer ``s - 1``, so layers ``0 .. s-1`` merge and later layers keep the length.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers must be an int >= 0, got {num_layers!r}")
    layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise TypeError(f"feature_layer must be an int or a non-empty list of ints, got {feature_layer!r}")
    count = num_layers + 1
    for i in layers:
        if not -count <= i < count:
            raise ValueError(f"feature_layer {i} is out of range for {count} hidden states ({num_layers} layers)")
    return min(i % count for i in layers)


def tower_schedule(num_tokens: int, num_layers: int, config, *, protected: int = 0) -> list[int]:
    """Tokens removed in each of ``num_layers`` merging layers, from ``num_tokens`` (prefix included).

    ``config.vision_keep`` is the fraction of the ``num_tokens - protected`` patch tokens that
    survive: the target is ``protected + ceil(vision_keep · patches)``. A layer can at most halve its
    mergeable tokens, so a target below what ``num_layers`` halvings reach is raised to that floor.
    ``config.vision_ramp = 0`` spreads the removal evenly (:func:`vlmcompress.schedule.merge_schedule`
    with ``target=``); ``ramp > 0`` weights layer ``i`` by ``1 + ramp - 2·ramp·i/(L-1)`` (ToMe's
    decreasing schedule: more merging early), rounded so the total is exact, each value clamped to
    what the matching can remove with any shortfall carried to the next layer.
    """
    patches = num_tokens - protected
    if patches < 0:
        raise ValueError(f"protected={protected} exceeds num_tokens={num_tokens}")
    target = protected + kept_count(config.vision_keep, patches)
    floor = num_tokens
    for _ in range(num_layers):
        floor -= (floor - protected) // 2
    target = min(num_tokens, max(target, floor))
    ramp = float(config.vision_ramp)
    if ramp == 0.0 or num_layers < 2:
        return merge_schedule(num_tokens, num_layers, target=target, protected=protected)
    weights = [1.0 + ramp - 2.0 * ramp * i / (num_layers - 1) for i in range(num_layers)]
    total, remove = sum(weights), num_tokens - target
    out, n, done, cum, carry = [], num_tokens, 0, 0.0, 0
    for w in weights:
        cum += w
        want = round(remove * cum / total) - done
        done += want
        r = min(want + carry, (n - protected) // 2)
        carry = want + carry - r
        out.append(r)
        n -= r
    return out


def tower_tokens_after(num_patches: int, num_layers: int, config, *, protected: int = 0,
                       feature_layer: int | list[int] = -1) -> int:
    """Patch tokens (prefix excluded) in the selected hidden state of a merging tower.

    Args:
        num_patches: patch tokens entering the tower (576 for CLIP-L/14 at 336 px).
        num_layers: encoder layers of the tower (``config.num_hidden_layers``).
        config: a :class:`vlmcompress.CompressionConfig` (``vision_keep``, ``vision_ramp``).
        protected: leading non-patch tokens that never merge (1 for a CLS token).
        feature_layer: the hidden-state index the VLM reads (LLaVA: -2).
    """
    layers = merging_layers(num_layers, feature_layer)
    schedule = tower_schedule(num_patches + protected, layers, config, protected=protected)
    return tokens_after(num_patches + protected, schedule, protected) - protected


# --- the three layer types ---------------------------------------------------------------------

def _pre_norm_forward(layer, merge: "VisionMerge", index: int, hidden_states, attention_mask=None, **kwargs):
    """CLIPEncoderLayer / SiglipEncoderLayer.forward, with the merge step after attention."""
    merge._enter(index, hidden_states)
    residual = hidden_states
    hidden_states = layer.layer_norm1(hidden_states)
    hidden_states, _ = layer.self_attn(
        hidden_states=hidden_states,
        attention_mask=merge._attention_mask(attention_mask, hidden_states.dtype),
        **kwargs,
    )
    hidden_states = residual + hidden_states
    hidden_states = merge._merge(index, hidden_states)
    residual = hidden_states
    hidden_states = layer.layer_norm2(hidden_states)
    hidden_states = layer.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return merge._after_layer(index, hidden_states)


def _internvl_forward(layer, merge: "VisionMerge", index: int, hidden_states):
    """InternVLVisionLayer.forward (layer scale, norm before and after attention), with the merge step."""
    merge._enter(index, hidden_states)
    mask = merge._attention_mask(None, hidden_states.dtype)
    extra = {} if mask is None else {"attention_mask": mask}
    attention_output, _ = layer.attention(layer.layernorm_before(hidden_states), **extra)
    attention_output = layer.lambda_1 * attention_output
    hidden_states = attention_output + hidden_states
    hidden_states = merge._merge(index, hidden_states)
    layer_output = layer.layernorm_after(hidden_states)
    layer_output = layer.mlp(layer_output)
    layer_output = layer.dropout(layer_output)
    if layer.lambda_2 is not None:
        layer_output = layer.lambda_2 * layer_output
    layer_output = layer_output + hidden_states
    return merge._after_layer(index, layer_output)


@dataclass(frozen=True)
class _TowerKind:
    name: str
    layer_class: type
    forward: Callable
    keys: Callable[[nn.Module], nn.Module]      # the module whose output are the attention keys
    heads: Callable[[nn.Module], int]
    patch_conv: Callable[[nn.Module], nn.Module]


@functools.lru_cache(maxsize=1)
def _tower_kinds() -> tuple[_TowerKind, ...]:
    # Imported here so that importing vlmcompress does not import transformers' model code.
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.internvl.modeling_internvl import InternVLVisionLayer
    from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer

    return (
        _TowerKind("clip", CLIPEncoderLayer, _pre_norm_forward, lambda l: l.self_attn.k_proj,
                   lambda l: l.self_attn.num_heads, lambda t: t.embeddings.patch_embedding),
        _TowerKind("siglip", SiglipEncoderLayer, _pre_norm_forward, lambda l: l.self_attn.k_proj,
                   lambda l: l.self_attn.num_heads, lambda t: t.embeddings.patch_embedding),
        # InternVL normalises the keys (k_norm, Identity when qk-norm is off) before attention: those are the keys.
        _TowerKind("internvl", InternVLVisionLayer, _internvl_forward, lambda l: l.attention.k_norm,
                   lambda l: l.attention.num_heads, lambda t: t.embeddings.patch_embeddings.projection),
    )


def _find_layers(tower: nn.Module) -> tuple[nn.Module, nn.ModuleList, _TowerKind]:
    for root in (tower, getattr(tower, "vision_model", None)):
        encoder = getattr(root, "encoder", None) if root is not None else None
        layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            for kind in _tower_kinds():
                if all(type(layer) is kind.layer_class for layer in layers):
                    return root, layers, kind
    supported = ", ".join(k.layer_class.__name__ for k in _tower_kinds())
    raise TypeError(f"vision merging supports towers made of {supported} layers (CLIPVisionModel, SiglipVisionModel, "
                    f"InternVLVisionModel); got {type(tower).__name__}")


# --- the handle --------------------------------------------------------------------------------

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
        self._patched: list[tuple[nn.Module, str, object]] = []
        self._hooks = []
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    # --- install / remove --------------------------------------------------------------------
    def _install(self) -> None:
        conv = self.kind.patch_conv(self.root)
        self._hooks.append(conv.register_forward_hook(self._record_grid))
        for index, layer in enumerate(self.layers):
            self._hooks.append(self.kind.keys(layer).register_forward_hook(self._record_keys))
            # accelerate (device_map=...) keeps the real forward in `_old_forward` behind its own
            # instance forward that moves the inputs; wrap that one so the device hooks keep working.
            name = "_old_forward" if "_hf_hook" in layer.__dict__ and "_old_forward" in layer.__dict__ else "forward"
            if name == "forward" and "forward" in layer.__dict__:
                raise RuntimeError(f"layer {index} of the vision tower already has an instance forward "
                                   "(patched by another tool); vision merging cannot wrap it")
            previous = layer.__dict__.get(name)
            setattr(layer, name, functools.partial(self.kind.forward, layer, self, index))
            self._patched.append((layer, name, previous))

    def remove(self) -> None:
        """Undo everything :meth:`install_vision_merge` attached (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for layer, name, previous in reversed(self._patched):
            if previous is None:
                layer.__dict__.pop(name, None)
            else:
                setattr(layer, name, previous)
        self._patched.clear()
        self._state = self._selected = self._keys = None

    @property
    def installed(self) -> bool:
        return bool(self._patched)

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

    def _attention_mask(self, mask, dtype):
        # Before the first merge every size is 1: leave the mask alone, so nothing changes bit-wise.
        if self._bias is None or not self.config.proportional_attention:
            return mask
        return combine_masks(self._bias.to(dtype), mask)

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
        self._state = plan.merge(self._state.replace(x=hidden))
        self._bias = size_log_bias(self._state.size)      # once per merge, reused by the later layers
        return self._state.x

    def _after_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if index + 1 != self._stop:
            return hidden
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
