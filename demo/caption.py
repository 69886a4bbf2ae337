"""Batch video captioning: videos, folders, globs or list files → one JSON line per video.

    vlmcompress-caption videos/ -o captions.jsonl                       # the shipped default model
    vlmcompress-caption 'clips/**/*.mp4' @more.txt --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf \\
        --preset balanced --keep-ratio 0.2 --fps 1 --max-frames 32 --batch-size 4 -o captions.jsonl
    vlmcompress-caption videos/ --engine ray --workers 2 -o captions/     # Ray Data, one model per worker

Every video gets a record, also the ones that fail (``"status": "failed"`` and the reason); the run goes
on and exits with 1 when any failed. Re-running the same command resumes: records are keyed on the
resolved path, the file's size and mtime, the model, the settings and the prompt, so exactly the videos
not yet done with these settings are captioned (``--retry-failed`` tries failed ones again,
``--overwrite`` captions everything again). Ctrl-C (or SIGTERM) finishes the batch in hand and stops.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import sys
import time
import zlib

import vlmcompress as vc
from vlmcompress import models
from vlmcompress.config import _BUDGET_METHODS, PRESETS, CompressionConfig

from .captioning.decode import Sampling, parse_resize
from .captioning.engine import TINY_PREFIX, ModelError, check_device, resolve_model
from .captioning.inputs import expand
from .captioning.job import Job
from .captioning.records import OutputLocked, Store

PROG = "vlmcompress-caption"
EXIT_FAILED, EXIT_USAGE = 1, 2
RELEVANCE = ("none", "synth-clip", "tiny-clip")


def _field_help() -> dict[str, str]:
    """Each CompressionConfig field's description, from its docstring (one source of truth)."""
    doc = CompressionConfig.__doc__ or ""
    out, name = {}, None
    for line in doc.splitlines():
        m = re.match(r"^        (\w+): (.*)", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2)
        elif name and re.match(r"^            \S", line) and len(out[name]) < 160:
            out[name] += " " + line.strip()
        elif not line.startswith("            "):
            name = None
    return {k: v.replace("%", "%%") for k, v in out.items()}


_NONE = object()    # "--token-budget none": set the field to None (distinct from "not given")


def _optional(kind):
    def parse(text):
        if str(text).lower() == "none":
            return _NONE
        return kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_compression_flags(p: argparse.ArgumentParser) -> None:
    """One flag per CompressionConfig field (``--keep-ratio`` for ``keep_ratio``); each overrides the preset."""
    helps = _field_help()
    g = p.add_argument_group("compression (each flag overrides the preset's value)")
    for f in dataclasses.fields(CompressionConfig):
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "")
        kind = str(f.type)
        if f.name == "relevance":
            g.add_argument(flag, choices=RELEVANCE, default=None,
                           help="prompt-guided pooling scorer: none, synth-clip (the shipped trained CLIP) or "
                                "tiny-clip (random weights, for tests)")
        elif f.name == "steps":
            g.add_argument(flag, default=None, metavar="JSON",
                           help='stage B as a list of steps from vlmcompress.steps, replacing the preset\'s stage-B '
                                'fields, e.g. \'[{"step": "TemporalMerge", "threshold": 0.9}, {"step": "RandomDrop", '
                                '"keep_ratio": 0.25, "seed": 0}]\'')
        elif kind == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "budget_method":
            g.add_argument(flag, choices=_BUDGET_METHODS, default=None, help=text)
        elif kind.startswith(("float", "int")):
            base = float if kind.startswith("float") else int
            g.add_argument(flag, type=_optional(base) if "None" in kind else base, default=None,
                           metavar="NONE|" + base.__name__.upper() if "None" in kind else base.__name__.upper(),
                           help=text)
        # A field of a kind not handled here gets no flag (a test lists every field, so it is noticed);
        # the command must keep working for everything else meanwhile.


def build_config(args) -> CompressionConfig:
    overrides = {}
    for f in dataclasses.fields(CompressionConfig):
        value = getattr(args, f.name, None)
        if value is None:
            continue
        if f.name == "relevance":
            value = {"none": _NONE, "synth-clip": "synth-clip", "tiny-clip": "tiny-clip"}[value]
            if value == "synth-clip":
                value = models.relevance_scorer("synth-clip")
            elif value == "tiny-clip":
                value = vc.tiny_clip_scorer()
        if f.name == "steps":
            value = parse_steps(value)
        overrides[f.name] = None if value is _NONE else value
    if overrides.get("steps") is not None:
        # steps replace stage B: start from the preset's stage A/C only, then the flags given.
        from vlmcompress import config as config_module

        defaults = getattr(config_module, "_STAGE_B_DEFAULTS", {})
        overrides = {**defaults, **overrides}
    return CompressionConfig.preset(args.preset, **overrides)


