"""Batch captioning benchmark: videos/min of ``vlmcompress-caption``'s engines, and decode memory.

Usage:
    python -P benchmarks/captioning.py                 # ~10 min on 2 busy CPU cores (the 60-min video takes most)
    python -P benchmarks/captioning.py --quick         # 8 videos, 4 frames; 1- and 10-min videos
    python -P benchmarks/captioning.py --model synth-onevision --videos 32

Part 1, throughput: the same ``--videos`` generated clips (640x360, 30 fps, 4 s, H.264) captioned with
one model (default: the shipped ``synth-onevision`` when installed, else ``tiny-random:llava_onevision``),
``--frames`` frames each, preset ``balanced``, greedy, ``--max-new-tokens``:

    batch 1             one video at a time, decoded in turn (the old command)
    batch 1 + bg decode the next videos decode in 2 background threads while the model works
    batch N             N videos per ``generate()`` (left padding), decoded in turn
    batch N + bg decode both
    ray, 2 workers      ``--engine ray``: local Ray Data, 2 model replicas, batch N, bg decoding

Timed: the captioning loop only, after the model is loaded and one warm-up batch, best of ``--rounds``
rounds over all settings in alternating order (for Ray: one run, from
submitting the dataset to the last record, so it includes starting the 2 actors and loading their
models; the table says so). Every run writes the same records (checked: same captions as batch 1).

Part 2, decode memory: peak RSS of decoding 16 frames from 1-, 10- and 60-minute videos (1280x720 at
0.2 fps: ``--long-size``, ``--long-fps``; the rate keeps an hour cheap to make and does not change what
16 samples cost) and from a 4000x3000 video (the issue's case), in a fresh process each, at the source
size and with ``--resize 384`` (decord scales inside the decoder), above the RSS after imports.

Rows are appended to ``benchmarks/results/captioning.csv``; the table is printed in Markdown.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "captioning.csv"
FIELDS = ["date", "machine", "cpus", "torch", "transformers", "decord", "ray", "part", "model", "setting", "videos",
          "frames", "batch_size", "decode_workers", "workers", "seconds", "videos_per_min", "speedup",
          "video_minutes", "resize", "decoded_size", "peak_rss_mb", "decode_s", "same_captions", "note"]


def ffmpeg(*args) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *map(str, args)], check=True)


def make_clips(root: Path, n: int) -> list[Path]:
    base = root / "clip0.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30", "-t", 4, "-c:v", "libx264", "-preset", "veryfast",
           "-pix_fmt", "yuv420p", base)
    clips = [base]
    for i in range(1, n):
        # copies with distinct mtimes: distinct videos to the resume key, no re-encoding time
        p = root / f"clip{i}.mp4"
        p.write_bytes(base.read_bytes())
        os.utime(p, (1e9 + i, 1e9 + i))
        clips.append(p)
    return clips


def throughput(args, clips: list[Path]) -> list[dict]:
    import torch

    from vlmcompress import CompressionConfig
    from vlmcompress.demo.captioning.decode import Sampling
    from vlmcompress.demo.captioning.engine import Captioner, load_model
    from vlmcompress.demo.captioning.inputs import expand
    from vlmcompress.demo.captioning.job import Job, caption_items

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))   # leave a core for the decoder threads
    job = Job(model=args.model, prompt="Describe this video.", sampling=Sampling(frames=args.frames, resize="auto"),
              config=CompressionConfig.preset("balanced"), max_new_tokens=args.max_new_tokens)
    model, processor = load_model(args.model)
    job.resolve_resize(processor)
    captioner = Captioner(model, processor, job.config, job.prompt, max_new_tokens=job.max_new_tokens)
    items = expand([str(c) for c in clips])
    caption_items(job, captioner, items[:args.batch], batch_size=args.batch, decode_workers=0, emit=lambda r: None)
    settings = [("batch 1", 1, 0), ("batch 1 + bg decode", 1, 2), (f"batch {args.batch}", args.batch, 0),
                (f"batch {args.batch} + bg decode", args.batch, 2)]
    captions, best = {}, {}
    # Rounds over all settings, alternating the order, best time of each: on a shared machine a load
    # spike then hits every setting alike instead of whichever ran during it.
    for r in range(args.rounds):
        for name, batch, workers in (settings if r % 2 == 0 else settings[::-1]):
            records: list[dict] = []
            start = time.perf_counter()
            caption_items(job, captioner, items, batch_size=batch, decode_workers=workers, emit=records.append)
            seconds = time.perf_counter() - start
            captions[name] = [rec["caption"] for rec in sorted(records, key=lambda rec: rec["video"])]
            best[name] = min(best.get(name, seconds), seconds)
            print(f"  round {r + 1}, {name}: {seconds:.1f} s", flush=True)
    rows = [dict(part="throughput", setting=name, batch_size=batch, decode_workers=workers, workers=1,
                 seconds=round(best[name], 2), videos=len(items), same_captions=captions[name] == captions["batch 1"],
                 note=f"best of {args.rounds} rounds; model loaded before timing")
            for name, batch, workers in settings]
    if not args.no_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print("  ray: not installed, skipped (pip install 'vlmcompress[ray]')")
        else:
            from vlmcompress.demo.captioning.ray_engine import run_ray

            from vlmcompress.demo.captioning.engine import ModelError

            records = []
            start = time.perf_counter()
            try:
                run_ray(job, items, emit=records.append, should_stop=lambda: False, address=None, workers=2,
                        batch_size=args.batch, decode_workers=2, gpus_per_worker=0, warn=print)
            except ModelError as e:                  # e.g. Ray's start-up timing out on a loaded machine
                print(f"  ray, 2 workers: failed: {e}", flush=True)
            else:
                seconds = time.perf_counter() - start
                same = [r["caption"] for r in sorted(records, key=lambda r: r["video"])] == captions["batch 1"]
                rows.append(dict(part="throughput", setting="ray, 2 workers", batch_size=args.batch, decode_workers=2,
                                 workers=2, seconds=round(seconds, 2), videos=len(items), same_captions=same,
                                 note="includes starting Ray and loading 2 model replicas"))
                print(f"  ray, 2 workers: {seconds:.1f} s", flush=True)
    base = rows[0]["seconds"]
    for r in rows:
        r["videos_per_min"] = round(r["videos"] / r["seconds"] * 60, 1)
        r["speedup"] = round(base / r["seconds"], 2)
        r["frames"] = args.frames
    return rows


_DECODE_CHILD = """
import json, sys
from vlmcompress.testing.bench import status_kb
from vlmcompress.demo.captioning.decode import Sampling, decode, parse_resize
import decord
before = status_kb("VmRSS")
d = decode(sys.argv[1], Sampling(frames=16, resize=parse_resize(sys.argv[2])))
print(json.dumps({"peak_mb": (status_kb("VmHWM") - before) / 1024, "seconds": d.seconds, "size": list(d.size)}))
"""


def _decode_row(video: Path, resize: str, minutes: float, source: str) -> dict:
    out = subprocess.run([sys.executable, "-P", "-c", _DECODE_CHILD, str(video), resize], check=True,
                         capture_output=True, text=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    print(f"  {source}, {minutes} min, resize {resize}: {res['peak_mb']:.0f} MB, {res['seconds']:.2f} s", flush=True)
    return dict(part="decode", setting=f"{source}, {minutes} min, resize {resize}", video_minutes=minutes,
                resize=resize, decoded_size="x".join(map(str, res["size"])), peak_rss_mb=round(res["peak_mb"], 1),
                decode_s=round(res["seconds"], 2), frames=16, note=f"{source} source")


def decode_memory(args, root: Path) -> list[dict]:
    rows = []
    # A sparse frame rate keeps making an hour of video cheap: sampling 16 frames decodes from the
    # keyframe before each sample, so memory depends on the frame size, not on the rate or the length.
    fps = args.long_fps
    for minutes in args.lengths:
        video = root / f"long{minutes}.mp4"
        t = time.perf_counter()
        ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={args.long_size}:rate={fps}", "-t", minutes * 60, "-c:v",
               "libx264", "-preset", "ultrafast", "-g", 10, "-pix_fmt", "yuv420p", video)
        print(f"  made a {minutes}-min video in {time.perf_counter() - t:.0f} s", flush=True)
        for resize in ("none", "384"):
            rows.append(_decode_row(video, resize, minutes, f"{args.long_size} at {fps:g} fps"))
        video.unlink()
    if args.huge:
        # the case: 16 frames of a 4000x3000 video
        video = root / "huge.mp4"
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=4000x3000:rate=1", "-t", 16, "-c:v", "libx264", "-preset",
               "ultrafast", "-g", 4, "-pix_fmt", "yuv420p", video)
        for resize in ("none", "384"):
            rows.append(_decode_row(video, resize, round(16 / 60, 2), "4000x3000 at 1 fps"))
    return rows


def main(argv=None) -> int:
    from vlmcompress import models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="default: synth-onevision if installed, else tiny-random:llava_onevision")
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lengths", default="1,10,60", help="video lengths in minutes for the decode-memory part")
    p.add_argument("--long-size", default="1280x720", help="size of the long videos (decode-memory part)")
    p.add_argument("--long-fps", type=float, default=0.2, help="frame rate of the long videos")
    p.add_argument("--no-huge", dest="huge", action="store_false", help="skip the 4000x3000 video")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds over the local settings (best of)")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--skip", choices=("throughput", "decode"), default=None)
    p.add_argument("--quick", action="store_true", help="8 videos, 4 frames; 1- and 10-minute videos")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.videos, args.lengths, args.frames = 8, "1,10", 4
    args.lengths = [int(v) for v in args.lengths.split(",")]
    if args.model is None:
        args.model = models.DEFAULT if models.DEFAULT in models.available() else "tiny-random:llava_onevision"

    import decord
    import torch
    import transformers

    from vlmcompress.testing.bench import append_csv, machine

    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = ""
    common = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  cpus=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
                  decord=decord.__version__, ray=ray_version, model=args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.skip != "throughput":
            print(f"throughput: {args.videos} clips, {args.model}", flush=True)
            rows += throughput(args, make_clips(root, args.videos))
        if args.skip != "decode":
            print("decode memory", flush=True)
            rows += decode_memory(args, root)
    rows = [{**common, **r} for r in rows]
    print(f"\nmodel {args.model}, {args.frames} frames/video, preset balanced, batch {args.batch}; "
          f"{common['machine']}, torch {common['torch']}\n")
    tp = [r for r in rows if r["part"] == "throughput"]
    if tp:
        print("| engine | videos/min | speed-up | same captions as batch 1 | note |")
        print("|---|---:|---:|---|---|")
        for r in tp:
            print(f"| {r['setting']} | {r['videos_per_min']} | {r['speedup']}x | {'yes' if r['same_captions'] else 'no'} "
                  f"| {r['note']} |")
    dec = [r for r in rows if r["part"] == "decode"]
    if dec:
        print("\n| source | length | --resize | decoded size | decode peak RSS (MB) | decode s |")
        print("|---|---:|---|---|---:|---:|")
        for r in dec:
            print(f"| {r['note']} | {r['video_minutes']} min | {r['resize']} | {r['decoded_size']} | {r['peak_rss_mb']} "
                  f"| {r['decode_s']} |")
    if not args.no_csv:
        n = append_csv(RESULTS, FIELDS, [{k: r.get(k, "") for k in FIELDS} for r in rows])
        print(f"\nappended {n} rows to {RESULTS.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
