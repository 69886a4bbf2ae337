"""Load a VLM, ask it about a video, with or without compression. Shared by the CLI, the captioning
command and the Gradio app, so that all three run exactly the same path."""
from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

import vlmcompress as vc

TINY_PREFIX = "tiny-random:"
TINY_DEFAULT = TINY_PREFIX + "llava_onevision"


def default_model() -> str:
    """The shipped task-trained model when installed (``vlmcompress.models.DEFAULT``), else a tiny random one."""
    try:
        from vlmcompress import models
    except ImportError:                                 # an installation without the registry
        return TINY_DEFAULT
    return models.DEFAULT if models.DEFAULT in models.available("vlm") else TINY_DEFAULT


@dataclass
class RunStats:
    """What one generate call cost, measured in the call (see :func:`stream_answer`).

    Times are seconds from the start of ``generate``; memory in bytes.
    """

    vision_seconds: float | None        # inside the vision tower (stage A included); None: no tower found
    first_token_seconds: float | None   # time to first token = vision + prefill (None: nothing generated)
    decode_tokens_per_second: float | None   # new tokens after the first / their time (None: < 2 tokens)
    peak_memory_bytes: int | None       # CUDA: peak allocated; CPU: peak process RSS (sampled); None: unknown
    peak_memory_kind: str               # "cuda" or "rss"
    kv_cache_bytes: int | None          # keys + values held after the call (None: no cache returned)
    kv_cache_tokens: int | None         # sequence length in the cache
    position_span: float | None         # last − first position id of the prompt in the LLM (V2PE shrinks it)
    finish: str                         # "eos", "length", "time limit" or "stopped"


@dataclass
class Answer:
    text: str
    report: object              # vlmcompress CompressionReport of the call (None when unpatched)
    seconds: float
    new_tokens: int
    stats: RunStats | None = None   # set by stream_answer


def load(name: str, *, dtype: str | torch.dtype = "auto", device: str | None = None,
         local_files_only: bool = False):
    """``(model, processor)`` from a shipped model name (``synth-onevision``, see :mod:`vlmcompress.models`),
    a hub id, a local folder, or ``tiny-random:<family>``.

    ``tiny-random:`` models are built offline with random weights: their answers are gibberish, but the
    whole pipeline (frames, processor, compression, generate) is real. ``dtype``: ``"auto"`` (the
    checkpoint's own), a torch dtype or its name (``"bfloat16"``). ``local_files_only=True`` never touches
    the network (hub ids then load from the local cache only; without it, an offline machine retries for
    a while before failing).

    Raises:
        FileNotFoundError: ``name`` is written as a path (``/``, ``./``, ``~``) and no such folder exists.
        ValueError: an unknown ``tiny-random:`` family or dtype.
        OSError: from ``transformers`` when a hub id cannot be found or downloaded.
    """
    shipped = _shipped_names()
    if name in shipped:                     # a task-trained model shipped in the package (vlmcompress.models)
        from vlmcompress import models

        model, processor = models.load(name, device=device or "cpu",
                                       dtype=None if dtype == "auto" else _dtype(dtype))
        device = None
    elif name.startswith(TINY_PREFIX):
        from vlmcompress.testing.tiny_models import FAMILIES, tiny_model_and_processor

        family = name[len(TINY_PREFIX):]
        if family not in FAMILIES:
            raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
        model, processor = tiny_model_and_processor(family)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(name).expanduser()
        if path.is_dir():
            name = str(path)
        elif name.startswith(("/", ".", "~")):
            # transformers would report a bad "repo id" for a mistyped folder.
            raise FileNotFoundError(f"no such model folder: {name}")
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=_dtype(dtype),
                                                            local_files_only=local_files_only)
        processor = AutoProcessor.from_pretrained(name, local_files_only=local_files_only)
    if device is not None:
        model = model.to(device)
    model.eval()
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return model, processor


def _shipped_names() -> tuple[str, ...]:
    try:
        from vlmcompress import models
    except ImportError:
        return ()
    return tuple(models.names("vlm"))


def _dtype(dtype):
    if dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be 'auto', a floating torch dtype or its name ('bfloat16', 'float16', "
                         f"'float32'), got {dtype!r}")
    return value


