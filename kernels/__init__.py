"""Kernels for the hot merge steps: one entry point per kernel, dispatching to Triton or PyTorch.

The PyTorch versions in :mod:`vlmcompress.kernels.reference` are the spec. Operators import the
entry points below and never a backend directly.
"""
from .reference import best_match, merge_tokens, unmerge_tokens

__all__ = ["best_match", "merge_tokens", "unmerge_tokens"]
