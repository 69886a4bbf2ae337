"""Load a VLM, ask it about a video, with or without compression. Shared by the CLI, the captioning
command and the Gradio app, so that all three run exactly the same path."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import vlmcompress as vc

TINY_PREFIX = "tiny-random:"


@dataclass
class Answer:
    text: str
    report: object              # vlmcompress CompressionReport of the call (None when unpatched)
    seconds: float
    new_tokens: int


def load(name: str, *, dtype: str | torch.dtype = "auto", device: str | None = None,
         local_files_only: bool = False):
    """``(model, processor)`` from a hub id, a local folder, or ``tiny-random:<family>``.

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
    if name.startswith(TINY_PREFIX):
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
