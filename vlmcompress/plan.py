"""Plans: where every visual token goes in one stage-B step, applied by one mechanism (DESIGN.md §9).

A stage-B step (pooling, merging, temporal merging, random drop, frame skipping, your own) looks at the
tokens and returns a :class:`Plan`; :meth:`Plan.apply` then moves features, sizes, positions, extra
channels (they ride in ``x``) and the source map together, so no step can get one of them wrong.

A plan is a **partition** of the input tokens into ``num_out`` output groups, plus how each output's
features are weighted:

- ``dst [B, N]``: the output group of every input token, in ``[0, num_out)``; ``-1`` marks a token
  that is *dropped* (it is in no group and counts nowhere, the random-drop baseline). Every output
  owns at least one token (checked at construction).
- ``size`` of an output = the sum of its group's sizes (so sizes still sum to the original count
  unless tokens are dropped); ``source`` follows each patch into its group (``-1`` once dropped).
- ``x`` and ``pos`` of an output: by default the ``weight``-weighted mean of its group, ``weight``
  defaulting to ``size`` (ToMe's size-weighted average). A plan may instead carry a ``mix``: an object
  with ``apply(v [B, N, D]) -> [B, M, D]`` whose rows are convex combinations of input tokens (pooling
  windows, which may overlap and so reach beyond the group; the group then only says who *owns* a patch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ._checks import check_int, check_tensor
from .state import TokenState

__all__ = ["Plan"]


@dataclass(frozen=True, eq=False)
class Plan:
    """A partition of ``N`` input tokens into ``num_out`` outputs, with weights.

    Attributes:
        dst: ``[B, N]`` int64, output group of each input token in ``[0, num_out)``, or ``-1`` (dropped).
            Every output group is non-empty in every row.
        num_out: ``M``, the tokens after the step (the same for every row).
        weight: optional ``[B, N]`` float >= 0, the weight of each token inside its group for ``x`` and
            ``pos`` (default: ``size``). Each non-empty group needs a positive total weight.
        mix: optional object with ``apply(v: Tensor[B, N, D]) -> Tensor[B, M, D]`` (convex
            combinations) that replaces the group mean for ``x`` and ``pos``; see :mod:`vlmcompress.pool`.
    """

    dst: torch.Tensor
    num_out: int
    weight: torch.Tensor | None = None
    mix: Any = None

    def __post_init__(self) -> None:
        check_tensor("dst", self.dst, ndim=2)
        if self.dst.dtype != torch.int64:
            raise TypeError(f"Plan.dst must be int64 [B, N], got {self.dst.dtype}")
        b, n = self.dst.shape
        check_int("num_out", self.num_out, minimum=min(1, n), maximum=n)
        if n and (int(self.dst.min()) < -1 or int(self.dst.max()) >= self.num_out):
            raise ValueError(f"Plan.dst must hold output groups in [0, {self.num_out}) or -1 (dropped), got values "
                             f"in [{int(self.dst.min())}, {int(self.dst.max())}]")
        if self.num_out:
            owners = torch.zeros(b, self.num_out + 1, dtype=torch.int64, device=self.dst.device)
            owners.scatter_add_(1, self.dst + 1, torch.ones_like(self.dst))
            if bool((owners[:, 1:] == 0).any()):
                empty = (owners[:, 1:] == 0).nonzero()[0].tolist()
                raise ValueError(f"Plan is not a partition: output {empty[1]} of row {empty[0]} owns no input token "
                                 "(every output must own at least one)")
        if self.weight is not None:
            check_tensor("weight", self.weight, shape=(b, n), floating=True, finite=True)
            if bool((self.weight < 0).any()):
                raise ValueError("Plan.weight must be >= 0")
        if self.mix is not None and not callable(getattr(self.mix, "apply", None)):
            raise TypeError(f"Plan.mix must have an apply(v [B, N, D]) -> [B, M, D] method, got {type(self.mix).__name__}")

    # --- constructors ------------------------------------------------------------------------------

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device=None) -> "Plan":
        """Keep all ``num_tokens`` tokens where they are."""
        return cls(torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone(), num_tokens)

    @classmethod
    def keep(cls, index: torch.Tensor, num_tokens: int) -> "Plan":
        """Keep the tokens ``index [B, M]`` (int64, increasing in each row), each alone at its own place;
        drop the rest. ``num_tokens`` is ``N``."""
        check_tensor("index", index, ndim=2)
        b, m = index.shape
        if m and bool((index[:, 1:] <= index[:, :-1]).any()):
            raise ValueError("Plan.keep: index must be strictly increasing in every row (kept tokens keep their order)")
        dst = torch.full((b, num_tokens), -1, dtype=torch.int64, device=index.device)
        dst.scatter_(1, index, torch.arange(m, device=index.device).expand(b, m))
        return cls(dst, m)

    @classmethod
    def from_merge(cls, plan) -> "Plan":
        """The plan of a :class:`vlmcompress.merge.MergePlan` (size-weighted averages)."""
        return cls(plan.dst, plan.num_out)

    # --- properties --------------------------------------------------------------------------------

    @property
    def num_in(self) -> int:
        return self.dst.shape[1]

    @property
    def drops(self) -> bool:
        return bool((self.dst < 0).any())

    @property
    def is_identity(self) -> bool:
        n = self.num_in
        return (self.num_out == n and self.mix is None
                and bool((self.dst == torch.arange(n, device=self.dst.device)).all()))

    # --- application -------------------------------------------------------------------------------

    def apply(self, state: TokenState) -> TokenState:
        """``state`` with ``N`` tokens → the state with ``M`` tokens; see the module docstring."""
        if not isinstance(state, TokenState):
            raise TypeError(f"state must be a TokenState, got {type(state).__name__}")
        if tuple(state.x.shape[:2]) != tuple(self.dst.shape):
            raise ValueError(f"plan is for [B, N] = {tuple(self.dst.shape)} tokens but the state has {tuple(state.x.shape[:2])}")
        if self.is_identity:
            return state
        dst = self.dst.to(state.x.device)
        kept = dst >= 0
        group = dst.clamp(min=0)
        b, m = dst.shape[0], self.num_out
        size_in = state.size * kept if self.drops else state.size
        size = torch.zeros(b, m, dtype=state.size.dtype, device=state.x.device).scatter_add_(1, group, size_in)
        if self.mix is not None:
            x = self.mix.apply(state.x).to(state.x.dtype)
            pos = self.mix.apply(state.pos).to(state.pos.dtype)
        elif self.weight is None and not self.drops:
            from . import kernels

            x, size, pos = kernels.merge_tokens(state.x, state.size, state.pos, dst, m)
        else:
            w = (state.size if self.weight is None else self.weight.to(state.x.device)) * kept
            x = _group_mean(state.x, w, group, m)
            pos = _group_mean(state.pos, w, group, m)
        source = None
        if state.source is not None:
            src = state.source
            valid = src >= 0
            source = dst.gather(1, src.clamp(min=0))
            source = torch.where(valid, source, torch.full_like(source, -1))
        return TokenState(x=x, size=size, pos=pos, source=source)


def _group_mean(v: torch.Tensor, w: torch.Tensor, group: torch.Tensor, m: int) -> torch.Tensor:
    """``Σ_{i∈g} w_i v_i / Σ_{i∈g} w_i`` per group: ``v [B, N, D]``, ``w [B, N]``, ``group [B, N]`` → ``[B, M, D]``,
    accumulated in fp32 (fp64 for fp64) and cast back to ``v``'s dtype."""
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32
    b, _, d = v.shape
    wa = w.to(acc)
    num = torch.zeros(b, m, d, dtype=acc, device=v.device).index_put_(
        (torch.arange(b, device=v.device)[:, None].expand_as(group), group), v.to(acc) * wa[..., None], accumulate=True)
    den = torch.zeros(b, m, dtype=acc, device=v.device).scatter_add_(1, group, wa)
    if bool((den <= 0).any()):
        raise ValueError("Plan: an output group has zero total weight; give its tokens a positive weight")
    return (num / den[..., None]).to(v.dtype)
