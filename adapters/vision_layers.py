"""Stage A, the layer side: merging forwards of the encoder layers vlmcompress knows (CLIP, SigLIP,
InternVL), each a re-statement of the installed layer's forward with the merge step after attention,
and how to find a tower's layers. The state they act on is the :class:`adapters.vision_merge.VisionMerge`
handle passed in (``merge``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from .vision_merge import VisionMerge


# --- the three layer types ---------------------------------------------------------------------

def _pre_norm_forward(layer, merge: "VisionMerge", index: int, hidden_states, attention_mask=None, **kwargs):
    """CLIPEncoderLayer / SiglipEncoderLayer.forward, with the merge step after attention."""
    merge._enter(index, hidden_states)
    if merge.unread(index):
        return hidden_states
    residual = hidden_states
    hidden_states = layer.layer_norm1(hidden_states)
    hidden_states, _ = layer.self_attn(
        hidden_states=hidden_states,
        attention_mask=merge._attention_mask(attention_mask, hidden_states.dtype, hidden_states.device),
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
    if merge.unread(index):
        return hidden_states
    mask = merge._attention_mask(None, hidden_states.dtype, hidden_states.device)
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
