"""The main job: ask a VLM about a video twice, unpatched and compressed, and show what changed.

    python -m vlmcompress.demo                              # the web demo's 2-minute example, shipped model
    python -m vlmcompress.demo --video clip.mp4 --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \
        --question "What happens?" --preset balanced
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import vlmcompress as vc
from vlmcompress.config import PRESETS

from .runner import TINY_PREFIX, ask, default_model, load_for_command


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmcompress.demo", description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, help="a video file; default: the web demo's example, a 2-minute "
                   "synthetic video with one coloured flash (generated on first use; needs ffmpeg)")
    p.add_argument("--model", default=default_model(),
                   help="a shipped model (synth-onevision), hub id, local folder, or tiny-random:<family> "
                        "(offline, random weights); default: the shipped model when installed, else tiny-random")
    p.add_argument("--question", default=None, help="default: the example's question (What colour was the flash?)")
    p.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    p.add_argument("--frames", type=int, default=16, help="frames sampled uniformly from the video")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlmcompress.video import read_video

    video, question = args.video, args.question
    if video is None:
        from .app import DemoError, example_video

        try:
            ex = example_video()
        except DemoError as e:
            print(f"vlmcompress.demo: {e}", file=sys.stderr)
            return 2
        video, question = Path(ex.path), question or ex.question
        print(f"example {ex.name}: {ex.description}; the answer is {ex.answer}")
    question = question or "What is happening in this video?"
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
    base = ask(model, processor, clip.frames, question, fps=fps, config=None,
               max_new_tokens=args.max_new_tokens)
    comp = ask(model, processor, clip.frames, question, fps=fps, config=config,
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
