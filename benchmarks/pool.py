"""Prompt-guided pooling benchmark: cost of relevance weighting over plain adaptive average pooling.

Usage:
    python benchmarks/pool.py                    # default, well under a minute on 2 CPU cores
    python benchmarks/pool.py --channels 3584 --repeats 10 --device cuda

For each grid, the output grid is ``grid_for_budget(grid, budget)``; ``kernel`` is the longest window
per axis. Columns (median of ``--repeats``
warm runs, milliseconds):

- ``avg_pool3d``: ``torch.nn.functional.adaptive_avg_pool3d`` to the same output grid on a contiguous
  ``[B, C, T, H, W]`` tensor, the raw operator with no bookkeeping (the floor; its windows are ours
  where the axes divide, and overlap by one position elsewhere);
- ``pool_none``: ``prompt_guided_pool`` without relevance (window means plus size/pos/source work);
- ``pool_rel``: ``prompt_guided_pool`` with a relevance map (tau 0.01);
- ``resize``: ``resize_relevance`` from a CLIP ViT-B/16 grid (``T×14×14``) to the VLM grid.

Only ratios within one run are compared (DESIGN.md §5).
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmcompress.pool import grid_for_budget, prompt_guided_pool
from vlmcompress.relevance import resize_relevance
from vlmcompress.state import TokenState
from vlmcompress.testing.bench import append_csv, machine as _machine

RESULTS = Path(__file__).resolve().parent / "results" / "pool.csv"
FIELDS = ["date", "machine", "device", "torch", "threads", "grid", "out_grid", "kernel", "channels", "dtype",
          "avg_pool3d_ms", "pool_none_ms", "pool_rel_ms", "resize_ms", "rel_over_avg"]
# A LLaVA-1.5-like image, 2×2 spatial pooling of a video, and two video budgets.
# (label, grid, budget, keep_time)
CASES = [
    ("image 24x24 -> 144", (1, 24, 24), 144, False),
    ("video 8x24x24 2x2", (8, 24, 24), 8 * 144, True),
    ("video 16x24x24 -> 1024", (16, 24, 24), 1024, False),
    ("video 32x27x27 -> 2048", (32, 27, 27), 2048, False),
]


def _timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--channels", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    machine = _machine(device)
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, grid, budget, keep_time in CASES:
        out_grid = grid_for_budget(grid, budget, keep_time=keep_time)
        n, c = math.prod(grid), args.channels
        x = torch.randn(1, n, c, generator=g).to(device, dtype)
        state = TokenState.from_features(x, grid)
        rel = torch.softmax(torch.randn(1, n, generator=g) * 3, -1).to(device)
        ks = [-(-i // o) for i, o in zip(grid, out_grid)]
        x_cf = x.reshape(1, *grid, c).permute(0, 4, 1, 2, 3).contiguous().float()
        clip_grid = (grid[0], 14, 14)
        clip_rel = torch.softmax(torch.randn(1, math.prod(clip_grid), generator=g), -1).to(device)
        res = dict(
            avg_pool3d_ms=_timed(lambda: F.adaptive_avg_pool3d(x_cf, out_grid), args.repeats, sync),
            pool_none_ms=_timed(lambda: prompt_guided_pool(state, grid, out_grid), args.repeats, sync),
            pool_rel_ms=_timed(lambda: prompt_guided_pool(state, grid, out_grid, rel), args.repeats, sync),
            resize_ms=_timed(lambda: resize_relevance(clip_rel, clip_grid, grid), args.repeats, sync),
        )
        row = dict(date=now, machine=machine, device=device, torch=torch.__version__, threads=torch.get_num_threads(),
                   grid="x".join(map(str, grid)), out_grid="x".join(map(str, out_grid)), kernel="x".join(map(str, ks)),
                   channels=c, dtype=args.dtype, **{k: round(v, 2) for k, v in res.items()},
                   rel_over_avg=round(res["pool_rel_ms"] / res["avg_pool3d_ms"], 2))
        rows.append((label, row))

    head = f"{'case':<24}{'out grid':>10}{'kernel':>9}{'avg_pool3d':>12}{'pool none':>11}{'pool rel':>10}{'resize':>9}{'rel/avg':>9}"
    print(f"{machine}, torch {torch.__version__}, {args.device}, {args.dtype}, C={args.channels}, ms (median of {args.repeats})")
    print(head)
    for label, r in rows:
        print(f"{label:<24}{r['out_grid']:>10}{r['kernel']:>9}{r['avg_pool3d_ms']:>12.2f}{r['pool_none_ms']:>11.2f}"
              f"{r['pool_rel_ms']:>10.2f}{r['resize_ms']:>9.2f}{r['rel_over_avg']:>9.2f}")
    if not args.no_csv:
        print(f"appended {append_csv(RESULTS, FIELDS, (r for _, r in rows))} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
