"""Patch a loaded model in place so that its ordinary ``generate()`` reads fewer visual tokens.

Patching binds two instance attributes (``forward`` and ``generate``, :class:`_PatchedMethod` objects)
over the class methods and records a handle in ``model.vlmcompress``; ``unpatch`` deletes exactly those
(putting back any instance ``forward``/``generate`` that was there before, e.g. accelerate's device
hooks), so what ran before runs again. Nothing is changed at import time and nothing global is touched.
Everything attached (here, by stage A, by the LLM's proportional attention) is recorded in an
:class:`adapters.hooks.Attachments` and removed by it; nothing is a closure over the model, so
``copy.deepcopy`` of a patched model gives a patched copy that runs its own weights.

Not thread-safe: the handle keeps per-call state (``report``, the sizes armed for proportional attention,
stage-A merge records, Qwen's ``rope_deltas`` on the model itself), so one patched model must not run two
calls at the same time. Serve concurrent requests from one worker (the demo uses ``concurrency_limit=1``)
or from separate model instances.
"""
from __future__ import annotations

import inspect
import re
from contextlib import contextmanager

import torch

from vlmcompress.config import CompressionConfig

from .compat import check_transformers_version
from .hooks import Attachments
from .llm_attention import check_llm_attention, install_llm_attention
from .pipeline import CompressionReport, check_ids_and_mask, prepare_inputs
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
        self.llm_attention = None   # llm_attention.LlmProportionalAttention while the config asks for it
        self.previous: dict = {}    # instance forward/generate found at patch time (what the patch wraps)
        self.attachments = Attachments()   # model.forward/generate/vlmcompress; unpatch removes them
        self.position_delta: torch.Tensor | None = None   # [B, 1] 1-D families: decoding offset (defect 4)

    @property
    def config(self) -> CompressionConfig:
        return self._config

    @config.setter
    def config(self, config: CompressionConfig) -> None:
        _check_config(config)
        if config.llm_proportional_attention:
            check_llm_attention(self.adapter.language_model)     # refuse before changing anything
        try:
            self.adapter.configure(config)
        except Exception:
            self.adapter.configure(self._config)     # a refused config leaves the previous one working
            raise
        self._attach_llm_attention(config)
        self._config = config

    def _attach_llm_attention(self, config: CompressionConfig | None) -> None:
        """(Re)install the LLM's proportional-attention hooks per ``config`` (``None``: remove them)."""
        if self.llm_attention is not None:
            self.llm_attention.remove()
            self.llm_attention = None
        if config is not None and config.llm_proportional_attention:
            self.llm_attention = install_llm_attention(self.adapter.language_model)

    def _disarm(self) -> None:
        # Sizes armed for a call that never reached the LLM (it raised) must not leak into the next one.
        if self.llm_attention is not None:
            self.llm_attention.disarm()

    def _prepare(self, kwargs: dict, *, generating: bool = False) -> dict:
        # Our own keywords never reach the model, with or without pixel inputs.
        question = kwargs.pop("question", None)
        relevance_frames = kwargs.pop("relevance_frames", None)
        if not self.adapter.modalities(kwargs):
            return self._continue(kwargs)
        if question is None and self._config.uses_relevance and self.processor is not None:
            check_ids_and_mask(kwargs.get("input_ids"), kwargs.get("attention_mask"))
            question = _read_question(self.processor, self.adapter, kwargs)
        new_kwargs, report = prepare_inputs(self.adapter, self._config, kwargs, question=question,
                                            relevance_frames=relevance_frames)
        self.report = report
        self.reports.append(report)
        if self.llm_attention is not None:
            self.llm_attention.arm(report.token_size, sticky=generating)
        del self.reports[:-16]
        self.position_delta = _position_delta(new_kwargs)
        return _mask_for_gaps(new_kwargs)

    def _continue(self, kwargs: dict) -> dict:
        """A call without pixel inputs: a step of generate(), a manual decoding step, or plain text.

        1-D families (issue 9, defect 4): a manual decoding step with the cache and no ``position_ids``
        would continue at the *compressed* length; it continues after the last prompt position instead, as
        Qwen's ``rope_deltas`` does for M-RoPE. A new sequence (no cache) forgets the prompt's offset."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = _seen_tokens(cache)
        if not seen:
            if kwargs.get("input_ids") is not None or kwargs.get("inputs_embeds") is not None:
                if kwargs.get("mm_encoder_outputs") is None:
                    self.position_delta = None
            return _mask_for_gaps(kwargs)
        delta = self.position_delta
        if delta is not None and kwargs.get("position_ids") is None:
            x = kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            if x is not None and x.shape[0] == delta.shape[0]:
                q = x.shape[1]
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.ndim == 2:
                    base = (mask.long().cumsum(-1) - 1)[:, -q:]
                else:
                    base = torch.arange(seen, seen + q, device=x.device).expand(x.shape[0], q)
                kwargs = {**kwargs, "position_ids": (base.to(delta) + delta.to(x.device)).to(torch.float32)}
        return kwargs


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
    check_transformers_version()     # one warning per process outside the tested range (compat.py)
    # Instance attributes already there (accelerate's device-map forward, another tool's wrapper) are
    # wrapped, not replaced, and put back by unpatch.
    previous = {name: model.__dict__[name] for name in ("forward", "generate") if name in model.__dict__}
    adapter.install(config)
    handle = PatchHandle(model, adapter, config, processor)
    handle.previous = previous
    try:
        handle._attach_llm_attention(config)
    except Exception:
        adapter.uninstall()
        raise
    handle.attachments.set_attr(model, "forward", _PatchedMethod(model, "forward"))
    handle.attachments.set_attr(model, "generate", _PatchedMethod(model, "generate"))
    handle.attachments.set_attr(model, _ATTR, handle)
    return model


class _PatchedMethod:
    """``model.forward`` / ``model.generate`` of a patched model.

    An object holding the model, not a closure over its bound methods: ``copy.deepcopy(model)`` copies
    it with the model's other attributes and its ``model`` becomes the copy (issue 9, defect 5: the copy
    ran the original's weights). Each call looks up the handle and what ran before the patch (the class
    method, or an instance attribute such as accelerate's device-map forward) on that model.
    """

    def __init__(self, model, name: str) -> None:
        self.model = model
        self.__name__ = name

    @property
    def inner(self):
        """What ``model.<name>`` was before patching, bound to the model."""
        handle = self.model.__dict__[_ATTR]
        previous = handle.previous.get(self.__name__)
        if previous is not None:
            return previous
        return getattr(type(self.model), self.__name__).__get__(self.model, type(self.model))

    @property
    def __signature__(self):     # transformers validates generate()'s keywords against forward's signature
        return inspect.signature(self.inner)

    def __call__(self, *args, **kwargs):
        handle, inner = self.model.__dict__[_ATTR], self.inner
        kwargs = _keywords(inner, args, kwargs)
        if self.__name__ == "forward":
            # Only a call that arms (one with pixel inputs) disarms: the forward calls inside a generate()
            # must not drop the sizes that generate() armed for all its steps (use_cache=False).
            arms = bool(handle.adapter.modalities(kwargs))
            try:
                return inner(**handle._prepare(kwargs))
            finally:
                if arms:
                    handle._disarm()
        if isinstance(kwargs.get("inputs"), torch.Tensor) and kwargs.get("input_ids") is None \
                and not kwargs["inputs"].is_floating_point():
            # generate(ids) / generate(inputs=ids): for a decoder-only VLM `inputs` are the input_ids.
            kwargs["input_ids"] = kwargs.pop("inputs")
        try:
            prepared = handle._prepare(kwargs, generating=True)
            out = inner(**prepared)
        finally:
            handle._disarm()
        if prepared is kwargs:
            return out
        # The model generated after the *shrunk* prompt; give back the caller's prompt followed by the new
        # tokens, so the usual `out[:, inputs["input_ids"].shape[1]:]` still cuts off exactly the answer.
        return _restore_prompt(out, kwargs["input_ids"], prepared["input_ids"].shape[1])


def unpatch(model):
    """Undo ``patch``: the model is exactly the original again (returns it)."""
    handle = getattr(model, _ATTR, None)
    if not isinstance(handle, PatchHandle):
        raise ValueError(f"{type(model).__name__} is not patched by vlmcompress")
    handle.adapter.uninstall()
    handle._attach_llm_attention(None)
    handle.attachments.remove()      # forward, generate, the handle: what was there before is back
    return model


def is_patched(model) -> bool:
    return isinstance(getattr(model, _ATTR, None), PatchHandle)


@contextmanager
def compressed(model, config: CompressionConfig | None = None, *, processor=None):
    """``with compressed(model, config): model.generate(...)`` — patched inside, restored after.

    On a model that is already patched, the block runs with ``config`` and the outer patch (its config and
    processor) is back afterwards."""
    outer = getattr(model, _ATTR, None)
    if isinstance(outer, PatchHandle):
        saved = outer.config, outer.processor
        patch(model, config, processor=processor)
        try:
            yield model
        finally:
            outer.config, outer.processor = saved
        return
    patch(model, config, processor=processor)
    try:
        yield model
    finally:
        unpatch(model)


def _keywords(fn, args: tuple, kwargs: dict) -> dict:
    """``args`` named after ``fn``'s positional parameters and merged into ``kwargs`` (the pipeline reads
    everything by name, so ``model(ids, pixels)`` and ``generate(ids, generation_config)`` keep every value)."""
    if not args:
        return kwargs
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        raise TypeError(f"{getattr(fn, '__name__', 'forward')}() takes {len(params)} positional arguments "
                        f"({', '.join(p.name for p in params)}) but {len(args)} were given")
    named = {p.name: a for p, a in zip(params, args)}
    twice = sorted(named.keys() & kwargs.keys())
    if twice:
        raise TypeError(f"{getattr(fn, '__name__', 'forward')}() got multiple values for {', '.join(twice)}")
    return {**named, **kwargs}


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


def _position_delta(kwargs: dict) -> torch.Tensor | None:
    """``[B, 1]`` float64 ``last prompt position + 1 - real prompt tokens`` for 1-D ``position_ids [B, L']``
    (what a decoding step must add to its cache length); ``None`` for M-RoPE or unchanged positions."""
    pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
    if not isinstance(pos, torch.Tensor) or pos.ndim != 2 or not isinstance(mask, torch.Tensor):
        return None
    real = mask.bool()
    top = pos.to(torch.float64).masked_fill(~real, float("-inf")).amax(1, keepdim=True)
    return top + 1 - real.sum(1, keepdim=True).to(torch.float64)


def _mask_for_gaps(kwargs: dict) -> dict:
    """An explicit all-ones ``attention_mask`` when there is none, no cache, and 1-D ``position_ids`` have
    gaps (compressed visual tokens at their centroids): without a mask and a cache, transformers reads such
    gaps as boundaries of packed sequences and stops the text after an image from seeing the prompt before
    it (issue 9, defect 3: ``generate(use_cache=False)``, where ``generate()`` drops an all-ones mask)."""
    pos = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is not None or not isinstance(pos, torch.Tensor) or pos.ndim != 2 \
            or pos.shape[1] < 2 or _seen_tokens(kwargs.get("cache", kwargs.get("past_key_values"))):
        return kwargs
    if not bool((pos.diff(dim=-1) != 1).any()):
        return kwargs
    return {**kwargs, "attention_mask": torch.ones(pos.shape, dtype=torch.long, device=pos.device)}


def _seen_tokens(cache) -> int:
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def _check_config(config) -> None:
    if not isinstance(config, CompressionConfig):
        raise TypeError(f"config must be a vlmcompress.CompressionConfig, got {type(config).__name__}")


def _read_question(processor, adapter, kwargs) -> list[str]:
    """The user's question in each row: the text of the last user turn (after the chat template's user
    header, e.g. ``USER:`` or ``<|im_start|>user``), with the visual placeholders taken out wherever they
    sit (before or after the question, issue 9 defect 6), without the template's special tokens and
    without its generation prompt (``ASSISTANT:``, ``<|im_start|>assistant``), so relevance is scored on
    the question alone (DESIGN.md §3.2). Without a recognisable header the whole row's text is used."""
    tok = getattr(processor, "tokenizer", processor)
    ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    visual = {adapter.token_id(m) for m in ("image", "video")} - {None}
    header, suffix = _chat_markers(processor, tok)
    special = set(getattr(tok, "all_special_ids", None) or ())
    out = []
    for b, row in enumerate(ids.tolist()):
        if mask is not None:
            row = [t for t, keep in zip(row, mask[b].tolist()) if keep]
        start = _last_occurrence(row, header)
        tail = row[start + len(header):] if start >= 0 else row
        if suffix and tail[-len(suffix):] == suffix:
            tail = tail[:-len(suffix)]
        tail = [t for t in tail if t not in visual]
        # Qwen3-VL writes a timestamp as text before each frame group ("<0.2 seconds>"): not the question.
        text = _TIMESTAMP.sub("", tok.decode(tail, skip_special_tokens=True)).strip()
        if suffix and not special.intersection(suffix):
            # A plain-text generation prompt (LLaVA's " ASSISTANT:") may tokenize differently in context.
            plain = tok.decode(suffix, skip_special_tokens=True).strip()
            if plain and text.endswith(plain):
                text = text[:-len(plain)].strip()
        out.append(text)
    return out


