"""Proportional attention inside the LLM: a visual token that stands for ``k`` originals weighs like ``k`` copies.

With ``CompressionConfig(llm_proportional_attention=True)`` every attention logit towards a key that is a
compressed visual token gets ``+ log(size)`` of that key (DESIGN.md §3.1): a bias on the *key* axis,
broadcast over heads and queries, in prefill and in every decoding step (the keys live in the KV cache).
Text keys, keys of uncompressed tokens and every key generated later get ``log 1 = 0``.

How it is attached (all by hooks on the instance, removed by :meth:`LlmProportionalAttention.remove`):

- The patch handle *arms* the sizes of the packed prompt ``[B, L']`` (``CompressionReport.token_size``)
  right before it calls the model.
- A forward pre-hook on the language model marks sequence boundaries: the first LLM call after arming takes
  the armed sizes; any other call with an empty (or no) cache starts a sequence without bias (a text-only
  prompt); calls that continue a cache keep the current sequence's bias. So ``generate()``, a manual decoding loop and
  ``generate()``'s prefill chunking all see the bias of their own prompt.
- A forward pre-hook with kwargs on every self-attention module of the LLM (class name ending in
  ``Attention`` with a ``layer_idx``) turns whatever mask it receives into one additive float mask
  ``[B, 1, q, kv]``: the causal/padding mask (``None`` → causal with the cache offset; bool → ``0`` /
  ``finfo.min``, transformers' own recipe for SDPA with a bias; float → kept) plus the log-size bias
  of each key, padded with zeros beyond the prompt. Eager attention adds it to the logits; SDPA takes it
  as ``attn_mask``. FlashAttention and flex attention take no additive mask and are refused.

When every size is 1 (nothing merged) the bias is zero and the hooks leave the mask untouched, so the
model is bit-identical to running without the flag.
"""
from __future__ import annotations

import functools
import inspect

import torch

from vlmcompress.attention import size_log_bias

from .hooks import Attachments

__all__ = ["LlmProportionalAttention", "SUPPORTED_ATTENTION", "attention_modules", "check_llm_attention",
           "install_llm_attention"]

#: ``config._attn_implementation`` values that take an additive float mask.
SUPPORTED_ATTENTION = ("eager", "sdpa")


