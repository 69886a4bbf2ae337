"""Shared helpers of the adapter tests: cached tiny models, random media, chat inputs, greedy generation,
a hook on the LLM, closed-form token counts and the pieces of hand-built references.

Test support only (imports torch and transformers, never pytest); the checks themselves stay in ``tests/``.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from vlmcompress.merge import bipartite_soft_matching
from vlmcompress.pool import grid_for_budget
from vlmcompress.state import TokenState
from vlmcompress.testing.tiny_models import tiny_model, tiny_processor

NEW_TOKENS = 4          # tokens generate_tokens() adds: enough for three KV-cache steps after the prefill


# --- models and inputs -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def cached_model(family: str, attn: str = "sdpa"):
    """``tiny_model(family, attn_implementation=attn)``, built once per process (same seed, same weights).

    Shared: a test that patches it must unpatch it (``compressed(...)`` or ``try/finally``)."""
    return tiny_model(family, attn_implementation=attn)


@functools.lru_cache(maxsize=None)
def cached_processor(family: str):
    """``tiny_processor(family)``, built once per process."""
    return tiny_processor(family)


def random_media(kind: str, seed: int, *, size: tuple[int, int], frame_size: tuple[int, int], frames: int,
                 static: bool = False):
    """Uniform noise from ``np.random.default_rng(seed)``: a PIL image of ``size`` (H, W) for
    ``kind="image"``, else a uint8 video ``[frames, *frame_size, 3]`` (with ``static``, one frame repeated)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "image":
        return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    if static:
        return np.repeat(rng.integers(0, 256, (1, *frame_size, 3), dtype=np.uint8), frames, 0)
    return rng.integers(0, 256, (frames, *frame_size, 3), dtype=np.uint8)


def chat_inputs(processor, samples: Sequence[tuple[Sequence[tuple[str, Any]], str]]) -> dict[str, Any]:
    """Processor outputs (a dict of tensors, left padding) for one-turn user chats.

    ``samples``: per row ``(blocks, prompt)``, ``blocks`` a list of ``(kind, media)`` with kind ``"image"``
    (PIL image) or ``"video"`` (uint8 ``[T, H, W, 3]``), written before the prompt. Every video comes
    with metadata of ``T`` frames at 2 fps.
    """
    conversations = [[{"role": "user", "content": [*({"type": k, k: m} for k, m in blocks),
                                                   {"type": "text", "text": prompt}]}]
                     for blocks, prompt in samples]
    kwargs: dict[str, Any] = {"padding": True}
    videos = [m for blocks, _ in samples for k, m in blocks if k == "video"]
    if videos:
        kwargs["video_metadata"] = [{"total_num_frames": len(v), "fps": 2.0, "duration": len(v) / 2,
                                     "frames_indices": list(range(len(v)))} for v in videos]
    processor.tokenizer.padding_side = "left"
    return dict(processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                              return_dict=True, return_tensors="pt", processor_kwargs=kwargs))


def placeholder_id(model, kind: str) -> int:
    """The token id of ``kind``'s placeholders: ``video_token_id`` for ``"video"``, else ``image_token_id``."""
    return model.config.video_token_id if kind == "video" else model.config.image_token_id


# --- running the model -------------------------------------------------------------------------
def generate_tokens(model, inputs: dict[str, Any], **kw) -> torch.Tensor:
    """``model.generate`` under ``no_grad``: exactly ``NEW_TOKENS`` new tokens, greedy unless ``kw`` says
    otherwise. Returns ``[B(·num_return_sequences), L + NEW_TOKENS]`` with ``input_ids`` (prompt first), or
    ``[B, NEW_TOKENS]`` with ``inputs_embeds``; a ``GenerateOutput`` with ``return_dict_in_generate``."""
    kw = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kw}
    with torch.no_grad():
        return model.generate(**inputs, **kw)


def _length_and_positions(kwargs: dict[str, Any]):
    return kwargs["inputs_embeds"].shape[1], kwargs.get("position_ids")


