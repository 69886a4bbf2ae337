"""What compression costs in accuracy: the shipped task-trained models on the held-out synthetic set.

For each shipped VLM and each video length, every method and both baselines at kept fractions
0.5 / 0.25 / 0.1 / 0.05, against the unpatched model on the same items and frames; then the V2PE
measurement (the OneVision model was trained on ≤ 16 frames: accuracy at 64 and 128 frames with δ = 1
against δ < 1, nothing merged).

    python -P benchmarks/fidelity.py                       # everything (~40 min on 2 CPU cores)
    python -P benchmarks/fidelity.py --quick               # plumbing check: 2 items per task, 2 keeps

Writes ``benchmarks/results/fidelity/<model>-<frames>f.{csv,json,md,png}`` and appends the mean rows
to ``benchmarks/results/fidelity.csv``; prints Markdown tables for the README.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch

import vlmcompress as vc
from vlmcompress.evaluation import evaluate, synthetic_items
from vlmcompress.testing.bench import append_csv, machine

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["random-drop", "uniform-pool", "merge", "temporal+uniform-pool", "prompt-pool", "temporal+prompt-pool"]
CSV_FIELDS = ["date", "machine", "model", "frames", "items", "setting", "method", "keep", "kept_fraction", "accuracy",
              "retained", "agreement", "kl", "needle", "digit", "total_x", "torch"]


def _stage_a(model, scorer) -> bool:
    """Whether stage A combines with prompt-guided pooling on this model (Qwen's merged tower leaves no grid)."""
    from vlmcompress.steps import PromptGuidedPool

    if scorer is None:
        return False
    try:
        vc.patch(model, vc.CompressionConfig.from_steps(PromptGuidedPool(keep_ratio=0.5, relevance=scorer), vision_keep=0.5))
        return True
    except (ValueError, NotImplementedError):
        return False
    finally:
        if vc.is_patched(model):
            vc.unpatch(model)


def _settings(keeps, stage_a: bool) -> list[str]:
    methods = METHODS + (["tome-tower+prompt-pool"] if stage_a else [])
    return ["none"] + [f"{m}@{k:g}" for k in keeps for m in methods]


def _rows(result, name: str, frames: int, n_items: int) -> list[dict]:
    rows = []
    for label in result.settings:
        m = result.row(label)
        rows.append(dict(date=dt.date.today().isoformat(), machine=machine(), model=name, frames=frames, items=n_items,
                         setting=label, method=m["method"], keep=m["keep"], kept_fraction=round(m["kept_fraction"], 4),
                         accuracy=round(m["accuracy"], 4), retained=round(m["retained"], 4),
                         agreement=round(m["agreement"], 4), kl=round(m["kl"], 5),
                         needle=round(result.row(label, "needle")["accuracy"], 4),
                         digit=round(result.row(label, "digit")["accuracy"], 4),
                         total_x=round(m["total_x"], 3), torch=torch.__version__))
    return rows


def best_table(result, keeps) -> str:
    """Per kept fraction: the best vlmcompress method vs the two baselines (accuracy retained, mean / needle / digit)."""
    lines = ["| kept | best method | retained (mean) | needle | digit | random drop | uniform pool |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    none = result.row("none")
    for k in keeps:
        ours = [s for s in result.settings if s.endswith(f"@{k:g}") and not s.startswith(("random-drop", "uniform-pool"))]
        best = max(ours, key=lambda s: result.row(s)["retained"])
        cell = lambda s, t="mean": f"{result.row(s, t)['accuracy'] / max(result.row('none', t)['accuracy'], 1e-9):.0%}"
        lines.append(f"| {k:g} | {best} | {cell(best)} | {cell(best, 'needle')} | {cell(best, 'digit')} | "
                     f"{cell(f'random-drop@{k:g}')} | {cell(f'uniform-pool@{k:g}')} |")
    lines.append(f"\nUncompressed accuracy: mean {none['accuracy']:.2f}; " +
                 ", ".join(f"{t} {result.row('none', t)['accuracy']:.2f}" for t in result.tasks))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=vc.models.names("vlm"))
    p.add_argument("--frames", nargs="+", type=int, default=[16, 64])
    p.add_argument("--per-task", type=int, default=20, help="items per task at 16 frames")
    p.add_argument("--per-task-long", type=int, default=10, help="items per task at more than 16 frames")
    p.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.1, 0.05])
    p.add_argument("--v2pe-frames", nargs="+", type=int, default=[64, 128])
    p.add_argument("--v2pe-deltas", nargs="+", type=float, default=[0.5, 0.25, 0.125])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "fidelity"))
    args = p.parse_args(argv)
    if args.quick:
        args.per_task, args.per_task_long, args.keeps, args.frames, args.v2pe_frames = 2, 2, [0.25, 0.1], [16], [64]
    missing = [m for m in args.models if m not in vc.models.available()]
    if missing:
        print(f"shipped models not installed: {missing}; train them first (README)", file=sys.stderr)
        return 2
    scorer = vc.models.relevance_scorer() if "synth-clip" in vc.models.available("clip") else None
    if scorer is None:
        print("synth-clip not installed: prompt-guided methods are left out", file=sys.stderr)
    torch.manual_seed(0)
    for name in args.models:
        model, processor = vc.models.load(name)
        settings = _settings(args.keeps, _stage_a(model, scorer))
        if scorer is None:
            settings = [s for s in settings if "prompt" not in s]
        for frames in args.frames:
            per_task = args.per_task if frames <= 16 else args.per_task_long
            items = synthetic_items(per_task=per_task, frames=frames)
            result = evaluate(model, processor, items, settings, scorer=scorer, batch_size=args.batch_size,
                              max_new_tokens=3, progress=True)
            result.write(args.out, stem=f"{name}-{frames}f")
            append_csv(RESULTS / "fidelity.csv", CSV_FIELDS, _rows(result, name, frames, len(items)))
            print(f"\n### {name}, {frames} frames, {len(items)} items\n\n{result.table()}\n\n{best_table(result, args.keeps)}\n",
                  flush=True)
        if model.config.model_type == "llava_onevision":  # trained with the V2PE δ-mix
            for frames in args.v2pe_frames:
                items = synthetic_items(per_task=args.per_task_long, frames=frames)
                result = evaluate(model, processor, items, [f"v2pe@{d:g}" for d in args.v2pe_deltas],
                                  batch_size=max(1, args.batch_size // 2), max_new_tokens=3, progress=True)
                result.write(args.out, stem=f"{name}-v2pe-{frames}f")
                append_csv(RESULTS / "fidelity.csv", CSV_FIELDS, _rows(result, name, frames, len(items)))
                print(f"\n### V2PE: {name}, {frames} frames (trained on ≤ 16), {len(items)} items\n\n"
                      f"{result.table()}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
