"""Captioning on one machine: the model, a background decoder, and batched ``generate()``.

``Captioner.caption(decoded)`` captions a batch of decoded videos in one left-padded ``generate()`` and
returns one result dict per video (caption, token counts, time per stage). ``decode_ahead`` decodes the
next videos in threads while the model works: decord's decoding runs in C through ctypes, which releases
the GIL, so decoding and torch overlap on separate cores. Both the local and the Ray engine use these.
"""
from __future__ import annotations

import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .decode import DecodeError, Decoded, Sampling, decode

__all__ = ["Captioner", "ModelError", "auto_resize", "decode_ahead", "load_model", "resolve_model"]

TINY_PREFIX = "tiny-random:"


class ModelError(Exception):
    """The model cannot be used for this run (not found, no video support, no such device)."""


def resolve_model(name: str | None) -> str:
    """The model to use: ``name``, or the shipped default when it is installed."""
    from vlmcompress import models

    if name:
        return name
    if models.DEFAULT in models.available():
        return models.DEFAULT
    raise ModelError(f"no model given and the default shipped model {models.DEFAULT!r} is not installed; give "
                     f"--model: a hub id, a local folder, a shipped model ({', '.join(models.names('vlm'))}), "
                     f"or {TINY_PREFIX}<family> (random weights, for testing the pipeline)")


def check_device(device: str | None) -> None:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    if device and device.startswith("mps") and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available on this machine")