@contextmanager
def llm_calls(model, record: Callable[[dict[str, Any]], Any] = _length_and_positions) -> Iterator[list]:
    """Collect ``record(kwargs)`` for every call into the LLM (``model.model.language_model``) while open;
    the first call of a generate() is the prefill. Default record: ``(sequence length, position_ids)``,
    position_ids ``[B, L]`` or ``[3 or 4, B, L]`` or None. The hook is removed on exit."""
    seen: list = []

    def hook(module, args, kwargs):
        seen.append(record(kwargs))

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


# --- closed-form counts and hand-built references ----------------------------------------------
def planned_tokens(n: int, grid, config, *, tail: int = 0) -> int:
    """Tokens one item of ``n`` placeholders sends to the LLM, in closed form, before running anything.

    The first ``n - tail`` tokens go to ``target = ceil(keep_ratio·(n - tail))``: pooled on ``grid``
    (T, H, W) to ``grid_for_budget``, or merged when ``grid`` is None; then, when ``temporal_keep < 1``,
    each of the ``T' - 1`` later pooled frames of ``P`` tokens keeps ``ceil(temporal_keep·P)``. The
    ``tail`` tokens (e.g. a newline) are kept.
    """
    head = n - tail
    target = min(head, math.ceil(config.keep_ratio * head))
    if grid is None:
        return target + tail
    out = grid_for_budget(grid, target)
    count = math.prod(out)
    if config.temporal_keep < 1.0 and out[0] > 1:
        per = out[1] * out[2]
        count -= (out[0] - 1) * (per - math.ceil(config.temporal_keep * per))
    return count + tail


def window_pool(values: torch.Tensor, grid, out_grid, op: str = "avg") -> torch.Tensor:
    """Average (``op="avg"``) or minimum (``"min"``) of ``values [N, C]``, raster order on ``grid``
    (T, H, W), over the pooling windows down to ``out_grid`` (per axis, window ``j`` is positions
    ``[ceil(j·I/O), ceil((j+1)·I/O))``), computed window by window. Returns ``[prod(out_grid), C]`` in
    raster order."""
    bins = [[(-(-j * i // o), -(-(j + 1) * i // o)) for j in range(o)] for i, o in zip(grid, out_grid)]
    x = values.reshape(*grid, values.shape[1])
    rows = []
    for (t0, t1), (h0, h1), (w0, w1) in itertools.product(*bins):
        win = x[t0:t1, h0:h1, w0:w1].reshape(-1, values.shape[1])
        rows.append(win.mean(0) if op == "avg" else win.min(0).values)
    return torch.stack(rows)


def merge_groups(feats: torch.Tensor, target: int) -> list[torch.Tensor]:
    """Bipartite merging of ``feats [N, C]`` down to ``target`` tokens with the library's matching; returns
    each output token's source indices (sorted 1-D int64), so a test can average the group itself."""
    n = feats.shape[0]
    state = TokenState(feats[None], torch.ones(1, n), torch.zeros(1, n, 3), torch.arange(n)[None])
    while state.num_tokens > target:
        state = bipartite_soft_matching(state.x, state.num_tokens - target).merge(state)
    group = state.source[0]
    return [torch.nonzero(group == g)[:, 0] for g in range(state.num_tokens)]


def left_pad(rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A left-padded batch for ``model(**...)`` from per-row ``(embeds [L_b, C], positions [L_b])``:
    ``inputs_embeds [B, L, C]`` (fp32, zeros in the padding), ``attention_mask [B, L]`` (int64) and
    ``position_ids [B, L]`` (fp32), ``L = max L_b``."""
    length = max(e.shape[0] for e, _ in rows)
    embeds = torch.zeros(len(rows), length, rows[0][0].shape[1])
    position_ids = torch.zeros(len(rows), length)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (e, p) in enumerate(rows):
        embeds[b, length - e.shape[0]:] = e
        position_ids[b, length - e.shape[0]:] = p.float()
        mask[b, length - e.shape[0]:] = 1
    return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