def load_for_command(prog: str, name: str, *, device: str | None = None):
    """``load`` for the command-line tools: ``(model, processor)``, or ``None`` after printing a one-line
    error (no such folder or hub id, unknown tiny family) to stderr, so the command can exit with 2."""
    try:
        return load(name, device=device)
    except (OSError, ValueError) as e:
        print(f"{prog}: could not load model {name!r}: {e}", file=sys.stderr)
        return None


def video_inputs(processor, frames: np.ndarray, question: str, *, fps: float):
    """Processor inputs for one user turn holding a video (uint8 ``[T, H, W, 3]``) and a question."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t = frames.shape[0]
    chat = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": question}]}]
    meta = {"total_num_frames": t, "fps": float(fps), "duration": t / fps, "frames_indices": list(range(t))}
    return processor.apply_chat_template(
        [chat], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, "video_metadata": [meta]},
    )


@torch.no_grad()
def ask(model, processor, frames: np.ndarray, question: str, *, fps: float,
        config: vc.CompressionConfig | None, max_new_tokens: int = 64) -> Answer:
    """Generate an answer; with ``config`` the model is patched for this call only."""
    inputs = video_inputs(processor, frames, question, fps=fps).to(model.device)
    start = time.perf_counter()
    if config is None:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        report = None
    else:
        with vc.compressed(model, config, processor=processor):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            report = model.vlmcompress.report
    seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    text = processor.batch_decode(new[None], skip_special_tokens=True)[0].strip()
    return Answer(text, report, seconds, int(new.numel()))


# ------------------------------------------------------------------------------ streaming, measured

# One definition of where a VLM keeps its tower, shared with vlmcompress.evaluate's stage timing.
from vlmcompress.evaluation.measure import vision_module  # noqa: E402


def language_module(model):
    """The decoder stack that receives the prompt's position ids, or None."""
    for owner in (getattr(model, "model", None), model):
        lm = getattr(owner, "language_model", None) if owner is not None else None
        if lm is not None:
            return lm
    return None


class _Streamer:
    """A ``transformers`` streamer: timestamps each new token and hands the decoded text to a queue.

    ``generate`` calls ``put`` once with the prompt, then once per new token, then ``end``."""

    def __init__(self, tokenizer, out: queue.Queue, start: float):
        self.tokenizer, self.out, self.start = tokenizer, out, start
        self.ids: list[int] = []
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter() - self.start)
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        self.out.put(("text", self.tokenizer.decode(self.ids, skip_special_tokens=True)))

    def end(self):
        pass


class _StopOn:
    """Stopping criterion: ends generation when ``event`` is set (the page's Stop button)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _RssPeak:
    """Samples this process's resident memory every ``every`` seconds in a thread (Linux /proc)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, None, threading.Event()
        self._page = None
        try:
            import os

            self._page = os.sysconf("SC_PAGE_SIZE")
            self._read()
        except (OSError, ValueError, AttributeError):
            self._page = None

    def _read(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        if self._page is not None:
            self.peak = self._read()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc):
        if self._page is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._read())