def load_model(name: str, *, device: str | None = None, dtype: str = "auto", warn=None):
    """``(model, processor)`` for ``name`` (shipped model, ``tiny-random:<family>``, hub id or folder).

    Raises:
        ModelError: it cannot be loaded, or it reads images only (no video processor)."""
    from vlmcompress import models

    from ..runner import load

    check_device(device)
    try:
        if name in models.MODELS:
            torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
            model, processor = models.load(name, device=device or "cpu", dtype=torch_dtype)
            if getattr(processor, "tokenizer", None) is not None:
                processor.tokenizer.padding_side = "left"      # batched generate() pads on the left
        else:
            if name.startswith(TINY_PREFIX) and warn is not None:
                warn(f"{name} has random weights: its captions are gibberish (it tests the pipeline, not a model)")
            model, processor = load(name, device=device, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load model {name!r}: {e}") from e
    if getattr(processor, "video_processor", None) is None:
        raise ModelError(f"model {name!r} reads images only ({type(model).__name__} has no video processor); "
                         "choose a video model (LLaVA-OneVision, LLaVA-NeXT-Video, Qwen2/2.5/3-VL, InternVL)")
    return model, processor


def auto_resize(processor):
    """The decode size a processor needs, as a :attr:`Sampling.resize` value (``None``: source size).

    Decoding bigger than what the processor resizes to only costs memory and time."""
    vp = getattr(processor, "video_processor", None)
    size = getattr(vp, "size", None)
    if size is None:
        return None
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if "qwen" in type(vp).__name__.lower():
        # Qwen-VL processors keep the area within max_pixels (stored as longest_edge) and the aspect.
        pixels = getattr(vp, "max_pixels", None) or get("longest_edge")
        return ("short", max(32, int(math.sqrt(pixels)))) if pixels else None
    if get("height") and get("width"):
        return ("short", int(max(get("height"), get("width"))))
    if get("shortest_edge"):
        return ("short", int(get("shortest_edge")))
    return None


class _FirstToken:
    """A ``generate(streamer=)`` that notes when the first new token arrives (prefill is over then)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:     # call 1 is the prompt, call 2 the first new token
            self.first = time.perf_counter()

    def end(self):
        pass


@dataclass
class Result:
    caption: str
    visual_tokens: int
    visual_tokens_kept: int
    prefill_tokens: int
    prefill_tokens_kept: int
    generated_tokens: int
    seconds: dict


class Captioner:
    """One model replica and the settings of a run."""

    def __init__(self, model, processor, config, prompt: str, *, max_new_tokens: int):
        self.model, self.processor, self.config = model, processor, config
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self._vision_seconds = 0.0
        from ..runner import vision_module

        vision = vision_module(model)
        if isinstance(vision, torch.nn.Module):
            # Hooks on this instance only, kept for the Captioner's life: they time every vision-tower call.
            vision.register_forward_pre_hook(self._vision_start)
            vision.register_forward_hook(self._vision_end)

    def _vision_start(self, *_):
        self._t_vision = time.perf_counter()

    def _vision_end(self, *_):
        self._vision_seconds += time.perf_counter() - self._t_vision

    def _inputs(self, clips: list[Decoded]):
        chats, metas = [], []
        for d in clips:
            t, fps = len(d.frames), d.sampled_fps
            chats.append([{"role": "user", "content": [{"type": "video", "video": d.frames},
                                                       {"type": "text", "text": self.prompt}]}])
            metas.append({"total_num_frames": t, "fps": float(fps), "duration": t / fps,
                          "frames_indices": list(range(t))})
        return self.processor.apply_chat_template(
            chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True, "video_metadata": metas})

    @torch.no_grad()
    def caption(self, clips: list[Decoded]) -> list[Result]:
        """Captions of ``clips`` from one batched greedy ``generate()``. Per-stage times of a batch are
        shared equally by its videos (``decode`` is each video's own)."""
        import vlmcompress as vc

        inputs = self._inputs(clips).to(self.model.device)
        self._vision_seconds = 0.0
        streamer = _FirstToken()
        start = time.perf_counter()
        with vc.compressed(self.model, self.config, processor=self.processor):
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      streamer=streamer)
            report = self.model.vlmcompress.report
        end = time.perf_counter()
        first = streamer.first or end
        n = len(clips)
        vision = self._vision_seconds
        stage = {"vision": vision / n, "prefill": max(first - start - vision, 0.0) / n, "generate": (end - first) / n}
        length = inputs["input_ids"].shape[1]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        results = []
        for row, d in enumerate(clips):
            new = out[row, length:].tolist()
            stop = next((i + 1 for i, tok in enumerate(new) if tok in eos), len(new))
            text = self.processor.batch_decode([new[:stop]], skip_special_tokens=True)[0].strip()
            items = [it for it in report.items if it.row == row]
            seconds = {"decode": d.seconds, **stage}
            seconds["total"] = sum(seconds.values())
            results.append(Result(
                caption=text,
                visual_tokens=sum(it.placeholders for it in items),
                visual_tokens_kept=sum(it.after_compress for it in items),
                prefill_tokens=int(report.prefill_before[row]) if report.prefill_before else length,
                prefill_tokens_kept=int(report.prefill_after[row]) if report.prefill_after else length,
                generated_tokens=stop,
                seconds={k: round(v, 4) for k, v in seconds.items()},
            ))
        return results


def decode_ahead(paths, sampling: Sampling, *, workers: int, ahead: int):
    """``(index, Decoded | DecodeError)`` for each path, in order. With ``workers > 0`` up to ``ahead``
    videos are decoded in background threads while the caller works; ``ahead`` bounds the memory held."""
    def one(p):
        try:
            return decode(p, sampling)
        except DecodeError as e:
            return e
        except Exception as e:                     # never let one video end the run
            return DecodeError(f"the decoder failed: {type(e).__name__}: {e}")

    if workers <= 0:
        for i, p in enumerate(paths):
            yield i, one(p)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    pending: deque = deque()
    it = iter(enumerate(paths))
    try:
        for i, p in it:
            pending.append((i, pool.submit(one, p)))
            if len(pending) >= max(ahead, 1):
                break
        while pending:
            i, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(one, nxt[1])))
            yield i, fut.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def warn_stderr(msg: str) -> None:
    print(f"vlmcompress-caption: warning: {msg}", file=sys.stderr)
