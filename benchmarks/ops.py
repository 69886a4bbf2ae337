"""Operator benchmark: ToMe matching + merge (full score matrix vs blocked) and temporal merging.

Usage:
    python benchmarks/ops.py                 # default, about 2 minutes on 2 CPU cores
    python benchmarks/ops.py --frames 8 32 128 256 --repeats 5 --video-repeats 3 --block-size 256
    python benchmarks/ops.py --no-video --frames 8 --no-csv      # quick look (~20 s)
    python benchmarks/ops.py --device cuda   # GPU: time with synchronisation, memory from the allocator

How memory is measured (honestly, and why this way):
    Each operator/size runs in a fresh subprocess, so one case's allocator state cannot hide another's.
    On the CPU, tracemalloc does not see torch and torch keeps no CPU allocator statistics, so the
    child resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``) right before a
    step and reports ``VmHWM - VmRSS(before)`` from ``/proc/self/status``: the peak resident memory the
    step added on top of what was already live (inputs, plan). While measuring, glibc's mmap threshold
    is pinned to 128 KiB (``mallopt``) so every large buffer is a fresh mapping that the peak sees,
    never freed heap memory reused silently. Page granularity and library buffers make this accurate
    to about a megabyte. On CUDA it is ``max_memory_allocated - memory_allocated``. Memory is taken
    from the first (cold) run after a small warm-up.

How time is measured: after the memory runs, the threshold goes back to 32 MiB (glibc's steady
    state), and full and blocked runs alternate, ``--repeats`` times each; the table gives the median
    wall time and, in brackets, the median CPU time of the process (all threads). On a shared box the
    CPU time is the fairer ratio: wall time also counts time the scheduler gave to other processes.

Columns: ``match`` is planning (normalisation + best match + selection, what ``block_size`` changes),
``merge`` applies the plan to ``x``, ``size`` and ``pos`` through ``vlmcompress.kernels.merge_tokens``.
Ratios are only compared within one run (DESIGN.md §5).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from vlmcompress.testing.bench import append_csv, machine as _machine, mallopt as _mallopt, status_kb as _status_kb

RESULTS = Path(__file__).resolve().parent / "results" / "ops.csv"
FIELDS = ["date", "machine", "device", "torch", "threads", "op", "tokens", "channels", "frames", "removed",
          "block_size", "dtype", "match_ms", "match_cpu_ms", "merge_ms", "merge_cpu_ms", "match_extra_mb",
          "merge_extra_mb", "input_mb"]


# --- child: one operator at one size, full and blocked ------------------------------------------


class _Meter:
    """Peak extra memory of one step: CUDA allocator peak, or the kernel's reset-able peak RSS."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS") * 1024

    def stop(self) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        return (_status_kb("VmHWM") * 1024 - self.base) / 2 ** 20


def run_case(case: dict) -> dict:
    """Memory (cold, pinned allocator) then times (warm, alternating full/blocked) of one operator."""
    import torch

    from vlmcompress.merge import bipartite_soft_matching, temporal_matching
    from vlmcompress.state import TokenState

    torch.manual_seed(0)
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device, dtype = case["device"], getattr(torch, case["dtype"])
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    frames, tokens, channels = case["frames"], case["tokens"], case["channels"]
    per_frame = tokens // frames

    def plan_fn(x, block):
        if case["op"] == "tome":
            return bipartite_soft_matching(x, case["removed"], block_size=block)
        return temporal_matching(x, frames, budget=case["budget"], block_size=block)

    # Video-like features: one shared frame plus noise, so temporal matches are meaningful.
    x = torch.randn(1, tokens, channels, device=device, dtype=dtype)
    if frames > 1:
        x = x.view(1, frames, per_frame, channels).mul_(0.5).add_(x[:, :per_frame].clone().view(1, 1, per_frame, channels)).view(1, tokens, channels)
    state = TokenState.from_features(x, (frames, 1, per_frame))
    blocks = [None, case["block_size"]]

    # Warm-up at a small size: thread pools and BLAS buffers are not the operator's memory.
    small = x[:, :2 * per_frame if frames > 1 else 64].contiguous()
    small_state = TokenState.from_features(small, (2, 1, per_frame) if frames > 1 else None)
    for block in blocks:
        if case["op"] == "tome":
            bipartite_soft_matching(small, 16, block_size=block).merge(small_state)
        else:
            temporal_matching(small, 2, budget=1, block_size=block).merge(small_state)

    out = {}
    meter = _Meter(device)
    _mallopt(128 * 1024)
    for block in blocks:
        meter.start()
        plan = plan_fn(x, block)
        match_mb = meter.stop()
        meter.start()
        merged = plan.merge(state)
        merge_mb = meter.stop()
        if merged.num_tokens != tokens - case["removed"]:
            raise AssertionError(f"expected {tokens - case['removed']} tokens, got {merged.num_tokens}")
        out[str(block)] = dict(match_extra_mb=match_mb, merge_extra_mb=merge_mb, plan=plan)
        del merged
    if not torch.equal(out["None"]["plan"].dst, out[str(case["block_size"])]["plan"].dst):
        raise AssertionError("blocked and full plans differ")

    _mallopt(32 * 2 ** 20)
    samples = {str(b): {k: [] for k in ("match_ms", "match_cpu_ms", "merge_ms", "merge_cpu_ms")} for b in blocks}
    for _ in range(case["repeats"]):
        for block in blocks:                           # alternate, so load changes hit both alike
            s = samples[str(block)]
            for name, fn in (("match", lambda: plan_fn(x, block)), ("merge", lambda: out[str(block)]["plan"].merge(state))):
                sync()
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                sync()
                s[name + "_ms"].append((time.perf_counter() - w0) * 1e3)
                s[name + "_cpu_ms"].append((time.process_time() - c0) * 1e3)
    result = {}
    for block in blocks:
        key = str(block)
        result[key] = {k: statistics.median(v) for k, v in samples[key].items()}
        result[key].update(match_extra_mb=out[key]["match_extra_mb"], merge_extra_mb=out[key]["merge_extra_mb"])
    return dict(results=result, input_mb=x.numel() * x.element_size() / 2 ** 20,
                threads=torch.get_num_threads(), torch=torch.__version__)


