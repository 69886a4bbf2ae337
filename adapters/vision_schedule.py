"""Stage A in closed form: which tower layers merge and how many tokens each removes, known before
anything runs (the budget planner and ``tower_tokens_after`` need it). Pure arithmetic, no model.

Public names (also importable from :mod:`adapters.vision_merge`, where they used to live):
``merging_layers``, ``tower_schedule``, ``tower_tokens_after``.
"""
from __future__ import annotations

from vlmcompress.schedule import kept_count, merge_schedule, tokens_after

__all__ = ["merging_layers", "tower_schedule", "tower_tokens_after"]


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
    # The library's one ramp (vlmcompress.schedule.ramp_weights), shared with merge_schedule(r=, ramp=).
    return merge_schedule(num_tokens, num_layers, target=target, ramp=float(config.vision_ramp), protected=protected)


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
