"""Timing and memory of one ``generate()`` call, split by stage, without touching the model's code.

- vision tower: forward pre/post hooks on the tower module (summed over its calls);
- time to first token: a logits processor that notes when ``generate()`` first asks for a token's
  scores, i.e. when prefill is done (prefill = that − vision, compression included);
- decode: the rest of the call;
- peak memory: CUDA's allocator peak, or on the CPU the process's peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the call) above the RSS at the start;
- KV cache: bytes of keys and values the returned cache holds.
"""
from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["StageTimes", "measured", "cache_bytes", "vision_module"]


@dataclass
class StageTimes:
    vision_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    peak_mb: float = float("nan")

    @property
    def prefill_s(self) -> float:
        return max(self.ttft_s - self.vision_s, 0.0)

    @property
    def decode_s(self) -> float:
        return max(self.total_s - self.ttft_s, 0.0)


def vision_module(model):
    """The vision tower (``vision_tower`` in LLaVA/InternVL families, ``visual`` in Qwen-VL), or None."""
    for owner in (getattr(model, "model", None), model):
        for name in ("vision_tower", "visual", "vision_model"):
            tower = getattr(owner, name, None) if owner is not None else None
            if tower is not None:
                return tower
    return None


class _FirstCall:
    """A logits processor that records the time of its first call and changes nothing."""

    def __init__(self):
        self.at = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


@contextmanager
def measured(model, device: torch.device):
    """``with measured(model, device) as (times, logits_processor): model.generate(..., logits_processor=[lp])``."""
    tower = vision_module(model)
    times = StageTimes()
    starts: list[float] = []
    handles = []
    if tower is not None:
        handles.append(tower.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter())))

        def _post(*_):
            times.vision_s += time.perf_counter() - starts.pop()
        handles.append(tower.register_forward_hook(_post))
    first = _FirstCall()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _rss_kb("VmRSS") if _reset_peak_rss() else None
    t0 = time.perf_counter()
    try:
        yield times, first
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        for h in handles:
            h.remove()
    times.total_s = time.perf_counter() - t0
    times.ttft_s = (first.at - t0) if first.at is not None else times.total_s
    if cuda:
        times.peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    elif base is not None:
        peak = _rss_kb("VmHWM")
        times.peak_mb = max(peak - base, 0) / 1024 if peak is not None else float("nan")


def cache_bytes(cache) -> int:
    """Bytes of keys and values held by a ``transformers`` cache (0 for None)."""
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    pairs = ([(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
             if layers is not None else list(cache))
    return sum(t.numel() * t.element_size() for pair in pairs for t in pair if isinstance(t, torch.Tensor))
