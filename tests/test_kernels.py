"""Triton kernels against their PyTorch references (kernels/reference.py is the spec).

On a machine without CUDA the kernels run under the Triton interpreter on CPU tensors. Triton decides
compiled vs interpreted when ``triton`` is first imported, so TRITON_INTERPRET=1 is set here before
anything below imports it. When the whole suite runs in one process, an earlier test file may already
have imported triton (``transformers`` does); then the in-process tests skip and
``test_kernels_in_fresh_process`` runs this file again in a subprocess with the variable set.
Shapes stay tiny: the interpreter costs roughly programs x ops.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first import of triton

pytest.importorskip("triton")

from vlmcompress.kernels import best_match, merge_tokens, reference, unmerge_tokens  # noqa: E402
from vlmcompress.kernels.dispatch import interpreter_ready  # noqa: E402

IN_PROCESS = DEVICE == "cuda" or interpreter_ready()
if IN_PROCESS:
    from vlmcompress.kernels.match import best_match_triton
    from vlmcompress.kernels.merge import merge_tokens_triton
    from vlmcompress.kernels.unmerge import unmerge_tokens_triton

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)]


@pytest.fixture(autouse=True)
def _needs_kernels(request):
    if not IN_PROCESS and request.node.originalname != "test_kernels_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_kernels_in_fresh_process runs these")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # everything ran there except this test itself
    assert re.search(r"\b\d+ passed, 1 skipped\b", run.stdout.splitlines()[-1]), run.stdout[-2000:]


COMPILE_FOR_SM90 = r"""
import sys
import triton
import triton.language as tl
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)
from vlmcompress.kernels import match, merge, unmerge

def build(fn, types, consts):
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    print("compiled", fn.__name__)

build(merge._segment_sum_kernel,
      dict(p_x="*bf16", p_w="*bf16", p_pos="*fp32", p_order="*i64", p_offsets="*i64", p_out="*bf16",
           p_wout="*fp32", p_pout="*fp32"),
      dict(WEIGHTED=True, NORMALIZE=True, HAS_POS=True, ACC=tl.float32, PACC=tl.float32, BLOCK_S=4, BLOCK_C=512))
build(unmerge._gather_kernel,
      dict(p_y="*bf16", p_dst="*i64", p_w="*bf16", p_wout="*fp32", p_out="*bf16"),
      dict(WEIGHTED=True, ACC=tl.float32, BLOCK_N=4, BLOCK_C=512))
build(match._best_match_kernel,
      dict(p_a="*bf16", p_b="*bf16", p_valid="*u8", p_score="*fp32", p_index="*i64"),
      dict(HAS_VALID=True, ROUND=True, IN_DTYPE=tl.bfloat16, PRECISION="tf32", UPCAST=False,
           BLOCK_A=64, BLOCK_B=64, BLOCK_K=64, ONE_K=False))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the tests above compile and run the kernels")
def test_kernels_compile_for_sm90():
    """The interpreter never compiles: build the bf16 kernels for an H100/H200 (sm_90) with Triton's
    bundled ptxas, no GPU needed, to catch what only the compiler rejects."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode == 77:
        pytest.skip("this triton has no CUDA compiler backend")
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("compiled") == 3, run.stdout


def assert_close(name, got, want, tol):
    """fla-style check that names the tensor and its error."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * (1 + scale), f"{name}: max abs error {err:.3g} (scale {scale:.3g}) above tol {tol}"


def make_dst(bsz, n, m, gen, *, hot=False, protect_first=False):
    """``[B, N]`` int64 slot map in which every one of the ``m`` slots gets at least one token.

    ``hot``: all tokens but ``m - 1`` land in slot 0 (many sources, one destination).
    ``protect_first``: token 0 alone owns slot 0 (a CLS token that is never merged).
    """
    rows = []
    for _ in range(bsz):
        if hot:
            row = torch.zeros(n, dtype=torch.int64)
            row[torch.randperm(n, generator=gen)[: m - 1]] = torch.arange(1, m)
        elif protect_first:
            rest = torch.cat([torch.arange(1, m), torch.randint(1, m, (n - m,), generator=gen)])
            row = torch.cat([torch.zeros(1, dtype=torch.int64), rest[torch.randperm(n - 1, generator=gen)]])
        else:
            slots = torch.cat([torch.arange(m), torch.randint(0, m, (n - m,), generator=gen)])
            row = slots[torch.randperm(n, generator=gen)]
        rows.append(row)
    return torch.stack(rows).to(DEVICE)


