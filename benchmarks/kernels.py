"""Kernel benchmark: fused merge vs the PyTorch reference vs ToMe-style multi-op; tiled vs full matching.

Usage:
    python benchmarks/kernels.py            # CPU: the PyTorch paths only, about 2 minutes on 2 cores
    python benchmarks/kernels.py --quick    # small shapes, a smoke run
    python benchmarks/kernels.py --device cuda   # adds the Triton kernels (targets below)

Workloads (DESIGN.md §3.1, SigLIP-so400m geometry: 27x27 = 729 tokens of 1152 channels):
    frames:    B = 32 frames x N = 729 tokens, C = 1152, bf16 and fp32
    sequence:  B = 1 x N = 23,328 tokens (32 frames in one sequence), C = 1152
Merge removes ``r = N // 4`` tokens with one ToMe bipartite matching (sets A/B = even/odd tokens),
carrying x, size (in x's dtype, as TokenState does) and pos (fp32). Implementations:
    triton     vlmcompress.kernels.merge: one sorted-segment pass (GPU, or --device cpu --interpret)
    reference  vlmcompress.kernels.reference.merge_tokens: scatter_add on a dst map, fp32 accumulation
    tome       ToMe's merge_wavg: x*size, gather/scatter_reduce per tensor (x, size, pos), cat, divide
Matching scores every token of A against B and keeps max/argmax:
    triton     tiled kernel, no [Na, Nb] matrix
    full       reference with the whole [B, Na, Nb] score matrix
    blocked-K  reference scoring K = --match-block rows of A at a time (PyTorch's way to bound memory)
GPU targets: fused merge >= 2x faster than tome; tiled matching no slower than full, with peak memory
at N = 23,328 at least 10x below it.

Memory: the peak the call adds on top of its live inputs. CUDA: ``max_memory_allocated`` minus
``memory_allocated`` before. CPU (torch keeps no CPU allocator statistics): the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs``) before the call and ``VmHWM - VmRSS`` read after; glibc's
mmap threshold is pinned so freed buffers return to the OS instead of hiding in the heap. Outputs
count. Times: median (p20, p80) of warm runs; ratios are compared within one run only (DESIGN.md §5).
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from vlmcompress.testing.bench import append_csv, machine as _machine, status_kb as _status_kb

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.csv"
FIELDS = ["date", "machine", "device", "torch", "triton", "threads", "op", "workload", "B", "N", "C", "M",
          "dtype", "impl", "median_ms", "p20_ms", "p80_ms", "peak_mb", "speedup_vs_base", "mem_vs_base", "max_err"]


# --- the ToMe-style multi-op baseline ------------------------------------------------------------

def tome_plan(metric: torch.Tensor, r: int):
    """ToMe's bipartite soft matching (tome/merge.py): indices of unmerged and merged A tokens."""
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    return unm_idx, src_idx, dst_idx


