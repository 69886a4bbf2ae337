"""Token merging: bipartite soft matching (ToMe) and temporal matching between consecutive frames.

Both operators only *plan* a merge: they compute, once and without gradient, where every token goes
(a :class:`MergePlan`). The plan is then applied to every tensor that travels with the tokens
(features, sizes, positions, the source map), through the merge kernel, so gradients reach the
features through the weighted average and never through the indices (DESIGN.md §3.1).

Output slots keep the surviving tokens in their original order, so a protected CLS token stays at
index 0 and raster order ``(t, h, w)`` is kept for later pooling and position encoding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels
from ._checks import check_finite, check_int, check_tensor
from .state import TokenState

__all__ = [
    "MergePlan",
    "bipartite_soft_matching",
    "temporal_matching",
    "temporal_tokens_after",
    "tome_merge",
    "unmerge_to_source",
]

# Norms below this are treated as zero vectors (cosine 0 with everything) instead of dividing by 0.
_EPS = 1e-12
# With a block size, B is normalised in chunks of this many blocks: the normalised copy of B then
# costs ``8·block_size·C`` values instead of ``N/2·C`` (54 MB at 23,328 tokens × 1152 fp32). 8 keeps
# each score tile wide enough for the matmul: 512×4096 tiles ran within 10 % of one 11,664² matmul
# (CPU time, 2 cores), 256×4096 tiles about 40 % slower.
_B_CHUNK_BLOCKS = 8


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Where every input token goes in a merge.

    Attributes:
        dst: ``[B, N]`` int64, the output slot of every input token, in ``[0, num_out)``. Every slot
            receives at least one token, and slots are numbered in the original order of the tokens
            that survive (every group has exactly one survivor: the token the others merged into).
        num_out: ``M``, the number of tokens after the merge (the same for every sample).

    A plan with ``num_out == N`` is the identity: :meth:`merge` and :meth:`unmerge` return their input
    object unchanged, so callers never branch.
    """

    dst: torch.Tensor
    num_out: int

    def __post_init__(self) -> None:
        check_tensor("dst", self.dst, ndim=2)
        if self.dst.dtype != torch.int64:
            raise TypeError(f"dst must be int64, got {self.dst.dtype}")
        check_int("num_out", self.num_out, minimum=min(1, self.dst.shape[1]), maximum=self.dst.shape[1])

    @classmethod
    def identity(cls, batch: int, num_tokens: int, device=None) -> "MergePlan":
        """The plan that keeps all ``num_tokens`` tokens where they are."""
        dst = torch.arange(num_tokens, device=device).expand(batch, num_tokens).clone()
        return cls(dst=dst, num_out=num_tokens)

    @property
    def num_in(self) -> int:
        return self.dst.shape[1]

    @property
    def removed(self) -> int:
        """How many tokens the plan removes per sample."""
        return self.num_in - self.num_out

    @property
    def is_identity(self) -> bool:
        return self.num_out == self.num_in

    def merge(self, state: TokenState) -> TokenState:
        """Apply the plan to a token state: ``N`` tokens in, ``M`` size-weighted averages out.

        ``x``, ``size`` and ``pos`` go through :func:`vlmcompress.kernels.merge_tokens` (``x`` keeps its
        gradient); ``source`` (``[B, N0]``) is composed as ``dst.gather(1, source)``.
        """
        if not isinstance(state, TokenState):
            raise TypeError(f"state must be a TokenState, got {type(state).__name__}")
        self._check_tokens("state.x", state.x.shape[:2])
        if self.is_identity:
            return state
        dst = self.dst.to(state.x.device)
        x, size, pos = kernels.merge_tokens(state.x, state.size, state.pos, dst, self.num_out)
        source = None if state.source is None else dst.gather(1, state.source)
        return TokenState(x=x, size=size, pos=pos, source=source)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Send merged tokens back to their inputs: ``y [B, M, C]`` → ``[B, N, C]`` (``out[i] = y[dst[i]]``)."""
        check_tensor("y", y, ndim=3)
        if y.shape[:2] != (self.dst.shape[0], self.num_out):
            raise ValueError(f"y must have shape [B={self.dst.shape[0]}, M={self.num_out}, C], got {tuple(y.shape)}")
        if self.is_identity:
            return y
        return kernels.unmerge_tokens(y, self.dst.to(y.device))

    def then(self, other: "MergePlan") -> "MergePlan":
        """The single plan equal to applying ``self`` and then ``other`` (sizes and averages compose)."""
        if not isinstance(other, MergePlan):
            raise TypeError(f"other must be a MergePlan, got {type(other).__name__}")
        if other.dst.shape != (self.dst.shape[0], self.num_out):
            raise ValueError(f"other plan takes {tuple(other.dst.shape)} tokens but this plan gives "
                             f"[B={self.dst.shape[0]}, M={self.num_out}]")
        if self.is_identity:
            return other
        if other.is_identity:
            return self
        return MergePlan(dst=other.dst.to(self.dst.device).gather(1, self.dst), num_out=other.num_out)

    def _check_tokens(self, name: str, bn) -> None:
        if tuple(bn) != tuple(self.dst.shape):
            raise ValueError(f"{name} must have [B, N] = {tuple(self.dst.shape)} to match the plan, got {tuple(bn)}")


def bipartite_soft_matching(metric: torch.Tensor, r: int, *, protected: int = 0,
                            block_size: int | None = None) -> MergePlan:
    """ToMe's bipartite soft matching: plan the removal of ``r`` tokens by merging similar pairs.

    Exactly ToMe's partition (``tome/merge.py``, ``class_token=True`` for ``protected=1``; its
    ``distill_token`` as well for ``protected=2``): all ``N`` tokens split alternately into A (even
    indices, the CLS token 0 included) and B (odd); a protected token in A can never be a source and one
    in B never a destination, so the first ``protected`` tokens keep size 1 and their value. Every other
    A token finds its most similar B token by cosine, and the ``r`` best-scoring A tokens merge into their
    B token. Ties go to the lower index.

    Args:
        metric: ``[B, N, C]`` floating similarity features (attention keys averaged over heads, or the
            features themselves); finite. Only its direction matters.
        r: tokens to remove, ``>= 0``; clamped to ``(N - protected) // 2``. ``0`` is the identity.
        protected: number of leading tokens that never merge.
        block_size: ``None`` scores all A×B pairs at once (``[B, N/2, N/2]`` scores). An int scores
            ``block_size`` A rows at a time against B normalised in chunks of ``8·block_size`` rows,
            bounding the extra memory to about ``B·8·block_size·(C·itemsize + 13·block_size)`` bytes
            (46 MB for 512 at C=1152 fp32, whatever N is). Same result.

    Returns:
        A :class:`MergePlan` with ``num_out = N - r`` (after clamping), computed without gradient.
    """
    check_tensor("metric", metric, ndim=3, floating=True)
    check_finite("metric", metric)
    r = check_int("r", r, minimum=0)
    n = metric.shape[1]
    protected = check_int("protected", protected, minimum=0, maximum=n)
    if block_size is not None:
        block_size = check_int("block_size", block_size, minimum=1)
    r = min(r, (n - protected) // 2)
    if r == 0:
        return MergePlan.identity(metric.shape[0], n, device=metric.device)

    with torch.no_grad():
        # ToMe keeps the CLS token inside A and only forbids it as a source (scores row = -inf); leaving
        # the protected A rows and B columns out of the scoring is the same thing. A at even indices from
        # 0, B at odd ones: a_skip protected tokens are in A (indices 0, 2, ...), b_skip in B (1, 3, ...).
        a_skip, b_skip = (protected + 1) // 2, protected // 2
        a, b = metric[:, 0::2][:, a_skip:], metric[:, 1::2][:, b_skip:]
        # A stays unnormalised: the best B of a row does not depend on the row's own length, so only
        # B needs a normalised copy, and the winning score is rescaled afterwards.
        raw, best = _best_normalised_match(a, b, block_size)
        inv_a = _inverse_norm(a)
        score = raw * inv_a
        # The r best-scoring A tokens; a stable sort keeps the lower index first on ties.
        order = score.argsort(dim=-1, descending=True, stable=True)[:, :r]
        src = 2 * (a_skip + order)
        dst_of_src = 2 * (b_skip + best.gather(1, order)) + 1
        return _plan_from_merges(metric.shape[0], n, src, dst_of_src, metric.device)


def temporal_matching(metric: torch.Tensor, frames: int, *, threshold: float | None = None,
                      budget: int | None = None, block_size: int | None = None) -> MergePlan:
    """Merge every token of frame ``t`` into its best match in frame ``t-1`` when they are alike.

    Tokens are laid out frame by frame: ``metric [B, T*S, C]`` with ``S`` tokens per frame. Each frame
    ``t >= 1`` is scored only against frame ``t-1`` (``T-1`` pairs of ``S×S`` scores, so the cost is
    linear in ``T``). Chains resolve: a token merged into a token that itself merged into frame
    ``t-2`` lands in that token's slot, so a static scene collapses to one frame of tokens of size
    ``T``, while new content keeps its tokens.

    Exactly one of:
        threshold: merge the matches with cosine ``> threshold``. For a rectangular batch every sample
            removes the same number of tokens: ``k = min over samples of (#matches above threshold)``,
            and each sample merges its ``k`` best-scoring matches (over all its frames). With
            ``B == 1`` that is every match above the threshold. A sample's result therefore depends on
            the others in its batch; use ``budget`` where batch independence matters.
        budget: merge the ``budget`` best-scoring tokens of every frame ``t >= 1`` (clamped to ``S``).
            Each sample is planned on its own (batch independent) and the count is closed form:
            :func:`temporal_tokens_after`.

    Args:
        metric: ``[B, T*S, C]`` floating, finite similarity features.
        frames: ``T >= 1``; must divide ``N``.
        block_size: ``None`` scores all frame pairs of a sample at once; an int scores at most
            ``max(1, block_size // S)`` frame pairs at a time (and passes ``block_size`` on to
            :func:`vlmcompress.kernels.best_match`). Same result, bounded memory.

    Returns:
        A :class:`MergePlan`, computed without gradient.
    """
    check_tensor("metric", metric, ndim=3, floating=True)
    check_finite("metric", metric)
    bsz, n, c = metric.shape
    frames = check_int("frames", frames, minimum=1)
    if n % frames:
        raise ValueError(f"frames={frames} must divide the number of tokens N={n} (metric is [B, T*S, C])")
    if (threshold is None) == (budget is None):
        raise ValueError("give exactly one of threshold= (cosine cut-off) or budget= (tokens merged per frame)")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite float (cosine cut-off in [-1, 1]), got {threshold}")
    else:
        budget = check_int("budget", budget, minimum=0)
    if block_size is not None:
        block_size = check_int("block_size", block_size, minimum=1)
    per_frame = n // frames
    if frames == 1 or per_frame == 0 or budget == 0:
        return MergePlan.identity(bsz, n, device=metric.device)

    with torch.no_grad():
        score, best = _frame_pair_matches(metric.reshape(bsz, frames, per_frame, c), block_size)
        score = score.reshape(bsz, -1)                       # [B, (T-1)*S], frames 1..T-1
        if budget is not None:
            k = min(budget, per_frame)
            order = score.view(bsz, frames - 1, per_frame).argsort(dim=-1, descending=True, stable=True)[..., :k]
            order = order + per_frame * torch.arange(frames - 1, device=metric.device).view(1, -1, 1)
            order = order.reshape(bsz, -1)
        else:
            above = score > threshold
            k = int(above.sum(1).min())
            if k == 0:
                return MergePlan.identity(bsz, n, device=metric.device)
            order = score.masked_fill(~above, float("-inf")).argsort(dim=-1, descending=True, stable=True)[:, :k]
        # order indexes tokens of frames 1..T-1; token j there is global index S + j, and its match
        # lives in the previous frame: global (S + j) - S - (j mod S) + best.
        src = per_frame + order
        dst_of_src = order - order % per_frame + best.reshape(bsz, -1).gather(1, order)
        return _plan_from_merges(bsz, n, src, dst_of_src, metric.device)


def temporal_tokens_after(num_tokens: int, frames: int, budget: int) -> int:
    """Tokens left by :func:`temporal_matching` in budget mode: ``N - (T-1)·min(budget, N/T)``."""
    num_tokens = check_int("num_tokens", num_tokens, minimum=0)
    frames = check_int("frames", frames, minimum=1)
    budget = check_int("budget", budget, minimum=0)
    if num_tokens % frames:
        raise ValueError(f"frames={frames} must divide num_tokens={num_tokens}")
    return num_tokens - (frames - 1) * min(budget, num_tokens // frames)


def tome_merge(state: TokenState, r: int, *, metric: torch.Tensor | None = None, protected: int = 0,
               block_size: int | None = None) -> TokenState:
    """One ToMe step on a state: plan with ``metric`` (default: ``state.x``) and apply the plan."""
    if not isinstance(state, TokenState):
        raise TypeError(f"state must be a TokenState, got {type(state).__name__}")
    plan = bipartite_soft_matching(state.x if metric is None else metric, r, protected=protected, block_size=block_size)
    return plan.merge(state)


def unmerge_to_source(state: TokenState, y: torch.Tensor) -> torch.Tensor:
    """Spread per-token values back to the original patches: ``y [B, M, C]`` → ``[B, N0, C]``.

    Uses ``state.source`` (start the state with ``track_source=True``); every patch gets the value of
    the token that holds it.
    """
    if not isinstance(state, TokenState):
        raise TypeError(f"state must be a TokenState, got {type(state).__name__}")
    if state.source is None:
        raise ValueError("state.source is None: start the state with TokenState.from_features(..., track_source=True)")
    check_tensor("y", y, ndim=3)
    if y.shape[:2] != state.x.shape[:2]:
        raise ValueError(f"y must have shape [B={state.batch}, M={state.num_tokens}, C], got {tuple(y.shape)}")
    return kernels.unmerge_tokens(y, state.source.to(y.device))


# --- helpers -------------------------------------------------------------------------------------

def _inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """``[..., 1/|x|]`` in fp32 or wider (accumulated there so fp16 features cannot overflow)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return torch.linalg.vector_norm(x, dim=-1, dtype=acc).clamp_min(_EPS).reciprocal()


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x * _inverse_norm(x).unsqueeze(-1)).to(x.dtype)