# (B, N, C, M, kind, block_c): N odd, N = 2, C not a power of two, several channel blocks
MERGE_CASES = [
    pytest.param(2, 7, 5, 4, "random", None, id="B2-N7-C5-M4"),
    pytest.param(1, 9, 3, 2, "hot", None, id="B1-N9-C3-M2-hot"),
    pytest.param(1, 2, 4, 1, "random", None, id="B1-N2-C4-M1"),
    pytest.param(1, 2, 4, 2, "random", None, id="B1-N2-C4-M2"),
    pytest.param(2, 11, 37, 5, "protect_first", 16, id="B2-N11-C37-M5-cls-blockc16"),
]


def make_merge_inputs(bsz, n, c, m, kind, dtype, seed=0, pos_dtype=torch.float32, size_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, n, c, generator=gen).to(DEVICE, dtype)
    if size_dtype.is_floating_point:
        size = (0.5 + 3 * torch.rand(bsz, n, generator=gen)).to(DEVICE, size_dtype)
    else:
        size = torch.randint(1, 5, (bsz, n), generator=gen).to(DEVICE, size_dtype)
    pos = (10 * torch.rand(bsz, n, 3, generator=gen)).to(DEVICE, pos_dtype)
    dst = make_dst(bsz, n, m, gen, hot=kind == "hot", protect_first=kind == "protect_first")
    return x, size, pos, dst


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,n,c,m,kind,block_c", MERGE_CASES)
def test_merge_matches_reference(bsz, n, c, m, kind, block_c, dtype):
    pos_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, size, pos, dst = make_merge_inputs(bsz, n, c, m, kind, dtype, pos_dtype=pos_dtype)
    got = merge_tokens_triton(x, size, pos, dst, m, block_c=block_c)
    want = reference.merge_tokens(x, size, pos, dst, m)
    for name, g, w in zip(("x_out", "size_out", "pos_out"), got, want):
        assert_close(name, g, w, TOL[dtype] if name == "x_out" else TOL[pos_dtype])
    if kind == "protect_first":  # the protected token passes through unchanged
        assert_close("x_out[:, 0]", got[0][:, 0], x[:, 0], TOL[dtype])
        assert torch.equal(got[1][:, 0], size[:, 0])


def test_merge_integer_sizes_and_entry_point():
    x, size, pos, dst = make_merge_inputs(2, 9, 6, 3, "hot", torch.float32, seed=1, size_dtype=torch.int64)
    got = merge_tokens(x, size, pos, dst, 3, backend="triton")
    want = reference.merge_tokens(x, size, pos, dst, 3)
    assert torch.equal(got[1], want[1]) and got[1].dtype == torch.int64
    assert_close("x_out", got[0], want[0], TOL[torch.float32])
    assert_close("pos_out", got[2], want[2], TOL[torch.float32])


def test_merge_non_contiguous_features():
    x, size, pos, dst = make_merge_inputs(2, 7, 10, 4, "random", torch.float32, seed=2)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, channel stride != 1
    got = merge_tokens_triton(xt, size, pos, dst, 4)
    assert_close("x_out", got[0], reference.merge_tokens(x, size, pos, dst, 4)[0], TOL[torch.float32])


def test_non_contiguous_size_and_dst():
    # A transposed size and a dst expanded over the batch (stride 0: one plan for every sample) are
    # read as [B, N] row-major by the kernels unless the host makes them contiguous; on a GPU the
    # expanded dst was read past its storage.
    x, size, pos, _ = make_merge_inputs(3, 7, 5, 4, "random", torch.float32, seed=13)
    size_t = size.t().contiguous().t()
    dst = make_dst(1, 7, 4, torch.Generator().manual_seed(14)).expand(3, 7)
    assert not size_t.is_contiguous() and not dst.is_contiguous()
    want = reference.merge_tokens(x, size, pos, dst.contiguous(), 4)
    xi = x.clone().requires_grad_(True)
    got = merge_tokens_triton(xi, size_t, pos, dst, 4)
    for name, g, w in zip(("x_out", "size_out", "pos_out"), got, want):
        assert_close(name, g, w, TOL[torch.float32])
    g_out = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(15)).to(DEVICE)
    got[0].backward(g_out)
    xr = x.clone().requires_grad_(True)
    reference.merge_tokens(xr, size, pos, dst.contiguous(), 4)[0].backward(g_out)
    assert_close("grad_x", xi.grad, xr.grad, TOL[torch.float32])
    y = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    assert torch.equal(unmerge_tokens_triton(y, dst), reference.unmerge_tokens(y, dst))