_TIMESTAMP = re.compile(r"<\d+(?:\.\d+)? seconds>")


def _last_occurrence(row: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of ``pattern`` in ``row``, or -1 (also for an empty pattern)."""
    if not pattern:
        return -1
    k = len(pattern)
    for i in range(len(row) - k, -1, -1):
        if row[i:i + k] == pattern:
            return i
    return -1


_TEMPLATE_WARNED: set = set()


def _chat_markers(processor, tok) -> tuple[list[int], list[int]]:
    """``(user header ids, ids after the user's text)``: what the processor's chat template writes before
    the user's text of a turn (``USER:``, ``<|im_start|>user\n``, with the text's own leading space or
    newline left out) and after it (end of turn + generation prompt). ``([], [])`` when the processor has
    no chat template (a one-time warning says the question is then the row's whole text)."""
    marker = "vlmcompressquestionmarker"
    conversation = [{"role": "user", "content": [{"type": "text", "text": marker}]}]
    if not callable(getattr(processor, "apply_chat_template", None)):
        return [], []
    try:
        rendered = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except (ValueError, TypeError, KeyError, AttributeError) + _template_errors() as exc:
        key = type(processor).__name__
        if key not in _TEMPLATE_WARNED:
            _TEMPLATE_WARNED.add(key)
            import warnings

            warnings.warn(f"vlmcompress: {key}.apply_chat_template failed ({type(exc).__name__}: {exc}); the question "
                          "for relevance is read as the prompt's whole text. Pass generate(..., question=...) to "
                          "give it exactly.", stacklevel=4)
        return [], []
    if not isinstance(rendered, str) or marker not in rendered:
        return [], []
    before, after = rendered.split(marker, 1)
    # The header is the last line of what precedes the text (a system prompt may come before it).
    head = before.rstrip()
    head = head[head.rfind("\n") + 1:] if "\n" in head else head
    if not head:
        before_lines = before.rstrip("\n").split("\n")
        head = before_lines[-1] if before_lines else ""
    header = tok(head, add_special_tokens=False)["input_ids"] if head else []
    suffix = tok(after, add_special_tokens=False)["input_ids"] if after else []
    return header, suffix


def _template_errors() -> tuple:
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - transformers requires jinja2 for chat templates
        return ()
    return (TemplateError,)
