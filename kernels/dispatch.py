"""One entry point per kernel: Triton for CUDA tensors, the PyTorch reference otherwise.

Choice of backend, strongest first: the ``backend=`` argument, then the ``VLMCOMPRESS_KERNELS``
environment variable (``auto`` | ``triton`` | ``torch``, read at every call), then ``auto``.

- ``torch``: always the reference in :mod:`vlmcompress.kernels.reference`.
- ``auto``: Triton when every tensor is on CUDA, ``triton`` is importable and the kernel supports the
  shapes and dtypes; the reference otherwise.
- ``triton``: Triton on CUDA, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``,
  which is how the tests run). On CPU without the interpreter this raises a ``RuntimeError``
  instead of failing inside the launch. Inputs the kernel does not support (dtype, empty or
  too-large shapes, ``size`` that requires grad) still go to the reference: forcing a backend never
  trades a correct answer for a wrong one.

This module imports neither ``triton`` nor the kernel modules until the Triton path is taken, so
``import vlmcompress.kernels`` works without Triton.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from functools import lru_cache

import torch

# absolute: transformers probes `import kernels` and finds this folder when the repository root is on
# sys.path (`python -m pytest` from the root), so the package must import under that name too
from vlmcompress._checks import check_int, check_tensor
from . import reference

ENV_VAR = "VLMCOMPRESS_KERNELS"
BACKENDS = ("auto", "triton", "torch")

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_GRID_YZ = 65535  # CUDA limit on the 2nd and 3rd grid axes, where the batch goes

# entry point -> (kernel module, host function); looked up at call time so tests can spy on it
_TRITON_IMPL = {
    "merge_tokens": ("merge", "merge_tokens_triton"),
    "unmerge_tokens": ("unmerge", "unmerge_tokens_triton"),
    "best_match": ("match", "best_match_triton"),
}


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` is on, parsed the way Triton parses it."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """Whether Triton kernels can run interpreted in this process.

    Needs ``TRITON_INTERPRET`` on now *and* when ``triton`` was first imported: ``triton.jit`` picks
    compiled or interpreted mode at decoration time, also for Triton's own library functions
    (``tl.zeros``, ``tl.sum``), so setting the variable after ``import triton`` (``transformers``
    imports it) cannot work.
    """
    if not interpreter_enabled():
        return False
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` if given, else ``$VLMCOMPRESS_KERNELS``, else ``"auto"``."""
    if backend is None:
        value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        if value not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}, got {os.environ[ENV_VAR]!r}")
        return value
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    return backend


def resolve_backend(*tensors: torch.Tensor | None, backend: str | None = None, supported: bool = True) -> str:
    """``"triton"`` or ``"torch"``: the implementation an entry point runs for these tensors.

    Args:
        tensors: the call's tensors (``None`` entries are skipped).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``None`` (then ``$VLMCOMPRESS_KERNELS``).
        supported: whether the kernel handles these shapes and dtypes; if not, the answer is ``"torch"``.

    Raises:
        RuntimeError: Triton is forced but not installed, or forced on CPU tensors without
            ``TRITON_INTERPRET=1``, or on a device Triton does not run on here.
    """
    wanted = requested_backend(backend)
    if wanted == "torch":
        return "torch"
    devices = {t.device.type for t in tensors if t is not None}
    if wanted == "auto":
        return "triton" if devices == {"cuda"} and supported and triton_available() else "torch"
    source = f"backend={backend!r}" if backend is not None else f"{ENV_VAR}=triton"
    if not triton_available():
        raise RuntimeError(f"{source} forces the Triton kernels, but triton is not installed "
                           f"(pip install 'vlmcompress[kernels]'), or use {ENV_VAR}=auto or torch")
    if devices == {"cpu"} and not interpreter_enabled():
        raise RuntimeError(
            f"{source} forces the Triton kernels on CPU tensors, which only run under the Triton "
            f"interpreter: set TRITON_INTERPRET=1 before the kernels are first used, move the tensors "
            f"to CUDA, or use {ENV_VAR}=auto or torch (the PyTorch reference)")
    if devices == {"cpu"} and not interpreter_ready():
        raise RuntimeError(
            f"{source} forces the Triton kernels on CPU tensors, but triton was imported before "
            f"TRITON_INTERPRET=1 was set, so its kernels are compiled, not interpreted: set the variable "
            f"before anything imports triton (transformers does), or use {ENV_VAR}=auto or torch")
    if not devices <= {"cpu", "cuda"}:
        raise RuntimeError(f"{source} forces the Triton kernels, which run on CUDA tensors (or CPU tensors "
                           f"under TRITON_INTERPRET=1), got tensors on {sorted(devices)}; use {ENV_VAR}=auto or torch")
    return "triton" if supported and len(devices) == 1 else "torch"


def _triton_impl(name: str):
    module, function = _TRITON_IMPL[name]
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def _fits(batch: int, *sizes: int) -> bool:
    return 0 < batch <= _MAX_GRID_YZ and all(0 < s < 2**31 for s in sizes)


# --- merge ------------------------------------------------------------------------------------------

