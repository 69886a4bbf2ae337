"""Patch a loaded model in place so that its ordinary ``generate()`` reads fewer visual tokens.

Patching binds two instance attributes (``forward`` and ``generate``) over the class methods and
records a handle in ``model.vlmcompress``; ``unpatch`` deletes exactly those, so the class methods
are what run again. Nothing is changed at import time and nothing global is touched.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from vlmcompress.config import CompressionConfig

from .pipeline import CompressionReport, prepare_inputs
from .registry import adapter_for

_ATTR = "vlmcompress"


class PatchHandle:
    """Lives at ``model.vlmcompress`` while a model is patched."""

    def __init__(self, model, adapter, config: CompressionConfig, processor=None) -> None:
        self.model = model
        self.adapter = adapter
        self._config = config
        self.processor = processor
        self.report: CompressionReport | None = None
        self.reports: list[CompressionReport] = []

    @property
    def config(self) -> CompressionConfig:
        return self._config

    @config.setter
    def config(self, config: CompressionConfig) -> None:
        _check_config(config)
        self.adapter.configure(config)
        self._config = config

    def _prepare(self, kwargs: dict) -> dict:
        if not self.adapter.modalities(kwargs):
            return kwargs
        question = kwargs.pop("question", None)
        if question is None and self._config.relevance is not None and self.processor is not None:
            question = _read_question(self.processor, self.adapter, kwargs)
        new_kwargs, report = prepare_inputs(self.adapter, self._config, kwargs, question=question)
        self.report = report
        self.reports.append(report)
        del self.reports[:-16]
        return new_kwargs


def patch(model, config: CompressionConfig | None = None, *, processor=None):
    """Patch ``model`` in place (returns it). Patching an already-patched model changes its config."""
    config = CompressionConfig() if config is None else config
    _check_config(config)
    handle = getattr(model, _ATTR, None)
    if isinstance(handle, PatchHandle):
        handle.config = config
        if processor is not None:
            handle.processor = processor
        return model
    adapter = adapter_for(model)
    adapter.install(config)
    handle = PatchHandle(model, adapter, config, processor)
    original_forward, original_generate = model.forward, model.generate

    @functools.wraps(original_forward)
    def forward(*args, **kwargs):
        if args:
            kwargs = {**dict(zip(["input_ids"], args)), **kwargs}
        return original_forward(**handle._prepare(kwargs))

    @functools.wraps(original_generate)
    def generate(*args, **kwargs):
        if args:
            kwargs = {**dict(zip(["input_ids"], args)), **kwargs}
        prepared = handle._prepare(kwargs)
        out = original_generate(**prepared)
        if prepared is kwargs:
            return out
        # The model generated after the *shrunk* prompt; give back the caller's prompt followed by the new
        # tokens, so the usual `out[:, inputs["input_ids"].shape[1]:]` still cuts off exactly the answer.
        return _restore_prompt(out, kwargs["input_ids"], prepared["input_ids"].shape[1])

    object.__setattr__(model, "forward", forward)
    object.__setattr__(model, "generate", generate)
    object.__setattr__(model, _ATTR, handle)
    return model


def unpatch(model):
    """Undo ``patch``: the model is exactly the original again (returns it)."""
    handle = getattr(model, _ATTR, None)
    if not isinstance(handle, PatchHandle):
        raise ValueError(f"{type(model).__name__} is not patched by vlmcompress")
    handle.adapter.uninstall()
    for name in ("forward", "generate", _ATTR):
        model.__dict__.pop(name, None)
    return model


def is_patched(model) -> bool:
    return isinstance(getattr(model, _ATTR, None), PatchHandle)


@contextmanager
def compressed(model, config: CompressionConfig | None = None, *, processor=None):
    """``with compressed(model, config): model.generate(...)`` — patched inside, restored after."""
    patch(model, config, processor=processor)
    try:
        yield model
    finally:
        unpatch(model)


def _restore_prompt(out, prompt: torch.Tensor, packed_length: int):
    sequences = out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)
    if sequences is None:
        return out
    new_tokens = sequences[:, packed_length:]
    expanded = prompt.to(sequences.device).repeat_interleave(sequences.shape[0] // prompt.shape[0], dim=0)
    restored = torch.cat([expanded, new_tokens], dim=1)
    if isinstance(out, torch.Tensor):
        return restored
    out.sequences = restored
    return out


def _check_config(config) -> None:
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a vlmcompress.CompressionConfig, got {type(config).__name__}")


def _read_question(processor, adapter, kwargs) -> list[str]:
    """The text of each row after its last visual placeholder: the user's question in every chat template
    we know, without the template's own tokens (skip_special_tokens)."""
    tok = getattr(processor, "tokenizer", processor)
    ids = kwargs["input_ids"]
    visual = {adapter.token_id(m) for m in ("image", "video")} - {None}
    out = []
    for row in ids.tolist():
        last = max((i for i, t in enumerate(row) if t in visual), default=-1)
        out.append(tok.decode(row[last + 1:], skip_special_tokens=True).strip())
    return out