@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.int64, id="int64")])
@pytest.mark.parametrize("bsz,n,c,m,kind,block_c", MERGE_CASES)
def test_unmerge_matches_reference(bsz, n, c, m, kind, block_c, dtype):
    gen = torch.Generator().manual_seed(3)
    y = (10 * torch.randn(bsz, m, c, generator=gen)).to(DEVICE, dtype)
    dst = make_dst(bsz, n, m, gen, hot=kind == "hot", protect_first=kind == "protect_first")
    got = unmerge_tokens_triton(y, dst, block_c=block_c)
    assert torch.equal(got, reference.unmerge_tokens(y, dst))  # a gather is exact


# --- gradients ----------------------------------------------------------------------------------------

def test_merge_gradcheck_fp64():
    x, size, pos, dst = make_merge_inputs(2, 7, 3, 3, "hot", torch.float64, seed=4, pos_dtype=torch.float64)
    x.requires_grad_(True)
    pos.requires_grad_(True)
    def merged(x_, p_):  # size_out is not differentiable on this path
        x_out, _, pos_out = merge_tokens_triton(x_, size, p_, dst, 3, block_c=16)
        return x_out, pos_out

    assert torch.autograd.gradcheck(merged, (x, pos), fast_mode=True)


def test_unmerge_gradcheck_fp64():
    gen = torch.Generator().manual_seed(5)
    y = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64).to(DEVICE).requires_grad_(True)
    dst = make_dst(2, 7, 3, gen, hot=True)
    assert torch.autograd.gradcheck(lambda y_: unmerge_tokens_triton(y_, dst), (y,), fast_mode=True)


@pytest.mark.parametrize("dtype", DTYPES[:3])
def test_merge_gradients_match_reference(dtype):
    x, size, pos, dst = make_merge_inputs(2, 9, 6, 4, "protect_first", dtype, seed=6)
    gen = torch.Generator().manual_seed(7)
    g_x = torch.randn(2, 4, 6, generator=gen).to(DEVICE, dtype)
    g_pos = torch.randn(2, 4, 3, generator=gen).to(DEVICE)
    grads = []
    for fn in (merge_tokens_triton, reference.merge_tokens):
        xi, pi = x.clone().requires_grad_(True), pos.clone().requires_grad_(True)
        out = fn(xi, size, pi, dst, 4)
        torch.autograd.backward([out[0], out[2]], [g_x, g_pos])
        grads.append((xi.grad, pi.grad))
    assert_close("grad_x", grads[0][0], grads[1][0], TOL[dtype])
    assert_close("grad_pos", grads[0][1], grads[1][1], TOL[torch.float32])


def test_merge_size_output_has_no_gradient():
    x, size, pos, dst = make_merge_inputs(1, 5, 4, 2, "random", torch.float32, seed=8)
    out = merge_tokens_triton(x.requires_grad_(True), size, pos, dst, 2)
    assert out[0].requires_grad and not out[1].requires_grad


# --- matching -----------------------------------------------------------------------------------------

def unit(*shape, gen):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)


def clear_rows(a, b, b_valid, margin):
    """Rows of ``a`` whose best and second-best valid scores (fp64) differ by more than ``margin``."""
    sim = a @ b.transpose(1, 2)
    if b_valid is not None:
        sim = sim.masked_fill(~b_valid.cpu().unsqueeze(1), float("-inf"))
    top = sim.topk(min(2, sim.shape[-1]), dim=-1).values
    if top.shape[-1] == 1:
        return torch.ones(top.shape[:2], dtype=torch.bool)
    return (top[..., 0] - top[..., 1]) > margin


