"""Batch video captioning: every video in a folder (or the files given) → one JSON line each.

    vlmcompress-caption videos/ --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf --preset balanced -o captions.jsonl

A video that fails to decode is reported in its line (``"error"``) and the run goes on; lines already
in the output file are skipped, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

import vlmcompress as vc
from vlmcompress.config import PRESETS

from .runner import TINY_PREFIX, ask, load_for_command

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}


def find_videos(paths: list[Path]) -> list[Path]:
    """Files as given, folders searched recursively for video suffixes; sorted, without duplicates."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found.extend(f for f in sorted(p.rglob("*")) if f.suffix.lower() in VIDEO_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return list(dict.fromkeys(found))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vlmcompress-caption", description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", type=Path, help="video files or folders")
    p.add_argument("-o", "--output", type=Path, default=Path("captions.jsonl"))
    p.add_argument("--model", default=TINY_PREFIX + "llava_onevision",
                   help="hub id, local folder, or tiny-random:<family> (offline, random weights)")
    p.add_argument("--prompt", default="Describe this video in detail.")
    p.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    args = p.parse_args(argv)
    if args.frames < 1 or args.max_new_tokens < 1:
        p.error("--frames and --max-new-tokens must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlmcompress.video import read_video

    try:
        videos = find_videos(args.inputs)
    except FileNotFoundError as e:
        print(f"vlmcompress-caption: {e}", file=sys.stderr)
        return 2
    done = set()
    if args.output.exists():
        for line in args.output.read_text().splitlines():
            if line.strip():
                done.add(json.loads(line)["video"])
    todo = [v for v in videos if str(v) not in done]
    if not todo:
        print(f"nothing to do: {len(videos)} videos, all in {args.output}")
        return 0
    loaded = load_for_command("vlmcompress-caption", args.model, device=args.device)
    if loaded is None:
        return 2
    model, processor = loaded
    config = vc.CompressionConfig.preset(args.preset)
    failures = 0
    with args.output.open("a") as out:
        for video in tqdm(todo, desc="captioning", unit="video"):
            row = {"video": str(video), "model": args.model, "preset": args.preset}
            try:
                clip = read_video(video, num_frames=args.frames)
                fps = clip.sampled_fps
                answer = ask(model, processor, clip.frames, args.prompt, fps=fps, config=config,
                             max_new_tokens=args.max_new_tokens)
                row.update(caption=answer.text, seconds=round(answer.seconds, 3),
                           visual_tokens=answer.report.visual_before, visual_tokens_kept=answer.report.visual_after)
            except (ValueError, RuntimeError, OSError) as e:
                failures += 1
                row["error"] = f"{type(e).__name__}: {e}"
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(f"wrote {len(todo)} lines to {args.output} ({failures} failed)")
    return 1 if failures == len(todo) else 0


if __name__ == "__main__":
    sys.exit(main())