def _best_normalised_match(a: torch.Tensor, b: torch.Tensor, block_size: int | None):
    """Best row of normalised ``b`` for every row of ``a``: ``(a·b̂ [B, Na] fp32, index [B, Na])``.

    With a block size, ``b`` is normalised chunk by chunk and the chunk winners are combined; a later
    chunk wins only when strictly better, which keeps the lowest index on ties, as one pass would.
    """
    nb = b.shape[1]
    chunk = nb if block_size is None else _B_CHUNK_BLOCKS * block_size
    best_score = best_index = None
    for start in range(0, nb, chunk):
        score, index = kernels.best_match(a, _normalised(b[:, start:start + chunk]), block_size=block_size)
        if best_score is None:
            best_score, best_index = score, index
            continue
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_index = torch.where(better, index + start, best_index)
    return best_score, best_index


def _frame_pair_matches(m: torch.Tensor, block_size: int | None):
    """Every token of frames ``1..T-1`` against frame ``t-1``.

    ``m [B, T, S, C]`` → ``(score, index)``, both ``[B, T-1, S]``.
    """
    bsz, frames, per_frame, _ = m.shape
    group = frames - 1 if block_size is None else max(1, block_size // per_frame)
    score = torch.empty(bsz, frames - 1, per_frame, device=m.device, dtype=torch.float32)
    index = torch.empty(bsz, frames - 1, per_frame, device=m.device, dtype=torch.int64)
    # One sample at a time keeps each group of frames a contiguous view (no copy of the batch).
    for i in range(bsz):
        for t0 in range(1, frames, group):
            t1 = min(frames, t0 + group)
            normed = _normalised(m[i, t0 - 1:t1])             # frames t0-1 .. t1-1, normalised once
            s, j = kernels.best_match(normed[1:], normed[:-1], block_size=block_size)
            score[i, t0 - 1:t1 - 1] = s
            index[i, t0 - 1:t1 - 1] = j
    return score, index


def _plan_from_merges(bsz: int, n: int, src: torch.Tensor, dst_of_src: torch.Tensor, device) -> MergePlan:
    """Turn ``src[b, k] → dst_of_src[b, k]`` merges (same count per sample) into a :class:`MergePlan`.

    Destinations may themselves be sources (temporal chains); pointer jumping resolves every token to
    the root of its chain in ``log2(chain length)`` gathers. Roots survive, in their original order.
    """
    own = torch.arange(n, device=device).expand(bsz, n)
    parent = own.clone().scatter_(1, src, dst_of_src)
    # Chains are at most n long; stop as soon as no pointer moves.
    for _ in range(max(1, (n - 1).bit_length())):
        nxt = parent.gather(1, parent)
        if torch.equal(nxt, parent):
            break
        parent = nxt
    keep = parent == own
    slot = keep.cumsum(1) - 1
    return MergePlan(dst=slot.gather(1, parent), num_out=n - src.shape[1])