# (B, Na, Nb, C, masked, block sizes): several tiles along Nb and along C
MATCH_CASES = [
    pytest.param(2, 7, 6, 5, False, {}, id="B2-Na7-Nb6-C5"),
    pytest.param(1, 1, 1, 3, False, {}, id="B1-Na1-Nb1-C3"),
    pytest.param(2, 9, 37, 40, False, dict(block_a=16, block_b=16, block_k=16), id="B2-Na9-Nb37-C40-tiled"),
    pytest.param(3, 5, 20, 8, True, dict(block_b=16), id="B3-Na5-Nb20-C8-masked"),
    pytest.param(2, 6, 37, 8, True, dict(block_b=16, splits=3), id="B2-Na6-Nb37-C8-masked-split3"),
]


@pytest.mark.parametrize("dtype", DTYPES[:3])
@pytest.mark.parametrize("bsz,na,nb,c,masked,blocks", MATCH_CASES)
def test_best_match_matches_reference(bsz, na, nb, c, masked, blocks, dtype):
    gen = torch.Generator().manual_seed(9)
    a64, b64 = unit(bsz, na, c, gen=gen), unit(bsz, nb, c, gen=gen)
    b_valid = None
    if masked:
        b_valid = torch.rand(bsz, nb, generator=gen) > 0.4
        b_valid[-1] = False  # one sample with no candidate at all: score -inf, index 0
        b_valid = b_valid.to(DEVICE)
    a, b = a64.to(DEVICE, dtype), b64.to(DEVICE, dtype)
    score, index = best_match_triton(a, b, b_valid, **blocks)
    want_score, want_index = reference.best_match(a, b, b_valid)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    assert torch.equal(torch.isinf(score), torch.isinf(want_score))
    finite = torch.isfinite(want_score)
    assert_close("score", score[finite], want_score[finite], TOL[dtype])
    # indices only where the best match is clear at this precision (no ties after rounding)
    clear = clear_rows(a64, b64, b_valid, margin=0.0 if dtype == torch.float32 else 0.02).to(DEVICE)
    assert clear[finite].float().mean() > 0.5, "test inputs too close to ties to say anything"
    check = clear | ~finite  # rows with no valid candidate: index 0 on both paths
    assert torch.equal(index[check], want_index[check])


def test_best_match_exact_ties_take_lowest_index():
    # Small-integer vectors: every score is exact, so duplicated rows of b tie exactly, inside one
    # tile (3 and 5) and across tiles and splits (3 and 20 with 16-row tiles).
    gen = torch.Generator().manual_seed(10)
    b = torch.randint(-1, 2, (1, 24, 16), generator=gen).float()
    b[0, 5] = b[0, 3]
    b[0, 20] = b[0, 3]
    a = torch.cat([b[:, 3:4], b[:, 20:21], torch.randint(-1, 2, (1, 3, 16), generator=gen).float()], 1)
    a, b = a.to(DEVICE), b.to(DEVICE)
    want_score, want_index = reference.best_match(a, b)
    assert want_index[0, 0].item() == 3 and want_index[0, 1].item() == 3
    for splits in (1, 2):  # with 2 splits, 3 and 20 are in different programs
        score, index = best_match_triton(a, b, block_b=16, splits=splits)
        assert torch.equal(index, want_index) and torch.equal(score, want_score), splits


def test_best_match_gradients_match_reference():
    gen = torch.Generator().manual_seed(11)
    a0, b0 = unit(2, 6, 8, gen=gen).float().to(DEVICE), unit(2, 9, 8, gen=gen).float().to(DEVICE)
    g = torch.randn(2, 6, generator=gen).to(DEVICE)
    grads = []
    for fn in (best_match_triton, reference.best_match):
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        score, index = fn(a, b)
        assert not index.requires_grad
        score.backward(g)
        grads.append((a.grad, b.grad))
    assert_close("grad_a", grads[0][0], grads[1][0], 1e-5)
    assert_close("grad_b", grads[0][1], grads[1][1], 1e-5)


def test_entry_points_forced_to_triton_agree_with_reference():
    gen = torch.Generator().manual_seed(12)
    a, b = unit(2, 5, 6, gen=gen).float().to(DEVICE), unit(2, 4, 6, gen=gen).float().to(DEVICE)
    got, want = best_match(a, b, backend="triton"), reference.best_match(a, b)
    assert torch.equal(got[1], want[1])
    y = torch.randn(2, 3, 5, generator=gen).to(DEVICE)
    dst = make_dst(2, 6, 3, gen)
    assert torch.equal(unmerge_tokens(y, dst, backend="triton"), reference.unmerge_tokens(y, dst))