def tome_merge_wavg(x, size, pos, unm_idx, src_idx, dst_idx, r):
    """ToMe's ``merge_wavg`` with pos carried too: several separate ops per tensor."""
    def merge(t):
        src, dst = t[:, ::2], t[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    s = size[..., None]
    x_m = merge(x * s)
    pos_m = merge(pos * s)
    s_m = merge(s)
    return x_m / s_m, s_m[..., 0], pos_m / s_m


def tome_dst(n: int, unm_idx, src_idx, dst_idx) -> torch.Tensor:
    """The same merge as a dst map in ToMe's output order [unmerged A..., B...]."""
    bsz, n_unm = unm_idx.shape[0], unm_idx.shape[1]
    n_b = n // 2
    dst = torch.empty(bsz, n, dtype=torch.int64, device=unm_idx.device)
    a_slot = torch.empty(bsz, (n + 1) // 2, dtype=torch.int64, device=unm_idx.device)
    a_slot.scatter_(1, unm_idx[..., 0], torch.arange(n_unm, device=unm_idx.device).expand(bsz, n_unm))
    a_slot.scatter_(1, src_idx[..., 0], n_unm + dst_idx[..., 0])
    dst[:, ::2] = a_slot
    dst[:, 1::2] = n_unm + torch.arange(n_b, device=unm_idx.device)
    return dst


# --- measuring -----------------------------------------------------------------------------------


class Meter:
    """Peak memory one call adds: CUDA allocator peak, or the reset-able peak RSS on the CPU."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        if not self.cuda:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: pinned, so big frees are returned
            self.trim = lambda: libc.malloc_trim(0)

    def __call__(self, fn):
        """``(output, peak MB, seconds)`` of one cold call."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() - base
        else:
            self.trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _status_kb("VmRSS") * 1024
            t0 = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t0
            peak = _status_kb("VmHWM") * 1024 - base
        return out, peak / 2**20, seconds


def timed(fn, device: str, repeats: int, first_s: float) -> tuple[float, float, float]:
    """(median, p20, p80) in ms of warm calls. A CPU call that took ``first_s`` > 2 s cold is
    compute-bound (one big GEMM): that call counts as a sample and one more is made."""
    if device == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=200)
        return med, p20, p80
    times = [first_s * 1e3] if first_s > 2 else []
    for _ in range(1 if first_s > 2 else repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def _max_err(got, want) -> float:
    return max((g.double() - w.double()).abs().max().item() for g, w in zip(got, want))


# --- workloads -----------------------------------------------------------------------------------

def workloads(args):
    frames = dict(workload="frames", B=args.frames, N=args.frame_tokens, C=args.channels)
    seq = dict(workload="sequence", B=1, N=args.frames * args.frame_tokens, C=args.channels)
    out = []
    for dtype in ("bfloat16", "float32"):
        out.append(dict(frames, op="merge", dtype=dtype))
        out.append(dict(seq, op="merge", dtype=dtype))
    for dtype in ("bfloat16", "float32"):
        out.append(dict(frames, op="match", dtype=dtype))
    # bf16 GEMMs run at ~8 GFLOP/s on these CPUs: the 313 GFLOP sequence match is fp32-only there
    for dtype in (("bfloat16", "float32") if args.device == "cuda" else ("float32",)):
        out.append(dict(seq, op="match", dtype=dtype))
    return out


def run_merge(w, args, use_triton):
    from vlmcompress.kernels import reference

    dev, dtype = args.device, getattr(torch, w["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    bsz, n, c = w["B"], w["N"], w["C"]
    r = n // 4
    x = torch.randn(bsz, n, c, generator=g).to(dev, dtype)
    size = (1 + torch.randint(0, 4, (bsz, n), generator=g)).to(dev, dtype)
    pos = torch.rand(bsz, n, 3, generator=g).to(dev)
    metric = torch.nn.functional.normalize(torch.randn(bsz, n, 64, generator=g), dim=-1).to(dev)
    plan = tome_plan(metric, r)
    dst = tome_dst(n, *plan)
    m = n - r
    impls = {  # the first one is the truth for max_err
        "reference": lambda: reference.merge_tokens(x, size, pos, dst, m),
        "tome": lambda: tome_merge_wavg(x, size, pos, *plan, r),
    }
    if use_triton:
        from vlmcompress.kernels.merge import merge_tokens_triton

        impls["triton"] = lambda: merge_tokens_triton(x, size, pos, dst, m)
    return m, impls, "tome"


def run_match(w, args, use_triton):
    from vlmcompress.kernels import reference

    dev, dtype = args.device, getattr(torch, w["dtype"])
    g = torch.Generator(device="cpu").manual_seed(1)
    bsz, n, c = w["B"], w["N"], w["C"]
    metric = torch.nn.functional.normalize(torch.randn(bsz, n, c, generator=g), dim=-1).to(dev, dtype)
    a, b = metric[:, ::2].contiguous(), metric[:, 1::2].contiguous()
    del metric
    impls = {
        "full": lambda: reference.best_match(a, b),
        f"blocked-{args.match_block}": lambda: reference.best_match(a, b, block_size=args.match_block),
    }
    if use_triton:
        from vlmcompress.kernels.match import best_match_triton

        impls["triton"] = lambda: best_match_triton(a, b)
    return b.shape[1], impls, "full"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--frame-tokens", type=int, default=729)
    p.add_argument("--channels", type=int, default=1152)
    p.add_argument("--match-block", type=int, default=256, help="rows of A per block for the blocked reference")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="4 frames of 64 tokens, 128 channels")
    p.add_argument("--only", choices=["merge", "match"], help="run one op")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.frame_tokens, args.channels = 4, 64, 128
    use_triton = args.device == "cuda"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        use_triton, triton_version = False, ""

    meter = Meter(args.device)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = _machine(args.device)
    rows = []
    for w in workloads(args):
        if args.only and w["op"] != args.only:
            continue
        t0 = time.perf_counter()
        m, impls, base = (run_merge if w["op"] == "merge" else run_match)(w, args, use_triton)
        results, want = {}, None
        for name, fn in impls.items():
            got, peak, first_s = meter(fn)  # cold: memory, and the warm-up
            want = got if want is None else want
            err = _max_err(got[:1], want[:1])
            if w["op"] == "match":
                err = max(err, float((got[1] != want[1]).float().mean()))  # share of differing indices
            del got
            results[name] = (*timed(fn, args.device, args.repeats, first_s), peak, err)
        for name, (med, p20, p80, peak, err) in results.items():
            rows.append(dict(
                date=now, machine=machine, device=args.device, torch=torch.__version__, triton=triton_version,
                threads=torch.get_num_threads(), op=w["op"], workload=w["workload"], B=w["B"], N=w["N"],
                C=w["C"], M=m, dtype=w["dtype"], impl=name, median_ms=round(med, 3), p20_ms=round(p20, 3),
                p80_ms=round(p80, 3), peak_mb=round(peak, 1),
                speedup_vs_base=round(results[base][0] / med, 2),
                mem_vs_base=round(peak / results[base][3], 3) if results[base][3] > 0 else "",
                max_err=f"{err:.2g}"))
        del impls, want
        print(f"  {w['op']} {w['workload']} {w['dtype']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    print(f"\n{machine}, torch {torch.__version__}, triton {triton_version or '-'}, {torch.get_num_threads()} threads, {now}\n")
    print("| op | workload | B×N×C → M (merge: kept tokens; match: Nb) | dtype | impl | median ms (p20–p80) | peak MB | speed vs base | mem vs base | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['op']} | {r['workload']} | {r['B']}×{r['N']}×{r['C']} → {r['M']} | {r['dtype']} | {r['impl']} | "
              f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f}) | {r['peak_mb']:.1f} | "
              f"{r['speedup_vs_base']:.2f}× | {r['mem_vs_base']} | {r['max_err']} |")
    print("\nbase: tome (merge), full (match). max err: merge = max |x_out - reference|; match = max |score - full| "
          "or the share of differing indices, whichever is larger.")
    if not args.no_csv:
        print(f"\nappended {append_csv(RESULTS, FIELDS, rows)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