def _cache_size(cache) -> tuple[int | None, int | None]:
    """``(bytes, tokens)`` held by a ``transformers`` cache (keys and values of every layer)."""
    if cache is None:
        return None, None
    layers = getattr(cache, "layers", None)
    pairs = ([(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
             if layers is not None else list(cache))
    total, tokens = 0, None
    for k, v in pairs:
        for t in (k, v):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                tokens = int(t.shape[-2]) if tokens is None else tokens
    return total, tokens


@torch.no_grad()
def stream_answer(model, processor, frames: np.ndarray, question: str, *, fps: float,
                  config: vc.CompressionConfig | None, max_new_tokens: int = 64, max_time: float | None = None,
                  stop: threading.Event | None = None) -> Iterator[str | Answer]:
    """Like :func:`ask`, but yields the answer's text as it grows, then the :class:`Answer` (with ``stats``).

    ``max_time``: seconds after which generation stops (``finish == "time limit"``); ``stop``: an event
    that ends generation at the next token (``finish == "stopped"``). Generation runs in a worker
    thread; closing the generator early stops it and waits for the thread.
    """
    inputs = video_inputs(processor, frames, question, fps=fps).to(model.device)
    stop = stop if stop is not None else threading.Event()
    tokenizer = getattr(processor, "tokenizer", processor)
    events: queue.Queue = queue.Queue()
    cuda = model.device.type == "cuda"
    tower, lm = vision_module(model), language_module(model)
    vision = {"seconds": 0.0, "open": [], "calls": 0}
    positions: dict = {}
    hooks = []

    def sync():
        if cuda:
            torch.cuda.synchronize(model.device)

    if tower is not None:
        def tower_in(module, args):
            sync()
            vision["open"].append(time.perf_counter())

        def tower_out(module, args, output):
            sync()
            vision["seconds"] += time.perf_counter() - vision["open"].pop()
            vision["calls"] += 1

        hooks += [tower.register_forward_pre_hook(tower_in), tower.register_forward_hook(tower_out)]
    if lm is not None:
        def lm_in(module, args, kwargs):
            if "span" in positions:                     # prefill only: the first call holds the prompt
                return
            pos = kwargs.get("position_ids")
            if isinstance(pos, torch.Tensor) and pos.numel():
                row = pos[..., 0, :] if pos.dim() == 3 else pos[0]   # M-RoPE: [3 (or 4), B, L]
                positions["span"] = float(row.max() - row.min())
            else:                                       # the model's own 0..L-1
                emb = kwargs.get("inputs_embeds")
                ids = kwargs.get("input_ids")
                length = (emb.shape[1] if isinstance(emb, torch.Tensor) else
                          ids.shape[1] if isinstance(ids, torch.Tensor) else None)
                positions["span"] = None if length is None else float(length - 1)

        hooks.append(lm.register_forward_pre_hook(lm_in, with_kwargs=True))

    start = time.perf_counter()
    streamer = _Streamer(tokenizer, events, start)
    result: dict = {}

    def work():
        try:
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                          stopping_criteria=[_StopOn(stop)], return_dict_in_generate=True)
            if max_time is not None:
                kwargs["max_time"] = float(max_time)
            if config is None:
                result["out"] = model.generate(**inputs, **kwargs)
                result["report"] = None
            else:
                with vc.compressed(model, config, processor=processor):
                    result["out"] = model.generate(**inputs, **kwargs)
                    result["report"] = model.vlmcompress.report
        except BaseException as e:                      # re-raised in the caller's thread
            result["error"] = e
        finally:
            sync()
            result["seconds"] = time.perf_counter() - start
            events.put(("done", None))

    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    rss = _RssPeak()
    worker = threading.Thread(target=work, name="vlmcompress-generate", daemon=True)
    try:
        with rss:
            worker.start()
            while True:
                kind, text = events.get()
                if kind == "done":
                    break
                yield text
            worker.join()
    finally:
        if worker.is_alive():                           # closed early: end generation, then clean up
            stop.set()
            worker.join()
        for h in hooks:
            h.remove()
    if "error" in result:
        raise result["error"]

    out = result["out"]
    sequences = out.sequences if hasattr(out, "sequences") else out
    new = sequences[0, inputs["input_ids"].shape[1]:]
    n = int(new.numel())
    text = processor.batch_decode(new[None], skip_special_tokens=True)[0].strip()
    seconds = result["seconds"]
    times = streamer.times
    first = times[0] if times else None
    decode = (n - 1) / (seconds - first) if n > 1 and first is not None and seconds > first else None
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    if stop.is_set():
        finish = "stopped"
    elif n and int(new[-1]) in eos:
        finish = "eos"
    elif n >= max_new_tokens:
        finish = "length"
    elif max_time is not None and seconds >= max_time:
        finish = "time limit"
    else:
        finish = "eos"
    # transformers 5.x names it ``cache`` (``past_key_values`` still works but warns)
    cache = getattr(out, "cache", None) if "cache" in getattr(out, "keys", lambda: ())() else None
    kv_bytes, kv_tokens = _cache_size(cache if cache is not None else getattr(out, "past_key_values", None))
    peak = (int(torch.cuda.max_memory_allocated(model.device)), "cuda") if cuda else (rss.peak, "rss")
    stats = RunStats(
        # None when the tower's forward never ran: an adapter that drives its layers itself (Qwen-VL with
        # merging in the tower) is not timed by these hooks, and 0 s would be a lie.
        vision_seconds=vision["seconds"] if vision["calls"] else None, first_token_seconds=first,
        decode_tokens_per_second=decode, peak_memory_bytes=peak[0], peak_memory_kind=peak[1],
        kv_cache_bytes=kv_bytes, kv_cache_tokens=kv_tokens, position_span=positions.get("span"), finish=finish)
    yield Answer(text, result["report"], seconds, n, stats)
