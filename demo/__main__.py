"""The main job: ask a VLM about a video twice, unpatched and compressed, and show what changed.

    python -m vlmcompress.demo                              # generated video, tiny random model
    python -m vlmcompress.demo --video clip.mp4 --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \
        --question "What happens?" --preset balanced
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import vlmcompress as vc
from vlmcompress.config import PRESETS

from .runner import TINY_PREFIX, ask, load_for_command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmcompress.demo", description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, help="a video file; default: a generated 16-frame clip (needs ffmpeg)")
    p.add_argument("--model", default=TINY_PREFIX + "llava_onevision",
                   help="hub id, local folder, or tiny-random:<family> (offline, random weights)")
    p.add_argument("--question", default="What is moving in this video?")
    p.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly from the video")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlmcompress.video import read_video

    with tempfile.TemporaryDirectory() as tmp:
        video = args.video
        if video is None:
            from vlmcompress.testing.video import make_test_video

            video = make_test_video(Path(tmp) / "demo.mp4", frames=args.frames, size=(96, 96), fps=8)
            print(f"generated {video.name}: {args.frames} frames of a square moving over a static background")
        try:
            clip = read_video(video, num_frames=args.frames)
        except (OSError, ValueError) as e:                      # missing or undecodable file
            print(f"vlmcompress.demo: could not read video {str(video)!r}: {e}", file=sys.stderr)
            return 2
        fps = clip.sampled_fps
        loaded = load_for_command("vlmcompress.demo", args.model, device=args.device)
        if loaded is None:
            return 2
        model, processor = loaded
        config = vc.CompressionConfig.preset(args.preset)
        base = ask(model, processor, clip.frames, args.question, fps=fps, config=None,
                   max_new_tokens=args.max_new_tokens)
        comp = ask(model, processor, clip.frames, args.question, fps=fps, config=config,
                   max_new_tokens=args.max_new_tokens)
    r = comp.report
    print(f"\nmodel {args.model}, {clip.num_frames} frames, preset {args.preset!r}: {config}")
    print(r.summary())
    print("\n| run | visual tokens | prefill tokens | seconds | answer |")
    print("|---|---:|---:|---:|---|")
    print(f"| unpatched | {r.visual_before} | {r.prefill_before[0]} | {base.seconds:.3f} | {base.text[:60]!r} |")
    print(f"| {args.preset} | {r.visual_after} | {r.prefill_after[0]} | {comp.seconds:.3f} | {comp.text[:60]!r} |")
    if args.model.startswith(TINY_PREFIX):
        print("\n(tiny-random weights: the answers are gibberish; the token counts and the pipeline are real)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
