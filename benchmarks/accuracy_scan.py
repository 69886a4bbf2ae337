"""Accuracy of the task-trained tiny models under the configs the end-to-end settings were chosen from.

Usage:
    python -P benchmarks/accuracy_scan.py --model synth-qwen2-vl --per-task 24 --start 0
    python -P benchmarks/accuracy_scan.py --model synth-onevision --only "A 0.5 + skip" preset

Every config is run through ``benchmarks/e2e.py``'s accuracy function (the shipped model of
``vlmcompress.models``, ``vlmcompress.synthetic``'s test split, 16 frames, 4 new tokens, greedy, the first
word against the answer), on items ``--start .. --start + --per-task - 1`` of every task. The settings of
``benchmarks/e2e.py`` marked ``LLM PA`` were chosen from this scan on items 0-23; e2e reports its accuracy on
items 48-71, which the choice never saw. ``LLM PA`` is ``llm_proportional_attention=True``; ``T x`` is
``TemporalMerge(threshold=x)``; ``skip`` is ``FrameSkip(threshold=0.05)``; ``A x`` is ``vision_keep=x``.
Rows are appended to ``benchmarks/results/accuracy_scan.csv``.
"""
from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

import torch

from vlmcompress.testing.bench import append_csv, csv_row, load_script, machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "accuracy_scan.csv"
TASKS = ("colour", "shape", "direction", "count", "needle", "digit", "order")
FIELDS = ["date", "machine", "model", "frames", "start", "per_task", "setting", "accuracy", *TASKS]


def configs() -> dict:
    """Setting name -> zero-argument config factory (``None``: the unpatched model)."""
    from vlmcompress.config import CompressionConfig as C
    from vlmcompress.frame_skip import FrameSkip
    from vlmcompress.steps import PromptGuidedPool, TemporalMerge

    skip, pa = FrameSkip(threshold=0.05), dict(llm_proportional_attention=True)
    out = {"none": None, "skip": lambda: C.from_steps(skip)}
    for flag, extra in (("", {}), (", LLM PA", pa)):
        out[f"skip + T 0.9{flag}"] = lambda e=extra: C.from_steps(skip, TemporalMerge(threshold=0.9), **e)
        for keep in (0.9, 0.75, 0.6, 0.5):
            out[f"A {keep} + skip{flag}"] = lambda k=keep, e=extra: C.from_steps(skip, vision_keep=k, **e)
            for t in (0.9, 0.8):
                out[f"A {keep} + skip + T {t}{flag}"] = lambda k=keep, t=t, e=extra: C.from_steps(
                    skip, TemporalMerge(threshold=t), vision_keep=k, **e)
        out[f"skip + B 0.5{flag}"] = lambda e=extra: C.from_steps(skip, PromptGuidedPool(keep_ratio=0.5), **e)
        for preset in ("light", "balanced", "aggressive"):
            out[f"preset {preset}{flag}"] = lambda p=preset, e=extra: C.preset(p, **e)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="synth-qwen2-vl", choices=["synth-qwen2-vl", "synth-onevision"])
    p.add_argument("--per-task", type=int, default=24)
    p.add_argument("--start", type=int, default=0, help="first test item of every task")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--only", nargs="+", help="only settings whose name contains one of these (plus none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    e2e = load_script(HERE / "e2e.py", "_benchmarks_e2e")
    family = next(f for f, name in e2e.TRAINED.items() if name == args.model)
    acc_args = argparse.Namespace(accuracy_per_task=args.per_task, accuracy_frames=args.frames,
                                  accuracy_start=args.start)
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    print(f"{args.model}: items {args.start}-{args.start + args.per_task - 1} of every task, {args.frames} frames")
    print("| setting | accuracy | " + " | ".join(TASKS) + " |\n|---|---:|" + "---:|" * len(TASKS))
    for name, make in configs().items():
        if args.only and name != "none" and not any(o in name for o in args.only):
            continue
        per_task = e2e.per_task_accuracy(family, e2e.Setting(name, make), acc_args)
        total = sum(per_task.values()) / len(per_task)
        print(f"| {name} | {total:.3f} | " + " | ".join(f"{per_task[t]:.2f}" for t in TASKS) + " |", flush=True)
        rows.append(dict(date=date, machine=machine(), model=args.model, frames=args.frames, start=args.start,
                         per_task=args.per_task, setting=name, accuracy=total, **per_task))
    if not args.no_csv:
        written = append_csv(RESULTS, FIELDS, (csv_row(r, FIELDS) for r in rows))
        print(f"\nappended {written} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