def parse_steps(text: str) -> tuple:
    """``--steps`` JSON → a tuple of ``vlmcompress.steps`` objects."""
    import json

    from vlmcompress import steps as steps_module

    try:
        spec = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--steps must be a JSON list, e.g. '[{{\"step\": \"UniformPool\", \"keep_ratio\": 0.25}}]': {e}")
    if not isinstance(spec, list) or not all(isinstance(s, dict) and isinstance(s.get("step"), str) for s in spec):
        raise ValueError('--steps must be a JSON list of objects, each with a "step" name, e.g. '
                         '[{"step": "UniformPool", "keep_ratio": 0.25}]')
    out = []
    for s in spec:
        kwargs = dict(s)
        name = kwargs.pop("step")
        cls = getattr(steps_module, name, None) if name in getattr(steps_module, "__all__", ()) else None
        if cls is None or name == "StepContext":
            known = [n for n in getattr(steps_module, "__all__", ()) if n[0].isupper() and n != "StepContext"]
            raise ValueError(f"--steps: unknown step {name!r}; steps are {known}")
        try:
            out.append(cls(**kwargs))
        except TypeError as e:
            raise ValueError(f"--steps: {name}: {e}") from None
    return tuple(out)


def _shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise argparse.ArgumentTypeError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v
    parse.__name__ = kind.__name__
    return parse


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text!r}")
    return v


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="video files, folders (searched recursively), quoted globs "
                   "('clips/**/*.mp4'), or @list.txt (one path a line)")
    p.add_argument("--files-from", action="append", default=[], metavar="LIST",
                   help="a file listing videos, one a line ('-': standard input); may repeat")
    p.add_argument("-o", "--output", default="captions.jsonl",
                   help="JSON-lines file; a folder (existing, or ending in /) for one shard file per run; "
                        "'-' for standard output (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help=f"shipped model ({', '.join(models.names('vlm'))}), hub id, local folder, or "
                        f"{TINY_PREFIX}<family> (random weights); default: {models.DEFAULT} when installed")
    p.add_argument("--prompt", default="Describe this video in detail.")
    p.add_argument("--max-new-tokens", type=_positive(int), default=96)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where the model loads)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))

    v = p.add_argument_group("video")
    v.add_argument("--frames", type=_positive(int), default=None,
                   help="frames sampled uniformly in time over the window (default: 16)")
    v.add_argument("--fps", type=_positive(float), default=None, help="or sample this many frames per second")
    v.add_argument("--max-frames", type=_positive(int), default=None, help="cap on the frames sampled")
    v.add_argument("--start", type=_seconds, default=0.0, help="window start in seconds")
    v.add_argument("--end", type=_seconds, default=None, help="window end in seconds (default: the end)")
    v.add_argument("--resize", default="auto",
                   help="decode size: auto (what the model's processor needs), none (source size), a shorter "
                        "side in px (384) or WxH (default: %(default)s)")

    c = p.add_argument_group("compression")
    c.add_argument("--preset", default="balanced", choices=sorted(PRESETS))
    add_compression_flags(p)

    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=_positive(int), default=1, help="videos per generate() (left-padded)")
    r.add_argument("--decode-workers", type=int, default=2,
                   help="threads decoding the next videos while the model works (0: decode in turn)")
    r.add_argument("--engine", choices=("local", "ray"), default="local")
    r.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster ('auto', 'ray://host:10001'); default: start a local Ray")
    r.add_argument("--workers", type=_positive(int), default=2, help="Ray: model replicas (default: %(default)s)")
    r.add_argument("--gpus-per-worker", type=float, default=None,
                   help="Ray: GPUs per replica (default: 1 when the cluster has GPUs, else 0)")
    r.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="caption only the I-th of N disjoint parts of the inputs (by path), for manual sharding")
    r.add_argument("--retry-failed", action="store_true", help="caption videos whose last record failed again")
    r.add_argument("--overwrite", action="store_true",
                   help="caption every video again, replacing its record for these settings")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--verbose", action="store_true", help="keep the decoder's (ffmpeg's) own messages")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.fps is not None and args.frames is not None:
        p.error("give --frames or --fps, not both")
    if args.fps is None and args.frames is None:
        args.frames = 16
    if args.end is not None and args.end <= args.start:
        p.error(f"--end ({args.end:g} s) must be after --start ({args.start:g} s)")
    try:
        args.resize_spec = parse_resize(args.resize)
        args.config = build_config(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    if not args.inputs and not args.files_from:
        p.error("give at least one video, folder, glob, @list.txt or --files-from")
    return args


class _Stop:
    """SIGINT/SIGTERM: the first asks the run to stop after the batch in hand; a second stops at once."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{PROG}: {signal.Signals(signum).name}: finishing the videos in hand, then stopping "
              "(again to stop at once)", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self):
        try:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:                          # not the main thread: signals stay as they are
            pass
        try:
            yield self
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool):
    """Send what C libraries write to file descriptor 2 (ffmpeg and decord print errors for every bad
    file, which breaks the progress bar) to /dev/null, while Python's ``sys.stderr`` keeps working."""
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        keep = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        real = sys.stderr.fileno() == 2
    except (OSError, ValueError, AttributeError):
        real = False                                # captured (pytest): sys.stderr is not fd 2
    saved_stream = sys.stderr
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    if real:
        sys.stderr = open(os.dup(keep), "w", buffering=1, closefd=True)
    try:
        yield
    finally:
        if real:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = saved_stream
        os.dup2(keep, 2)
        os.close(keep)


def _in_shard(path: str, shard) -> bool:
    return shard is None or zlib.crc32(path.encode()) % shard[1] == shard[0]


class _Tally:
    def __init__(self, bar):
        self.bar = bar
        self.done = self.failed = 0
        self.visual = self.visual_kept = 0
        self.start = time.perf_counter()

    def add(self, rec: dict) -> None:
        if rec["status"] == "done":
            self.done += 1
            self.visual += rec.get("visual_tokens") or 0
            self.visual_kept += rec.get("visual_tokens_kept") or 0
        else:
            self.failed += 1
        if self.bar is not None:
            minutes = (time.perf_counter() - self.start) / 60
            post = {"videos/min": f"{(self.done + self.failed) / max(minutes, 1e-9):.1f}", "failed": self.failed}
            if self.visual:
                post["tokens saved"] = f"{1 - self.visual_kept / self.visual:.0%}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)


def main(argv=None) -> int:
    args = parse_args(argv)
    warn = lambda msg: print(f"{PROG}: warning: {msg}", file=sys.stderr)   # noqa: E731
    try:
        model_name = resolve_model(args.model)
        check_device(args.device)
    except ModelError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.model is None:
        print(f"{PROG}: model: {model_name} (the shipped default)", file=sys.stderr)
    store = Store(args.output, warn=warn)
    try:
        store.check()
        store.lock()
    except (ValueError, OutputLocked) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _run(args, model_name, store, warn)
    finally:
        store.close()


def _run(args, model_name: str, store: Store, warn) -> int:
    sampling = Sampling(frames=None if args.fps else args.frames, fps=args.fps, max_frames=args.max_frames,
                        start=args.start, end=args.end, resize=args.resize_spec)
    job = Job(model=model_name, prompt=args.prompt, sampling=sampling, config=args.config,
              max_new_tokens=args.max_new_tokens, dtype=args.dtype, preset=args.preset, device=args.device)
    items = [it for it in expand(args.inputs, args.files_from) if _in_shard(it.path, args.shard)]
    status = store.load()
    todo, done_before, failed_before = [], 0, 0
    for it in items:
        st = status.get(job.key(it))
        if st is None or args.overwrite or (st == "failed" and args.retry_failed):
            todo.append(it)
        elif st == "done":
            done_before += 1
        else:
            failed_before += 1
    again = {job.key(it) for it in todo if job.key(it) in status}
    if again:
        store.drop(again)                           # each video keeps exactly one record
    skipped = done_before + failed_before
    if not todo:
        _summary(args, _Tally(None), skipped, failed_before, interrupted=None)
        return 0

    from tqdm import tqdm

    from .captioning.job import caption_items

    tally = _Tally(None)
    stop = _Stop()

    def emit(rec):
        store.write(rec)
        tally.add(rec)

    store.open()
    try:
        with stop.installed(), quiet_native_stderr(not args.verbose):
            # made here: inside the redirect, sys.stderr is the terminal and fd 2 is /dev/null
            tally.bar = tqdm(total=len(todo), desc="captioning", unit="video", file=sys.stderr, dynamic_ncols=True,
                             disable=True if args.no_progress else None)
            try:
                if args.engine == "ray":
                    from .captioning.ray_engine import run_ray

                    run_ray(job, todo, emit=emit, should_stop=stop, address=args.ray_address, workers=args.workers,
                            batch_size=args.batch_size, decode_workers=args.decode_workers,
                            gpus_per_worker=args.gpus_per_worker, warn=warn)
                else:
                    from .captioning.engine import Captioner, load_model

                    model, processor = load_model(model_name, device=args.device, dtype=args.dtype, warn=warn)
                    job.resolve_resize(processor)
                    captioner = Captioner(model, processor, args.config, args.prompt,
                                          max_new_tokens=args.max_new_tokens)
                    caption_items(job, captioner, todo, batch_size=args.batch_size,
                                  decode_workers=args.decode_workers, emit=emit, should_stop=stop)
            finally:
                tally.bar.close()
    except ModelError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT
    _summary(args, tally, skipped, failed_before, interrupted=stop.signum)
    if stop.signum is not None:
        return 128 + int(stop.signum)
    return EXIT_FAILED if tally.failed else 0


def _summary(args, tally: _Tally, skipped: int, failed_before: int, *, interrupted) -> None:
    parts = [f"done {tally.done}", f"skipped {skipped}"]
    if failed_before:
        parts[-1] += f" ({failed_before} failed before: --retry-failed to try them again)"
    parts.append(f"failed {tally.failed}")
    line = ", ".join(parts)
    if tally.visual:
        line += (f"; visual tokens {tally.visual:,} -> {tally.visual_kept:,} "
                 f"({1 - tally.visual_kept / tally.visual:.0%} saved)")
    where = "standard output" if args.output == "-" else args.output
    print(f"{PROG}: {line}; records in {where}", file=sys.stderr)
    if interrupted is not None:
        print(f"{PROG}: stopped by {signal.Signals(interrupted).name}; run the same command again to resume",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
