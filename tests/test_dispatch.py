"""The dispatch runs the backend it says it runs, and refuses clearly when Triton cannot run.

Triton itself is replaced by a spy here (the kernels' numbers are tests/test_kernels.py's job), so
these tests run without the interpreter, except the one fresh process that checks the real errors.
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from vlmcompress.kernels import BACKENDS, ENV_VAR, best_match, dispatch, merge_tokens, reference, resolve_backend, unmerge_tokens


@pytest.fixture
def spy(monkeypatch):
    """Replaces the Triton host functions; ``calls`` lists the entry points that reached Triton."""
    calls = []

    def fake_impl(name):
        def run(*args):
            calls.append(name)
            return getattr(reference, name)(*args[:5] if name == "merge_tokens" else args)
        return run

    monkeypatch.setattr(dispatch, "_triton_impl", fake_impl)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "interpreter_ready", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return calls


def merge_args(dtype=torch.float32, size_grad=False):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, generator=gen).to(dtype)
    size = torch.ones(2, 5).requires_grad_(size_grad)
    pos = torch.rand(2, 5, 3, generator=gen)
    dst = torch.tensor([[0, 1, 0, 2, 1], [0, 0, 1, 2, 2]])
    return x, size, pos, dst, 3


def call_all(backend=None, dtype=torch.float32):
    x, size, pos, dst, m = merge_args(dtype)
    out = merge_tokens(x, size, pos, dst, m, backend=backend)
    unmerge_tokens(out[0], dst, backend=backend)
    a = torch.nn.functional.normalize(torch.randn(2, 4, 3), dim=-1).to(dtype)
    best_match(a, a.flip(1), backend=backend)


def fake(device):
    return SimpleNamespace(device=torch.device(device))


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")
@pytest.mark.parametrize("devices,supported,want", [
    pytest.param(["cuda"], True, "triton", id="cuda"),
    pytest.param(["cuda", "cuda"], False, "torch", id="cuda-unsupported"),
    pytest.param(["cpu"], True, "torch", id="cpu"),
    pytest.param(["cuda", "cpu"], True, "torch", id="mixed"),
    pytest.param(["meta"], True, "torch", id="meta"),
])
def test_auto_picks_triton_only_for_supported_cuda_tensors(monkeypatch, devices, supported, want):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(*map(fake, devices), None, supported=supported) == want


def test_auto_on_cpu_runs_the_reference(spy):
    x, size, pos, dst, m = merge_args()
    got = merge_tokens(x, size, pos, dst, m)
    for g, w in zip(got, reference.merge_tokens(x, size, pos, dst, m)):
        assert torch.equal(g, w)
    call_all()
    assert spy == []


@pytest.mark.parametrize("how", ["argument", "env"])
def test_forcing_triton_reaches_every_kernel(spy, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv(ENV_VAR, "triton")
    call_all(backend="triton" if how == "argument" else None)
    assert spy == ["merge_tokens", "unmerge_tokens", "best_match"]


def test_argument_beats_environment(spy, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "triton")
    call_all(backend="torch")
    assert spy == []
    monkeypatch.setenv(ENV_VAR, "torch")
    call_all(backend="triton")
    assert len(spy) == 3
    assert resolve_backend(fake("cuda"), backend="torch") == "torch"


def test_unsupported_inputs_fall_back_to_the_reference(spy):
    # fp64 matching has no kernel; a size that needs a gradient needs the reference's autograd
    a = torch.randn(1, 3, 4, dtype=torch.float64)
    got = best_match(a, a, backend="triton")
    want = reference.best_match(a, a)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    x, size, pos, dst, m = merge_args(size_grad=True)
    out = merge_tokens(x, size, pos, dst, m, backend="triton")
    out[1].sum().backward()
    assert size.grad is not None
    y = torch.zeros(1, 2, 3, dtype=torch.bool)
    assert torch.equal(unmerge_tokens(y, torch.tensor([[0, 1, 1]]), backend="triton"), torch.zeros(1, 3, 3, dtype=torch.bool))
    empty = torch.empty(1, 0, 4)
    assert best_match(empty, a.float(), backend="triton")[1].shape == (1, 0)
    assert spy == []


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, size, pos, dst, m = merge_args()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1") as err:
        merge_tokens(x, size, pos, dst, m, backend="triton")
    assert "backend='triton'" in str(err.value) and f"{ENV_VAR}=auto or torch" in str(err.value)
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=triton forces"):
        best_match(x, x)


def test_triton_missing(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert resolve_backend(fake("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="triton is not installed"):
        resolve_backend(fake("cuda"), backend="triton")


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of auto, triton, torch"):
        merge_tokens(*merge_args(), backend="cuda")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ENV_VAR} must be one of"):
        best_match(torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    assert BACKENDS == ("auto", "triton", "torch")


def test_bad_inputs_name_the_argument(spy):
    x, size, pos, dst, m = merge_args()
    with pytest.raises(TypeError, match="dst must be an int64"):
        merge_tokens(x, size, pos, dst.int(), m)
    with pytest.raises(ValueError, match="size must have shape"):
        merge_tokens(x, size[:, :4], pos, dst, m)
    with pytest.raises(TypeError, match="num_out must be an int"):
        merge_tokens(x, size, pos, dst, 3.0)
    with pytest.raises(ValueError, match="b must have shape"):
        best_match(x, x[..., :2])
    with pytest.raises(TypeError, match="b_valid must be a bool"):
        best_match(x, x, torch.ones(2, 5))
    # out-of-range slots would be skipped by the kernels: refused where checking is free
    with pytest.raises(ValueError, match=r"dst must hold slot indices in \[0, 3\)"):
        merge_tokens(x, size, pos, dst + 1, m, backend="triton")
    with pytest.raises(ValueError, match=r"dst must hold slot indices in \[0, 2\)"):
        unmerge_tokens(x[:, :2], dst, backend="triton")
    assert spy == []


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "auto"])
def test_reference_path_names_the_argument_too(spy, backend):
    # The reference would fail inside scatter_add / gather / matmul / argmax with a bare RuntimeError
    # or IndexError; the entry points refuse the same inputs first, whatever the backend.
    x, size, pos, dst, m = merge_args()
    with pytest.raises(ValueError, match=r"dst must hold slot indices in \[0, 3\)"):
        merge_tokens(x, size, pos, dst + 1, m, backend=backend)
    with pytest.raises(ValueError, match=r"dst must hold slot indices in \[0, 3\)"):
        merge_tokens(x, size, pos, dst - 1, m, backend=backend)
    with pytest.raises(ValueError, match=r"dst must hold slot indices in \[0, 2\)"):
        unmerge_tokens(x[:, :2], dst, backend=backend)
    with pytest.raises(TypeError, match="b must have a's dtype torch.float32"):
        best_match(x, x.double(), backend=backend)
    with pytest.raises(TypeError, match="a must be a floating-point tensor"):
        best_match(dst[..., None], dst[..., None], backend=backend)
    with pytest.raises(ValueError, match="b must have at least one row"):
        best_match(x, x[:, :0], backend=backend)
    # mixed devices ('meta' stands in for a GPU): refused by name, never moved silently
    with pytest.raises(ValueError, match=r"pos must be on the device of x \(cpu\), got meta"):
        merge_tokens(x, size, pos.to("meta"), dst, m, backend=backend)
    with pytest.raises(ValueError, match=r"dst must be on the device of y \(cpu\), got meta"):
        unmerge_tokens(x[:, :3], dst.to("meta"), backend=backend)
    with pytest.raises(ValueError, match=r"b_valid must be on the device of a \(cpu\), got meta"):
        best_match(x, x, torch.ones(2, 5, dtype=torch.bool, device="meta"), backend=backend)
    assert spy == []


def test_entry_points_keep_the_reference_signatures():
    for name in ("merge_tokens", "unmerge_tokens", "best_match"):
        ours = inspect.signature(getattr(dispatch, name)).parameters
        spec = inspect.signature(getattr(reference, name)).parameters
        assert list(ours)[: len(spec)] == list(spec), name
        assert [p.default for p in list(ours.values())[: len(spec)]] == [p.default for p in spec.values()], name
        assert ours["backend"].kind is inspect.Parameter.KEYWORD_ONLY and ours["backend"].default is None


FRESH_PROCESS = r'''
import json, os, sys
import torch
import vlmcompress.kernels as k
out = {"triton_imported_by_package": "triton" in sys.modules}
x, size, pos = torch.randn(1, 3, 2), torch.ones(1, 3), torch.zeros(1, 3, 3)
dst = torch.tensor([[0, 0, 1]])
try:
    k.merge_tokens(x, size, pos, dst, 2)
    out["forced"] = "no error"
except RuntimeError as e:
    out["forced"] = str(e)
import triton  # as transformers does, before the variable is set
os.environ["TRITON_INTERPRET"] = "1"
try:
    k.merge_tokens(x, size, pos, dst, 2)
    out["late"] = "no error"
except RuntimeError as e:
    out["late"] = str(e)
print(json.dumps(out))
'''


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")
def test_fresh_process_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[ENV_VAR] = "triton"
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["triton_imported_by_package"] is False
    assert "TRITON_INTERPRET=1" in out["forced"] and f"{ENV_VAR}=triton" in out["forced"]
    assert "imported before TRITON_INTERPRET=1" in out["late"]