def merge_tokens(x, size, pos, dst, num_out, *, backend=None):
    """Size-weighted merge of tokens into ``num_out`` slots; see :func:`reference.merge_tokens`.

    ``x [B, N, C]``, ``size [B, N]``, ``pos [B, N, 3]``, ``dst [B, N]`` int64 in ``[0, num_out)`` →
    ``(x_out [B, M, C], size_out [B, M], pos_out [B, M, 3])``. On the Triton path ``size`` gets no
    gradient, so a ``size`` that requires grad runs the reference.
    """
    check_tensor("x", x, ndim=3)
    bsz, n, c = x.shape
    check_tensor("size", size, shape=(bsz, n))
    check_tensor("pos", pos, shape=(bsz, n, 3))
    check_tensor("dst", dst, shape=(bsz, n))
    _check_index("dst", dst)
    check_int("num_out", num_out, minimum=0)
    _check_device("x", x, size=size, pos=pos, dst=dst)
    supported = (x.dtype in _FLOATS and pos.dtype in (torch.float32, torch.float64)
                 and (size.dtype in _FLOATS or size.dtype in (torch.int32, torch.int64))
                 and _fits(bsz, n, c, num_out)
                 and not (size.requires_grad and torch.is_grad_enabled()))
    _check_range_off_gpu("dst", dst, num_out)
    if resolve_backend(x, size, pos, dst, backend=backend, supported=supported) == "triton":
        return _triton_impl("merge_tokens")(x, size, pos, dst, num_out)
    return reference.merge_tokens(x, size, pos, dst, num_out)


# --- unmerge ----------------------------------------------------------------------------------------

def unmerge_tokens(y, dst, *, backend=None):
    """Inverse map of a merge, ``out[b, i] = y[b, dst[b, i]]``; see :func:`reference.unmerge_tokens`.

    ``y [B, M, C]``, ``dst [B, N]`` int64 in ``[0, M)`` → ``[B, N, C]``.
    """
    check_tensor("y", y, ndim=3)
    check_tensor("dst", dst, shape=(y.shape[0], None))
    _check_index("dst", dst)
    _check_device("y", y, dst=dst)
    bsz, m, c = y.shape
    supported = (y.dtype in _FLOATS or y.dtype in (torch.int32, torch.int64)) and _fits(bsz, m, c, dst.shape[1])
    _check_range_off_gpu("dst", dst, m)
    if resolve_backend(y, dst, backend=backend, supported=supported) == "triton":
        return _triton_impl("unmerge_tokens")(y, dst)
    return reference.unmerge_tokens(y, dst)


# --- matching ---------------------------------------------------------------------------------------

def best_match(a, b, b_valid=None, block_size=None, *, backend=None):
    """Best dot-product match in ``b`` for every row of ``a``; see :func:`reference.best_match`.

    ``a [B, Na, C]``, ``b [B, Nb, C]``, ``b_valid [B, Nb]`` bool or None →
    ``(score [B, Na] fp32, index [B, Na] int64)``, ties to the lowest index. The Triton kernel always
    tiles (memory linear in ``Na``), so it ignores ``block_size``. It runs fp16, bf16 and fp32; other
    dtypes (fp64) run the reference.
    """
    check_tensor("a", a, ndim=3, floating=True)
    check_tensor("b", b, shape=(a.shape[0], None, a.shape[2]))
    if b.dtype != a.dtype:
        raise TypeError(f"b must have a's dtype {a.dtype}, got {b.dtype}")
    if b.shape[1] == 0 and a.shape[1] > 0:
        raise ValueError(f"b must have at least one row to match the {a.shape[1]} rows of a against, got {tuple(b.shape)}")
    if b_valid is not None:
        check_tensor("b_valid", b_valid, shape=tuple(b.shape[:2]))
        if b_valid.dtype != torch.bool:
            raise TypeError(f"b_valid must be a bool tensor, got {b_valid.dtype}")
    if block_size is not None:
        check_int("block_size", block_size, minimum=1)
    _check_device("a", a, b=b, b_valid=b_valid)
    bsz, na, c = a.shape
    supported = (a.dtype in (torch.float16, torch.bfloat16, torch.float32) and b.dtype == a.dtype
                 and _fits(bsz, na, b.shape[1], c))
    if resolve_backend(a, b, b_valid, backend=backend, supported=supported) == "triton":
        return _triton_impl("best_match")(a, b, b_valid, block_size)
    return reference.best_match(a, b, b_valid, block_size)


def _check_index(name: str, index: torch.Tensor) -> None:
    if index.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of slot indices, got {index.dtype}")


def _check_device(first: str, tensor: torch.Tensor, **others: torch.Tensor | None) -> None:
    # Nothing is moved between devices behind the caller's back; a mix fails here, by name.
    for name, other in others.items():
        if other is not None and other.device != tensor.device:
            raise ValueError(f"{name} must be on the device of {first} ({tensor.device}), got {other.device}")


def _check_range_off_gpu(name: str, index: torch.Tensor, bound: int) -> None:
    # The kernels skip out-of-range slots rather than read or write out of bounds, and the reference
    # fails inside scatter/gather with a bare RuntimeError. On CPU checking costs nothing, so both paths
    # get this error; on CUDA it would cost a device sync per call (dst is built by the operators), and
    # meta tensors have no values to check.
    if index.device.type == "cpu" and index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
        raise ValueError(f"{name} must hold slot indices in [0, {bound}), got values in "
                         f"[{int(index.min())}, {int(index.max())}]")
