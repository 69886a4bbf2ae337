"""One captioning run's settings, its records, and the loop that turns work items into records.

The local engine and every Ray worker call :func:`caption_items`, so both write the same records.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from .decode import DecodeError, Sampling
from .inputs import Item
from .records import record_key

__all__ = ["Job", "RESULT_FIELDS", "caption_items"]

# What a captioned record adds (None in a failed one).
RESULT_FIELDS = ("frames", "timestamps", "frame_indices", "source_fps", "duration", "window", "source_size",
                 "decoded_size", "visual_tokens", "visual_tokens_kept", "prefill_tokens", "prefill_tokens_kept",
                 "generated_tokens", "seconds", "batch_size")


@dataclass
class Job:
    """Everything that decides a caption (and so goes into the resume key), plus where to run."""

    model: str
    prompt: str
    sampling: Sampling
    config: object                  # vlmcompress.CompressionConfig
    max_new_tokens: int
    dtype: str = "auto"
    preset: str | None = None       # for the record only: the config itself is in the settings
    device: str | None = None
    _settings: dict | None = field(default=None, repr=False)
    _decode: Sampling | None = field(default=None, repr=False)

    def resolve_resize(self, processor) -> None:
        """Turn ``resize="auto"`` into the size ``processor`` needs. The key keeps ``"auto"``: with the
        model in the key, the resolved size is already decided by it."""
        from dataclasses import replace

        from .engine import auto_resize

        resize = auto_resize(processor) if self.sampling.resize == "auto" else self.sampling.resize
        self._decode = replace(self.sampling, resize=resize)

    def decode_sampling(self) -> Sampling:
        if self._decode is None:
            if self.sampling.resize == "auto":
                raise RuntimeError("resize='auto' needs resolve_resize(processor) first")
            self._decode = self.sampling
        return self._decode

    def settings(self) -> dict:
        if self._settings is None:
            self._settings = {"sampling": self.sampling.to_dict(), "compression": self.config.to_dict(),
                              "max_new_tokens": self.max_new_tokens, "dtype": self.dtype, "decoding": "greedy"}
        return self._settings

    def key(self, item: Item) -> str:
        return record_key(item.path, item.size, item.mtime, self.model, self.settings(), self.prompt)

    def record(self, item: Item, **fields) -> dict:
        rec = {"key": self.key(item), "video": item.path, "input": item.given, "status": "done",
               "caption": None, "error": None, "error_stage": None,
               "file_size": item.size, "file_mtime": item.mtime, "model": self.model, "preset": self.preset,
               "prompt": self.prompt, "settings": self.settings()}
        rec.update(dict.fromkeys(RESULT_FIELDS))      # every record has every field: one schema for readers
        rec.update(fields)
        rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return rec

    def failed(self, item: Item, stage: str, message: str) -> dict:
        # The file is named in the message too: an error line read on its own must say which video.
        return self.record(item, status="failed", error=f"{item.given}: {message}", error_stage=stage)


def _done(job: Job, item: Item, dec, res, batch: int) -> dict:
    return job.record(
        item, caption=res.caption,
        frames=len(dec.frames), timestamps=[round(float(t), 4) for t in dec.timestamps],
        frame_indices=[int(i) for i in dec.indices], source_fps=round(dec.source_fps, 4),
        duration=round(dec.duration, 4), window=[round(v, 4) for v in dec.window],
        source_size=list(dec.source_size), decoded_size=list(dec.size),
        visual_tokens=res.visual_tokens, visual_tokens_kept=res.visual_tokens_kept,
        prefill_tokens=res.prefill_tokens, prefill_tokens_kept=res.prefill_tokens_kept,
        generated_tokens=res.generated_tokens, seconds=res.seconds, batch_size=batch)


def _model_error(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"the model failed on this video: {type(e).__name__}: {text[0] if text else ''}"


def caption_items(job: Job, captioner, items: list[Item], *, batch_size: int, decode_workers: int,
                  emit: Callable[[dict], None], should_stop: Callable[[], bool] = lambda: False) -> None:
    """Caption ``items`` and ``emit`` one record for each (until ``should_stop()`` turns true: the batch
    in hand is finished and emitted first). Never raises for a bad video: each failure is a record."""
    from .engine import decode_ahead

    ready = [it for it in items if it.error is None]
    for it in items:
        if it.error is not None:
            emit(job.failed(it, "input", it.error))
    if should_stop():
        return

    def flush(batch):
        try:
            results = captioner.caption([d for _, d in batch])
        except Exception as e:                      # one video the model cannot take must not sink the rest
            if len(batch) > 1:
                for pair in batch:
                    flush([pair])
                return
            emit(job.failed(batch[0][0], "model", _model_error(e)))
            return
        for (item, dec), res in zip(batch, results):
            emit(_done(job, item, dec, res, len(batch)))

    batch = []
    ahead = max(2 * batch_size, decode_workers)
    for i, dec in decode_ahead([it.path for it in ready], job.decode_sampling(), workers=decode_workers, ahead=ahead):
        item = ready[i]
        if isinstance(dec, DecodeError):
            emit(job.failed(item, "decode", str(dec)))
        else:
            batch.append((item, dec))
        if len(batch) >= batch_size:
            flush(batch)
            batch = []
        if should_stop():
            break
    if batch and not should_stop():
        flush(batch)
