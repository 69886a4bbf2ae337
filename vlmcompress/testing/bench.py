"""Shared plumbing of the scripts in ``benchmarks/``: machine name, the Linux counters they read peak
memory from, and loading one script from another (``benchmarks/`` is no package)."""
from __future__ import annotations

import os
import platform
import re
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def machine(device: str = "cpu") -> str:
    """The GPU's name for a CUDA device, else the CPU model and core count (for the CSV rows)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.+)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu} x{os.cpu_count()}"


def mallopt(mmap_threshold: int) -> None:
    """Pin glibc's mmap threshold (no-op off glibc).

    128 KiB while measuring memory: every large buffer is a fresh mapping, returned on free, so peak
    RSS sees it and no freed heap memory is silently reused. 32 MiB (glibc's own ceiling) while
    timing: mid-size buffers are reused from the heap as in a long-running process.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold)
        libc.malloc_trim(0)
    except OSError:
        pass


def status_kb(name: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{name}:\s+(\d+)", f.read()).group(1))


def measure_memory(fn):
    """``(result, peak extra MB, wall s)`` of one cold call of ``fn``: peak RSS above the RSS before it
    (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), with every large buffer a fresh
    mapping while it runs (:func:`mallopt`), glibc's default threshold restored afterwards."""
    import time

    mallopt(128 * 1024)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        peak = (status_kb("VmHWM") - base) / 1024
    finally:
        mallopt(32 * 2 ** 20)
    return out, peak, wall


def csv_row(row: dict, fields: list[str]) -> dict:
    """``row`` restricted to ``fields`` for :func:`append_csv`: floats rounded to 4 places, missing or
    ``None`` values empty."""
    out = {}
    for k in fields:
        v = row.get(k)
        out[k] = round(v, 4) if isinstance(v, float) else ("" if v is None else v)
    return out


def append_csv(path, fields: list[str], rows) -> int:
    """Append ``rows`` (dicts) to the CSV at ``path``, writing the header when the file is new.
    Returns how many rows were written."""
    import csv
    from pathlib import Path

    path = Path(path)
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def load_average() -> str:
    """The 1/5/15-minute load averages as ``"a/b/c"`` (empty where the OS has none): printed beside
    timings, since a loaded machine is what makes two runs of one benchmark disagree."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return ""


def log(msg: str) -> None:
    """Progress lines go to stderr, so stdout holds only the table."""
    print(msg, file=sys.stderr, flush=True)


def load_script(path, name: str):
    """The Python file at ``path`` as module ``name`` (executed once; later calls return the same module).

    ``benchmarks/`` is no package and ``python -P`` leaves it off ``sys.path``; the module is registered in
    ``sys.modules`` before it runs, so its dataclasses can look their module up.
    """
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
