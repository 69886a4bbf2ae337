"""Kernels for the hot merge steps: one entry point per kernel, dispatching to Triton or PyTorch.

The PyTorch versions in :mod:`vlmcompress.kernels.reference` are the spec and the CPU path. Operators
import the entry points below and never a backend directly. The Triton kernels (``merge``,
``unmerge``, ``match``) are imported only when first used, so this package imports without Triton.
Backend choice: ``backend=`` on each call, or ``VLMCOMPRESS_KERNELS=auto|triton|torch``
(see :mod:`vlmcompress.kernels.dispatch`).
"""
from .dispatch import BACKENDS, ENV_VAR, best_match, merge_tokens, resolve_backend, unmerge_tokens

__all__ = ["BACKENDS", "ENV_VAR", "best_match", "merge_tokens", "resolve_backend", "unmerge_tokens"]
