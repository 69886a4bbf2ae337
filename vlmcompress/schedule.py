"""Per-layer merge schedules for ToMe, and their token counts in closed form.

The budget planner must know how many tokens reach the LLM before anything runs (DESIGN.md §3.1),
so every schedule here is a plain list of per-layer ``r`` already clamped to what
:func:`vlmcompress.merge.bipartite_soft_matching` can remove at that layer: applying the list in order
removes exactly ``sum(schedule)`` tokens, and :func:`tokens_after` says where it ends.
"""
from __future__ import annotations

import math

from ._checks import check_int

__all__ = ["merge_schedule", "tokens_after", "ramp_weights", "kept_count"]


def kept_count(ratio: float, count: int) -> int:
    """``ceil(ratio · count)``, at least 1: how many of ``count`` tokens a kept ratio keeps.

    The product is rounded to 9 decimals first: ``0.07 * 100 == 7.000000000000001`` in float, whose plain
    ceil would keep 8 tokens.
    """
    return max(1, math.ceil(round(ratio * count, 9)))


def merge_schedule(num_tokens: int, num_layers: int, *, r: int | None = None, ramp: float = 0.0,
                   keep_ratio: float | None = None, target: int | None = None,
                   protected: int = 0) -> list[int]:
    """Tokens to remove at each of ``num_layers`` layers, starting from ``num_tokens``.

    Exactly one of:
        r: ``r`` per layer. With ``ramp`` (in ``[-1, 1]``) the per-layer value goes linearly from
            ``r·(1+ramp)`` at the first layer to ``r·(1-ramp)`` at the last (ToMe's inflection
            schedule; ``ramp > 0`` merges more early), rounded to the nearest int (:func:`ramp_weights`).
        keep_ratio: in ``(0, 1]``: keep ``ceil(keep_ratio · num_tokens)`` tokens (``1`` keeps all).
        target: tokens left after the last layer, in ``[protected + 1, num_tokens]`` (or ``num_tokens``).
            The removal is spread as evenly as the per-layer limit allows (a layer can at most halve
            its mergeable tokens, so early layers take more when the target needs it); with ``ramp``, in
            the proportions of :func:`ramp_weights` instead (the vision tower's ``vision_ramp``).

    Every value is clamped to ``(n_l - protected) // 2``, where ``n_l`` is the count entering layer
    ``l``, so the schedule is exactly what the matching removes.

    Raises:
        ValueError: ``target``/``keep_ratio`` not reachable in ``num_layers`` halvings, bad arguments.
    """
    num_tokens = check_int("num_tokens", num_tokens, minimum=0)
    num_layers = check_int("num_layers", num_layers, minimum=0)
    protected = check_int("protected", protected, minimum=0, maximum=num_tokens)
    given = [name for name, v in (("r", r), ("keep_ratio", keep_ratio), ("target", target)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of r=, keep_ratio=, target=; got {given or 'none'}")
    if not isinstance(ramp, (int, float)) or isinstance(ramp, bool) or not -1.0 <= ramp <= 1.0:
        raise ValueError(f"ramp must be a float in [-1, 1], got {ramp!r}")
    if r is not None:
        r = check_int("r", r, minimum=0)
        # r · ramp_weights(L, ramp), written as first + step·i (the arithmetic ToMe uses, bit for bit)
        first = r * (1.0 + ramp)
        step = 0.0 if num_layers < 2 else -2.0 * r * ramp / (num_layers - 1)
        return _clamped([max(0, round(first + step * i)) for i in range(num_layers)], num_tokens, protected)

    if keep_ratio is not None:
        if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be a float in (0, 1], got {keep_ratio!r}")
        target = min(num_tokens, kept_count(keep_ratio, num_tokens))
    target = check_int("target", target, minimum=0, maximum=num_tokens)
    if ramp == 0.0 or num_layers < 2:
        return _towards_target(num_tokens, num_layers, target, protected)
    _check_reachable(num_tokens, num_layers, target, protected)
    return _ramp_to_target(num_tokens, target, ramp_weights(num_layers, ramp), protected)


def ramp_weights(num_layers: int, ramp: float) -> list[float]:
    """ToMe's linear schedule shape, one weight per layer: ``1 + ramp − 2·ramp·i/(L−1)`` (from ``1 + ramp``
    at the first layer to ``1 − ramp`` at the last; all 1 for ``ramp = 0`` or one layer). The one ramp
    of the library: ``merge_schedule(r=, ramp=)`` scales it by ``r``, ``merge_schedule(target=, ramp=)``
    and the vision-tower schedule share the removal out in its proportions."""
    if num_layers < 2:
        return [1.0] * num_layers
    return [1.0 + ramp - 2.0 * ramp * i / (num_layers - 1) for i in range(num_layers)]


def _ramp_to_target(n: int, target: int, weights: list[float], protected: int) -> list[int]:
    """Remove ``n - target`` tokens in the proportions of ``weights`` (cumulative rounding, so the total is
    exact), each layer clamped to what the matching can remove, any shortfall carried to the next."""
    total, remove = sum(weights), n - target
    out, done, cum, carry = [], 0, 0.0, 0
    for w in weights:
        cum += w
        want = round(remove * cum / total) - done
        done += want
        r = min(want + carry, (n - protected) // 2)
        carry = want + carry - r
        out.append(r)
        n -= r
    return out


def tokens_after(num_tokens: int, schedule, protected: int = 0) -> int:
    """Tokens left after applying ``schedule`` (per-layer ``r``) with bipartite matching, in order.

    Each step removes ``min(r_l, (n_l - protected) // 2)``, exactly as the matching clamps it.
    """
    n = check_int("num_tokens", num_tokens, minimum=0)
    protected = check_int("protected", protected, minimum=0, maximum=num_tokens)
    for i, r in enumerate(schedule):
        n -= min(check_int(f"schedule[{i}]", r, minimum=0), (n - protected) // 2)
    return n


def _clamped(values: list[int], n: int, protected: int) -> list[int]:
    out = []
    for v in values:
        v = min(v, (n - protected) // 2)
        out.append(v)
        n -= v
    return out


def _halve(n: int, protected: int) -> int:
    return n - (n - protected) // 2


def _check_reachable(n: int, layers: int, target: int, protected: int) -> None:
    lowest = n
    for _ in range(layers):
        lowest = _halve(lowest, protected)
    if target < lowest:
        raise ValueError(
            f"cannot reach {target} tokens from {n} in {layers} layers: each layer can at most halve the "
            f"{n - protected if n >= protected else 0} mergeable tokens, so the fewest reachable is {lowest}")


def _towards_target(n: int, layers: int, target: int, protected: int) -> list[int]:
    _check_reachable(n, layers, target, protected)
    out = []
    for i in range(layers):
        left = layers - i - 1
        remove = n - target
        even = math.ceil(remove / (left + 1))
        # The largest count from which the remaining layers can still reach the target (each halves).
        reachable_from = protected + (target - protected) * 2 ** left
        v = min(max(even, n - reachable_from), (n - protected) // 2, remove)
        out.append(v)
        n -= v
    return out
