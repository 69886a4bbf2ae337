"""``vlmcompress-eval``: what each compression setting costs a model, against the unpatched model.

    vlmcompress-eval --model synth-onevision --keep 0.25 0.1 --out eval-out
    vlmcompress-eval --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --data my.jsonl --settings uniform-pool@0.1 prompt-pool@0.1

Writes ``<out>/eval.{csv,json,md,png}`` and prints the table.
"""
from __future__ import annotations

import argparse
import sys

from .dataset import DatasetError, jsonl_items, synthetic_items
from .methods import METHODS, default_settings

__all__ = ["main"]

PROG = "vlmcompress-eval"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="shipped model name (synth-onevision, synth-qwen2-vl), hub id, local folder, or "
                        "tiny-random:<family>; default: the shipped synth-onevision")
    p.add_argument("--clip", default="auto",
                   help="relevance scorer for prompt-pool: 'auto' (the shipped synth-clip if installed), 'none', "
                        "or an open_clip local folder")
    data = p.add_argument_group("dataset")
    data.add_argument("--data", help="JSONL of {video|image, question, answer(s)} (default: the synthetic benchmark)")
    data.add_argument("--tasks", nargs="+", help="synthetic tasks (default: all)")
    data.add_argument("--per-task", type=int, default=20, help="synthetic items per task")
    data.add_argument("--frames", type=int, default=16, help="frames per video")
    sets = p.add_argument_group("settings")
    sets.add_argument("--settings", nargs="+", metavar="SETTING",
                      help=f"explicit settings: 'method@keep' (methods: {', '.join(METHODS)}) or 'preset:<name>'")
    sets.add_argument("--keep", nargs="+", type=float, default=[0.5, 0.25, 0.1, 0.05],
                      help="kept fractions for the default method list (ignored with --settings)")
    run = p.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-new-tokens", type=int, default=4)
    run.add_argument("--seed", type=int, default=0, help="seed of the random-drop baseline")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--out", default="eval-out", help="output folder")
    run.add_argument("--no-plot", action="store_true")
    return p


def _load_model(name: str | None, device: str | None):
    from .. import models

    if name is None:
        if models.DEFAULT not in models.available():
            raise ValueError(f"the shipped model {models.DEFAULT} is not installed; pass --model")
        name = models.DEFAULT
    if name in models.names("vlm"):
        return models.load(name, device=device or "cpu")
    from ..demo.runner import load

    return load(name, device=device)


def _load_scorer(spec: str):
    from .. import models

    if spec == "none":
        return None
    if spec == "auto":
        return models.relevance_scorer() if "synth-clip" in models.available("clip") else None
    if spec in models.names("clip"):
        return models.relevance_scorer(spec)
    from ..relevance import ClipRelevanceScorer

    return ClipRelevanceScorer.from_pretrained(spec)


def _supports_stage_a(model) -> bool:
    """Whether this model's adapter merges inside the vision tower (stage A); patching is refused otherwise."""
    import vlmcompress as vc

    try:
        vc.patch(model, vc.CompressionConfig(vision_keep=0.5))
    except (ValueError, NotImplementedError):
        return False
    finally:
        if vc.is_patched(model):
            vc.unpatch(model)
    return True


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name in ("per_task", "frames", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            print(f"{PROG}: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        items = (jsonl_items(args.data, frames=args.frames) if args.data
                 else synthetic_items(args.tasks, per_task=args.per_task, frames=args.frames))
    except (DatasetError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    try:
        scorer = _load_scorer(args.clip)
        model, processor = _load_model(args.model, args.device)
    except (OSError, ValueError, ImportError) as e:
        print(f"{PROG}: could not load: {e}", file=sys.stderr)
        return 2
    settings = args.settings or default_settings(tuple(args.keep), scorer=scorer, stage_a=_supports_stage_a(model))
    from .runner import evaluate

    try:
        result = evaluate(model, processor, items, settings, scorer=scorer, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, progress=True)
    except (ValueError, TypeError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing written", file=sys.stderr)
        return 130
    paths = result.write(args.out, plot=not args.no_plot)
    print(result.table())
    print("\nwritten: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