def attention_modules(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a Llama/Qwen-style LLM: class name ending in ``Attention`` and an int
    ``layer_idx`` (the index their KV-cache layer is stored under)."""
    return [m for m in language_model.modules()
            if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def check_attention_implementation(impl, where: str) -> None:
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"llm_proportional_attention needs an attention implementation that adds a float mask "
            f"({' or '.join(SUPPORTED_ATTENTION)}); {where} uses {impl!r}. Load the model with "
            "attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')), or turn the flag off")


def check_llm_attention(language_model: torch.nn.Module) -> list[torch.nn.Module]:
    """Raise a clear ValueError unless ``language_model`` can take the size bias; returns its attention modules."""
    modules = attention_modules(language_model)
    if not modules:
        raise ValueError(f"llm_proportional_attention: found no self-attention module (a class named "
                         f"...Attention with a layer_idx) in {type(language_model).__name__}")
    check_attention_implementation(_implementation(language_model), type(language_model).__name__)
    return modules


class LlmProportionalAttention:
    """The hooks of one patched LLM. Build with :func:`install_llm_attention`; undo with :meth:`remove`."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        self.language_model = language_model
        self.modules = check_llm_attention(language_model)
        self._armed: torch.Tensor | None = None   # [B, L'] sizes for the next LLM call (set by the patch handle)
        self._sticky = False                      # armed for every new sequence until disarm()
        self._bias: torch.Tensor | None = None    # [B, L'] fp32 log sizes of the current sequence, None = no bias
        self._memo: dict = {}                     # per forward: padded bias per (batch, kv, offset, dtype, device)
        # Bound methods and partials, never closures: copy.deepcopy of the model rebinds them to the copy.
        self._handles = Attachments()
        self._handles.hook(language_model, self._on_language_model, pre=True, with_kwargs=True)
        for module in self.modules:
            index = _positional_index(module, "attention_mask")
            self._handles.hook(module, functools.partial(self._on_attention_at, index), pre=True, with_kwargs=True)

    # --- state ---------------------------------------------------------------------------------
    def arm(self, size: torch.Tensor | None, *, sticky: bool = False) -> None:
        """Sizes ``[B, L']`` (original tokens per packed prompt token; 1 for text and padding) for the next
        sequence the LLM starts; ``None`` for none. ``sticky``: for every sequence the LLM starts until
        :meth:`disarm` (a ``generate(use_cache=False)`` re-reads prompt + new tokens from scratch at each
        step; issue 9, defect 3: the bias was dropped after the first step)."""
        if size is not None:
            if not isinstance(size, torch.Tensor) or size.ndim != 2:
                raise ValueError(f"size must be a [B, L] tensor, got {getattr(size, 'shape', type(size).__name__)}")
            size = size.detach()
        self._armed = size
        self._sticky = sticky and size is not None

    def disarm(self) -> None:
        self._armed = None
        self._sticky = False

    @property
    def bias(self) -> torch.Tensor | None:
        """``[B, L']`` fp32 ``log(size)`` of the prompt keys of the sequence being decoded; ``None`` if none."""
        return self._bias

    def remove(self) -> None:
        self._handles.remove()
        self._armed = self._bias = None
        self._memo = {}

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    # --- hooks ---------------------------------------------------------------------------------
    def _on_language_model(self, module, args, kwargs):
        self._memo = {}
        cache = _cache(kwargs)
        if self._sticky and cache is not None and _seen(cache) > 0:
            return None                       # continues a sequence: keep its bias (and stay armed)
        size = self._armed
        if not self._sticky:
            self._armed = None
        if size is None:
            if cache is not None and _seen(cache) > 0:
                return None                   # continues a sequence: keep its bias
            self._bias = None                 # a new sequence that vlmcompress did not prepare: no bias
            return None
        self._bias = None
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        batch, length = (x.shape[0], x.shape[1]) if x is not None else size.shape
        # Sticky (no cache): the prompt followed by the tokens generated so far, which get no bias.
        if batch % size.shape[0] or (length > size.shape[1] and not self._sticky):
            raise RuntimeError(f"llm_proportional_attention: the LLM starts a sequence of shape [{batch}, {length}] "
                               f"but the prepared prompt has shape {list(size.shape)}; this is a bug in vlmcompress")
        bias = size_log_bias(size.float(), torch.float32)[:, 0, 0]          # [B0, L']
        if not bool(bias.any()):
            return None                       # nothing merged: leave every mask untouched (bit-identical)
        # generate() repeats each prompt row for num_return_sequences / beams (repeat_interleave).
        self._bias = bias.repeat_interleave(batch // size.shape[0], dim=0)
        return None

    def _on_attention_at(self, index, module, args, kwargs):
        return self._on_attention(module, args, kwargs, index)

    def _on_attention(self, module, args, kwargs, index):
        if self._bias is None:
            return None
        check_attention_implementation(_implementation(module), type(module).__name__)
        positional = "attention_mask" not in kwargs and index is not None and index < len(args)
        mask = args[index] if positional else kwargs.get("attention_mask")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        new_mask = self._mask(module, hidden, mask, _cache(kwargs))
        if positional:
            args = (*args[:index], new_mask, *args[index + 1:])
        else:
            kwargs["attention_mask"] = new_mask
        return args, kwargs

    # --- the mask ------------------------------------------------------------------------------
    def _mask(self, module, hidden: torch.Tensor, mask, cache) -> torch.Tensor:
        batch, q_len = hidden.shape[0], hidden.shape[1]
        layer = module.layer_idx
        if cache is not None:
            q_offset = int(cache.get_query_offset(layer)) if hasattr(cache, "get_query_offset") else _seen(cache, layer)
            kv_len, kv_offset = cache.get_mask_sizes(q_len, layer)
            kv_len, kv_offset = int(kv_len), int(kv_offset)
        else:
            q_offset, kv_len, kv_offset = 0, q_len, 0
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
                raise ValueError(f"llm_proportional_attention: {type(module).__name__} received an attention mask of "
                                 f"type {type(mask).__name__} with shape {getattr(mask, 'shape', None)}; only 4-D "
                                 "bool or float masks (eager / sdpa) can carry the size bias")
            kv_len = mask.shape[-1]
        dtype = mask.dtype if mask is not None and mask.is_floating_point() else hidden.dtype
        bias = self._padded_bias(batch, kv_len, kv_offset, dtype, hidden.device)   # [B, 1, 1, kv]
        if mask is None:
            # What the model would have done without a mask: causal, aligned to the cache offset.
            q_pos = torch.arange(q_len, device=hidden.device) + q_offset
            k_pos = torch.arange(kv_len, device=hidden.device) + kv_offset
            mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
        if mask.dtype == torch.bool:
            return torch.where(mask.to(bias.device), bias, torch.finfo(dtype).min)
        return mask + bias.to(mask.device)

    def _padded_bias(self, batch: int, kv_len: int, kv_offset: int, dtype, device) -> torch.Tensor:
        """``[B, 1, 1, kv_len]``: the prompt bias at absolute key positions ``kv_offset + j``, 0 after the prompt."""
        key = (batch, kv_len, kv_offset, dtype, device)
        if key not in self._memo:
            bias = self._bias
            if bias.shape[0] != batch:
                raise RuntimeError(f"llm_proportional_attention: batch {batch} in attention but {bias.shape[0]} "
                                   "prompt rows; this is a bug in vlmcompress")
            out = torch.zeros(batch, kv_len, dtype=torch.float32, device=device)
            stop = min(bias.shape[1], kv_offset + kv_len)
            if stop > kv_offset:
                out[:, :stop - kv_offset] = bias[:, kv_offset:stop].to(device)
            self._memo[key] = out.to(dtype)[:, None, None, :]
        return self._memo[key]


def install_llm_attention(language_model: torch.nn.Module) -> LlmProportionalAttention:
    """Hook proportional attention into ``language_model`` (the LLM under a VLM: ``model.model.language_model``)."""
    return LlmProportionalAttention(language_model)


def _implementation(module) -> str | None:
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None)


def _cache(kwargs: dict):
    # transformers 5.x passes ``cache=``; ``past_key_values=`` is its deprecated name.
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _seen(cache, layer: int = 0) -> int:
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        return 0
    try:
        return int(get(layer))
    except TypeError:
        return int(get())


def _positional_index(module, name: str) -> int | None:
    """Index of parameter ``name`` among the positional arguments of ``module.forward`` (self excluded)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(name) if name in positional else None