# --- parent: cases, table, CSV ---------------------------------------------------------------------


def _cases(args) -> list[dict]:
    common = dict(channels=args.channels, dtype=args.dtype, device=args.device, block_size=args.block_size,
                  threads=args.threads)
    cases = []
    image, video = args.image_tokens, 32 * args.frame_tokens
    cases.append(dict(common, op="tome", label="image", tokens=image, frames=1, removed=image // 2,
                      repeats=args.repeats * 5))
    if not args.no_video:
        cases.append(dict(common, op="tome", label="video 32x729" if args.frame_tokens == 729 else "video 32 frames",
                          tokens=video, frames=1, removed=video // 2, repeats=args.video_repeats))
    for frames in args.frames:
        budget = args.frame_tokens // 2
        cases.append(dict(common, op="temporal", label=f"{frames} frames", block_size=args.temporal_block_size, tokens=frames * args.frame_tokens,
                          frames=frames, budget=budget, removed=(frames - 1) * budget,
                          # about the same time per case: more runs for short videos, one at 128 frames
                          repeats=min(10, max(1, round(args.repeats * 32 / frames)))))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)          # internal: run one case in this process
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--channels", type=int, default=1152)
    p.add_argument("--image-tokens", type=int, default=576)
    p.add_argument("--frame-tokens", type=int, default=729, help="tokens per video frame (SigLIP 27x27)")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 32, 128], help="temporal merging frame counts")
    p.add_argument("--block-size", type=int, default=512, help="ToMe block size (A rows per score tile)")
    p.add_argument("--temporal-block-size", type=int, default=4 * 729,
                   help="temporal block size: A rows per tile, i.e. block // tokens-per-frame frame pairs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per path (image: 5x this; temporal: this x 32 / frames, 1 to 10)")
    p.add_argument("--video-repeats", type=int, default=1, help="timed runs per path for the 23,328-token case")
    p.add_argument("--no-video", action="store_true", help="skip the 23,328-token ToMe case")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0

    rows, now, machine = [], dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), _machine(args.device)
    for case in _cases(args):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"case {case['op']} {case['label']} failed")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        for block, r in res["results"].items():
            row = dict(date=now, machine=machine, device=args.device, torch=res["torch"], threads=res["threads"],
                       op=case["op"], tokens=case["tokens"], channels=case["channels"], frames=case["frames"],
                       removed=case["removed"], block_size="full" if block == "None" else block, dtype=case["dtype"],
                       input_mb=round(res["input_mb"], 2), **{k: round(v, 2) for k, v in r.items()})
            rows.append((case["label"], row))
        print(f"  done: {case['op']} {case['label']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    _print_table(rows, machine, args)
    if not args.no_csv:
        print(f"\nappended {append_csv(RESULTS, FIELDS, (r for _, r in rows))} rows to {RESULTS}")
    return 0


def _print_table(rows, machine, args) -> None:
    r0 = rows[0][1]
    print(f"\n{machine}, torch {r0['torch']}, {r0['threads']} threads, {args.dtype}, C={args.channels}, "
          f"load average {os.getloadavg()[0]:.1f}; "
          "median wall ms (CPU ms in brackets: robust to other load on the box)\n")
    print("| op | case | tokens | removed | block | match ms | merge ms | match extra MB | merge extra MB "
          "| input MB | CPU time vs full | ms / frame |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    full = {}
    for label, r in rows:
        key = (r["op"], label)
        cpu = r["match_cpu_ms"] + r["merge_cpu_ms"]
        if r["block_size"] == "full":
            full[key] = cpu
        per_frame = f"{(r['match_ms'] + r['merge_ms']) / r['frames']:.1f}" if r["op"] == "temporal" else ""
        print(f"| {r['op']} | {label} | {r['tokens']} | {r['removed']} | {r['block_size']} "
              f"| {r['match_ms']:.1f} ({r['match_cpu_ms']:.0f}) | {r['merge_ms']:.1f} ({r['merge_cpu_ms']:.0f}) "
              f"| {r['match_extra_mb']:.1f} | {r['merge_extra_mb']:.1f} | {r['input_mb']:.0f} "
              f"| {cpu / full[key]:.2f}x | {per_frame} |")


if __name__ == "__main__":
    raise SystemExit(main())
