"""Gradio demo for long video: ask a VLM about a video twice, unpatched and compressed, and compare.

    python -m vlmcompress.demo.app                    # http://127.0.0.1:7860, the shipped model by default
    python -m vlmcompress.demo.app --host 0.0.0.0 --port 8080 --device cuda --model my/other-vlm

The logic lives in plain functions (:func:`build_config`, :func:`iter_comparison`, :func:`run_comparison`,
:func:`token_table`, :func:`merge_strip`, :func:`timeline_image`, :func:`heatmap_strip`), so it is tested
without a browser; :func:`build_app` only wires them to widgets. Every expected failure (no video, an
unreadable or too long video, a model not offered, bad settings, a question over the token cap, a model
that rejects the input) is a :class:`DemoError` whose message is meant for the user: the page shows it
(escaped), the ``/compare`` API endpoint raises it as ``gr.Error``.
"""
from __future__ import annotations

import argparse
import html
import logging
import os
import re
import socket
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

# Before gradio is imported: no telemetry or version check (gradio reads this at import and launch).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

import vlmcompress as vc  # noqa: E402
from vlmcompress.config import PRESETS  # noqa: E402

from .runner import TINY_PREFIX, Answer, RunStats, default_model, load, stream_answer  # noqa: E402

__all__ = [
    "Comparison", "DemoError", "Stopped", "EXAMPLES", "Example", "Limits", "build_app", "build_config", "default_model",
    "example_video", "get_model", "heatmap_strip", "iter_comparison", "main", "merge_strip", "mmss",
    "model_choices", "preset_name", "preset_values", "run_comparison", "timeline_image", "token_table",
]

log = logging.getLogger(__name__)

DEFAULT_PRESET = "balanced"
CUSTOM = "custom"         # the preset box shows this once the sliders no longer match a preset
MAX_FRAMES = 512          # plain-function cap; the UI slider stops at 64
DECODE_MAX_SIDE = 768     # frames are downscaled while decoding: 64 frames of 1080p would be ~400 MB
STRIP_FRAMES = 8          # frames shown in the merge picture
STRIP_HEIGHT = 128        # pixels per frame in the merge picture
STRIP_COLUMNS = 4         # frames per row in the merge picture (8 in one row were ~50 px tall in the page)
LABEL_HEIGHT = 16         # the mm:ss band under each shown frame
MODEL_CACHE_SIZE = 2      # loaded models kept in memory (a 7B model is ~15 GB)
TINY_FAMILIES = ("llava_onevision", "llava_next_video", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")


class DemoError(ValueError):
    """A failure the user can fix (the message says how); shown in the page, never as a traceback."""


class Stopped(DemoError):
    """The user pressed Stop during the unpatched run (nothing to compare yet)."""


@dataclass(frozen=True)
class Limits:
    """What one request may cost; the defaults hold on a public ``--host 0.0.0.0`` server.

    A crafted input can make a VLM generate until ``max_new_tokens`` ("Verbose Images", an energy-latency
    attack), so every run also has a wall-clock ``time_limit``; a 20,000-character question became 15,160
    prefill tokens, hence ``max_question_tokens``.
    """

    max_file_size: str = "100mb"        # uploads above this are refused by gradio before they reach us
    max_duration: float = 3 * 3600.0    # seconds of video (only num_frames are decoded, but a 10-hour file
    #                                     still costs a full index scan)
    max_question_tokens: int = 128      # tokens of the question alone, by the model's tokenizer
    time_limit: float = 60.0            # seconds per generate call (each of the two runs)
    queue_size: int = 8                 # requests waiting; more get "busy"


# ----------------------------------------------------------------------------------------- messages

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def esc(text) -> str:
    """``text`` made literal for a Markdown component: HTML tags (``<family>``) and Markdown marks
    (``*``, ``_`` in ``llava_onevision``) show as typed instead of being interpreted.

    Markdown marks get a backslash; then ``&``, ``<`` and ``>`` become entities (a backslash before an
    entity would print the entity's name)."""
    return html.escape(_MD_SPECIAL.sub(r"\\\1", str(text)), quote=False)


def mmss(seconds: float, decimals: int = 0) -> str:
    """``75.4`` → ``"01:15"`` (``decimals=1``: ``"01:15.4"``); an hour or more → ``"1:02:03"``."""
    seconds = max(0.0, round(float(seconds), decimals))
    whole = int(seconds)
    h, rem = divmod(whole, 3600)
    frac = f"{seconds - whole:.{decimals}f}"[1:] if decimals else ""
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}{frac}" if h else f"{rem // 60:02d}:{rem % 60:02d}{frac}"


def _stamp(times: Sequence[float], i: int) -> str:
    """The label of frame ``i``: ``mm:ss``, with tenths when the whole video is under a minute (frames of a
    short clip would otherwise share labels)."""
    return mmss(times[i], 1 if times[-1] < 60 else 0)


# ----------------------------------------------------------------------------------------- settings

def preset_values(preset: str) -> tuple[float, bool, float, float]:
    """``(keep_ratio, temporal_on, temporal_threshold, v2pe_delta)`` of a preset, for the sliders."""
    if preset not in PRESETS:
        raise DemoError(f"unknown preset {preset!r}; presets are {', '.join(sorted(PRESETS))}")
    c = PRESETS[preset]
    on = c.temporal_threshold is not None
    return c.keep_ratio, on, (c.temporal_threshold if on else 0.9), c.v2pe_delta


def build_config(preset: str = DEFAULT_PRESET, keep_ratio: float | None = None, temporal: bool | None = None,
                 temporal_threshold: float | None = None, v2pe_delta: float | None = None, *,
                 vision_keep: float | None = None, token_budget: int | float | None = None,
                 relevance=None) -> vc.CompressionConfig:
    """The preset with the slider values on top (``None`` keeps the preset's value).

    ``preset="custom"`` starts from no compression. ``temporal=False`` switches temporal merging off
    whatever the threshold; ``temporal=True`` needs a threshold (the given one, else the preset's, else
    0.9). ``vision_keep``: stage A (ToMe in the vision tower). ``token_budget``: a cap on the visual
    tokens of the video (0 or None = off). ``relevance``: a scorer for prompt-guided pooling, or None.

    Raises:
        DemoError: unknown preset or a value the config rejects (its message names the setting).
    """
    if preset != CUSTOM and preset not in PRESETS:
        raise DemoError(f"Bad settings: unknown preset {preset!r}; presets are {', '.join(sorted(PRESETS))}")
    base = PRESETS.get(preset, vc.CompressionConfig())
    changes: dict = {}
    if keep_ratio is not None:
        changes["keep_ratio"] = _number(keep_ratio)
    if v2pe_delta is not None:
        changes["v2pe_delta"] = _number(v2pe_delta)
    if vision_keep is not None:
        changes["vision_keep"] = _number(vision_keep)
    if token_budget is not None:
        b = token_budget
        if isinstance(b, float) and b.is_integer():
            b = int(b)                                  # gradio Number sends floats
        changes["token_budget"] = None if b == 0 else b
    if relevance is not None:
        changes["relevance"] = relevance
    if temporal is False:
        changes["temporal_threshold"] = None
    elif temporal is True or temporal_threshold is not None:
        t = temporal_threshold if temporal_threshold is not None else base.temporal_threshold
        changes["temporal_threshold"] = _number(0.9 if t is None else t)
    try:
        return base.replace(**changes)
    except (ValueError, TypeError) as e:
        raise DemoError(f"Bad settings: {e}") from e


def preset_name(config: vc.CompressionConfig) -> str:
    """The preset these settings are (ignoring the relevance scorer), or ``"custom"``."""
    plain = config.replace(relevance=None)
    return next((name for name, c in PRESETS.items() if c == plain), CUSTOM)


def _number(v):
    # Gradio sliders send floats; an int-valued float is still fine for the config, bools are not numbers.
    return float(v) if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) else v


def _config_line(config: vc.CompressionConfig) -> str:
    d = config.to_dict()
    default = vc.CompressionConfig().to_dict()
    changed = {k: v for k, v in d.items() if v != default[k]}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "no compression"


# ------------------------------------------------------------------------------------------- models

def _shipped(kind: str = "vlm") -> list[str]:
    try:
        from vlmcompress import models
    except ImportError:                                 # an installation without the registry
        return []
    return models.available(kind)


def model_choices(extra: Sequence[str] = ()) -> list[tuple[str, str]]:
    """``(label, name)`` of every model this server offers: the shipped trained models, those named on
    the command line (``extra``), and the tiny random-weight ones (labelled as such)."""
    out = [(f"{n} (trained on the synthetic benchmark)", n) for n in _shipped("vlm")]
    out += [(n, n) for n in extra if n not in {v for _, v in out}]
    out += [(f"{TINY_PREFIX}{f} (random weights)", TINY_PREFIX + f) for f in TINY_FAMILIES]
    return out


_models: OrderedDict = OrderedDict()
_warmed: set = set()          # (model name, device, config) already run once: see iter_comparison
_models_lock = threading.Lock()


def get_model(name: str, device: str | None = None):
    """``(model, processor)``, loaded once per ``(name, device)`` and kept (the last MODEL_CACHE_SIZE).

    ``name``: a shipped model (``synth-onevision``), a hub id, a local folder, or ``tiny-random:<family>``.

    Raises:
        DemoError: an unknown ``tiny-random:`` family, a missing local folder, or a hub id that could not
            be loaded (no network, no such repository, not a vision-language model).
    """
    name = (name or "").strip()
    if not name:
        raise DemoError("No model: pick one from the list.")
    if not name.startswith(TINY_PREFIX) and name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
        raise DemoError(f"Could not load model {name!r}: no such folder.")
    key = (name, device)
    with _models_lock:                   # one load at a time: two requests must not load a model twice
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        try:
            loaded = load(str(Path(name).expanduser()) if name.startswith("~") else name, device=device)
        except (OSError, ValueError, ImportError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DemoError(f"Could not load model {name!r}: {first}") from e
        _models[key] = loaded
        while len(_models) > MODEL_CACHE_SIZE:
            gone, _ = _models.popitem(last=False)
            _warmed.difference_update({w for w in _warmed if w[:2] == gone})   # a reload is cold again
        return loaded


_scorer: dict = {}


def relevance_scorer() -> tuple[object, bool]:
    """``(scorer, trained)``: the shipped ``synth-clip`` when installed, else a random-weight tiny CLIP."""
    if "s" not in _scorer:
        if "synth-clip" in _shipped("clip"):
            from vlmcompress import models

            _scorer["s"] = (models.relevance_scorer(), True)
        else:
            _scorer["s"] = (vc.tiny_clip_scorer(), False)
    return _scorer["s"]


class _Recording:
    """Wraps a pixel relevance scorer and keeps its last map, for the heatmap."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.last: tuple | None = None            # (map [1, T*H*W] float cpu, (T, H, W))

    def score(self, question, frames, target_grid=None):
        rel = self.scorer.score(question, frames, target_grid)
        self.last = (rel.detach().float().cpu(), tuple(int(g) for g in target_grid))
        return rel


# ----------------------------------------------------------------------------------------- examples

@dataclass(frozen=True)
class Example:
    name: str
    path: str
    question: str
    answer: str          # what the video shows (the benchmark's ground truth)
    description: str


def _needle(path: Path) -> tuple[str, str]:
    from vlmcompress import synthetic

    # 16 scene frames held 7.5 s each (30 video frames at 4 fps) = 2:00. The flash is one of the 16, so
    # 16 frames sampled uniformly over the two minutes see it once, as the model was trained (≤ 16
    # frames); a one-frame (0.25 s) flash would be missed by uniform sampling most of the time.
    s = synthetic.make_sample("needle", 0, frames=16, size=64)
    synthetic.write_video(np.repeat(s.frames, 30, axis=0), path, fps=4)
    return s.question, s.answer


def _digit(path: Path) -> tuple[str, str]:
    from vlmcompress import synthetic

    s = synthetic.make_sample("digit", 0, frames=240, size=64, fps=4)    # 1:00, smooth motion
    synthetic.write_video(s.frames, path, fps=4)
    return s.question, s.answer


def _square(path: Path) -> tuple[str, str]:
    from vlmcompress.testing.video import make_test_video

    make_test_video(path, frames=32, size=(128, 96), fps=8)
    return "What is moving in this video?", "a square"


# name -> (file name, maker, description). The file name carries a version: change it when a maker changes.
EXAMPLES: dict[str, tuple[str, object, str]] = {
    "needle-2min": ("needle-v1.mp4", _needle,
                    "2:00, a coloured flash in one 7.5-second stretch of a static scene (synthetic benchmark)"),
    "digit-1min": ("digit-v1.mp4", _digit, "1:00, a small shape crossing the frame beside a small digit"),
    "moving-square": ("square-v1.mp4", _square, "0:04, a square sliding over a static gradient"),
}
DEFAULT_EXAMPLE = "needle-2min"
DEFAULT_QUESTION = "What colour was the flash?"
_example_lock = threading.Lock()


def example_cache() -> Path:
    """Where generated examples are kept: ``$VLMCOMPRESS_CACHE/demo-examples`` or ``~/.cache/vlmcompress/…``."""
    root = os.environ.get("VLMCOMPRESS_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "vlmcompress"
    return Path(root) / "demo-examples"


def example_video(name: str = DEFAULT_EXAMPLE, folder: str | os.PathLike | None = None) -> Example:
    """The example video ``name`` (a key of :data:`EXAMPLES`), generated on first use into ``folder``
    (default :func:`example_cache`) and reused after; one file per example, never a new temp folder."""
    if name not in EXAMPLES:
        raise DemoError(f"Unknown example {name!r}; examples are {', '.join(EXAMPLES)}")
    file, make, description = EXAMPLES[name]
    folder = Path(folder) if folder is not None else example_cache()
    path = folder / file
    answer_file = path.with_suffix(".txt")
    with _example_lock:
        if not (path.is_file() and answer_file.is_file()):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{os.getpid()}-{path.name}")
            try:
                question, answer = make(tmp)
            except (RuntimeError, OSError) as e:                  # no ffmpeg, read-only cache
                tmp.unlink(missing_ok=True)
                raise DemoError(f"Could not generate the example video: {e}") from e
            os.replace(tmp, path)                                 # atomic: a reader never sees half a file
            answer_file.write_text(f"{question}\n{answer}\n")
        question, answer = answer_file.read_text().splitlines()[:2]
    return Example(name, str(path), question, answer, description)


# ------------------------------------------------------------------------------------------- video

def _probe(path: str) -> tuple[int, int, float] | None:
    """``(width, height, seconds)`` of a video file, or None when decord cannot open it."""
    try:
        import decord

        r = decord.VideoReader(path, ctx=decord.cpu(0))
        h, w = r[0].shape[:2]
        fps = r.get_avg_fps() or 0.0
        return w, h, (len(r) / fps if fps > 0 else 0.0)
    except Exception:                                           # read_video reports it properly
        return None


def load_frames(video_path, num_frames: int, *, max_duration: float | None = None):
    """``VideoClip`` of ``num_frames`` frames spread uniformly over the whole video (fewer if shorter).

    Frames are decoded with the longer side at most DECODE_MAX_SIDE. A video longer than
    ``max_duration`` seconds is refused.
    """
    from vlmcompress.video import read_video

    if video_path is None or (isinstance(video_path, str) and not video_path.strip()):
        raise DemoError("No video: upload one, or load an example.")
    if isinstance(num_frames, float) and num_frames.is_integer():
        num_frames = int(num_frames)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
        raise DemoError(f"Bad settings: frames to sample must be an int in [1, {MAX_FRAMES}], got {num_frames!r}")
    path = str(video_path)
    probe = _probe(path) if os.path.isfile(path) else None
    size = None
    if probe is not None:
        w, h, seconds = probe
        if max_duration is not None and seconds > max_duration:
            raise DemoError(f"Video too long: {mmss(seconds)}; this server takes videos up to {mmss(max_duration)}.")
        scale = DECODE_MAX_SIDE / max(h, w)
        if scale < 1:
            size = max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)
    try:
        return read_video(path, num_frames=num_frames, size=size)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        raise DemoError(f"Could not read the video: {e}") from e


# ------------------------------------------------------------------------------------------ pictures

def _video_item(report):
    """The report item to draw: the first video with a (T, H, W) grid and a source map (else an image one)."""
    items = [it for it in report.items if it.source is not None and it.grid is not None and len(it.grid) == 3]
    videos = [it for it in items if it.modality == "video"]
    return (videos or items or [None])[0]


def _resize(frames: np.ndarray, height: int) -> np.ndarray:
    """``[T, H, W, 3]`` uint8 → ``[T, height, round(W·height/H), 3]`` (bilinear)."""
    from PIL import Image

    h, w = frames.shape[1:3]
    width = max(1, round(w * height / h))
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR)) for f in frames])


def _tile(tiles: np.ndarray, columns: int, gap: int, labels: Sequence[str] | None = None) -> np.ndarray:
    """``[k, h, w, 3]`` tiles left to right, top to bottom, white gaps; with ``labels`` a text band under each."""
    k, h, w = tiles.shape[:3]
    if labels is not None:
        from PIL import Image, ImageDraw

        band = np.full((k, LABEL_HEIGHT, w, 3), 255, dtype=np.uint8)
        for i, text in enumerate(labels):
            img = Image.fromarray(band[i])
            ImageDraw.Draw(img).text((3, 2), text, fill=(0, 0, 0))
            band[i] = np.asarray(img)
        tiles = np.concatenate([tiles, band], axis=1)
        h += LABEL_HEIGHT
    cols = min(columns, k)
    rows = -(-k // cols)
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(k):
        y, x = (i // cols) * (h + gap), (i % cols) * (w + gap)
        out[y:y + h, x:x + w] = tiles[i]
    return out


def _shown_steps(t: int, max_frames: int) -> np.ndarray:
    return np.unique(np.round(np.linspace(0, t - 1, min(max_frames, t))).astype(np.int64))


def merge_strip(item, frames: np.ndarray, *, max_frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT,
                columns: int = STRIP_COLUMNS, gap: int = 4,
                times: Sequence[float] | None = None) -> tuple[np.ndarray, list[int]]:
    """Frames tiled left to right, top to bottom, every patch tinted by the compressed token that holds it.

    Args:
        item: an ``ItemReport`` with ``grid = (T, H, W)`` and ``source`` ``[placeholders]``; placeholders
            beyond ``T·H·W`` (a trailing newline token, LLaVA-OneVision) are not grid patches and are skipped.
        frames: ``[F, Hpix, Wpix, 3]`` uint8, the frames the model saw. When the model groups frames in
            time (Qwen-VL: 2 frames per grid step) grid step ``t`` shows frame ``floor(t·F/T)``.
        max_frames: at most this many grid steps are shown, spread uniformly.
        height: pixel height of each shown frame (width keeps the aspect ratio).
        columns: frames per row (``>= max_frames`` gives one strip).
        gap: white pixels between frames.
        times: ``[F]`` seconds of each frame in the video; when given, each shown frame gets an ``mm:ss``
            band (LABEL_HEIGHT pixels) under it.

    Returns:
        ``(picture, shown)``: uint8 ``[r·h + (r−1)·gap, c·width + (c−1)·gap, 3]`` with ``k`` frames in
        ``c = min(columns, k)`` columns and ``r = ceil(k / c)`` rows (``h = height``, plus LABEL_HEIGHT
        with ``times``), and the ``k`` indices (into ``frames``) of the frames shown. Same colour in two
        frames = merged across time.
    """
    from vlmcompress.visualize import merge_colors

    t, h, w = (int(g) for g in item.grid)
    src = item.source.detach().cpu().numpy().astype(np.int64)
    if src.size < t * h * w:
        raise ValueError(f"source map has {src.size} entries, fewer than the grid {item.grid} needs")
    src = src[: t * h * w]
    picked = (np.arange(t) * frames.shape[0]) // t                          # [T] frame of each grid step
    tinted = merge_colors(src[None], (t, h, w), frames=_resize(frames[picked], height)[None],
                          alpha=0.55, borders=True)[0]                      # [T, height, width, 3]
    steps = _shown_steps(t, max_frames)
    shown = [int(picked[s]) for s in steps]
    labels = None if times is None else [_stamp(times, i) for i in shown]
    return _tile(tinted[steps], columns, gap, labels), shown


_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def _heat_colours(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → ``[..., 3]`` uint8 on an inferno-like scale (dark = low, yellow = high)."""
    x = np.clip(v, 0, 1) * (len(_HEAT) - 1)
    lo = np.floor(x).astype(np.int64).clip(0, len(_HEAT) - 2)
    f = (x - lo)[..., None]
    return (_HEAT[lo] * (1 - f) + _HEAT[lo + 1] * f).round().astype(np.uint8)


def heatmap_strip(relevance: np.ndarray, frames: np.ndarray, *, max_frames: int = STRIP_FRAMES,
                  height: int = STRIP_HEIGHT, columns: int = STRIP_COLUMNS, gap: int = 4,
                  times: Sequence[float] | None = None) -> tuple[np.ndarray, list[int]]:
    """The relevance map over the frames: ``relevance`` ``[T, H, W]`` (one softmax over the whole video),
    scaled to [0, 1] over the video and blended over the shown frames. Layout and return as
    :func:`merge_strip`."""
    from PIL import Image

    t = relevance.shape[0]
    rel = relevance.astype(np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros_like(rel)
    picked = (np.arange(t) * frames.shape[0]) // t
    steps = _shown_steps(t, max_frames)
    shown = [int(picked[s]) for s in steps]
    tiles = _resize(frames[[picked[s] for s in steps]], height)
    hh, ww = tiles.shape[1:3]
    heat = np.stack([np.asarray(Image.fromarray(_heat_colours(rel[s])).resize((ww, hh), Image.NEAREST))
                     for s in steps])
    blended = (0.4 * tiles + 0.6 * heat).round().astype(np.uint8)
    labels = None if times is None else [_stamp(times, i) for i in shown]
    return _tile(blended, columns, gap, labels), shown


def frame_timeline(item, times: Sequence[float] | None, num_frames: int) -> list[dict]:
    """Per grid step of the video: its time, the tokens it had and the tokens it kept.

    A compressed token may hold patches of several frames (merged across time, or pooled over a time
    window); it is counted at the first frame it covers, so the kept counts sum to the tokens of the
    grid that reach the LLM (a trailing newline token is not in any frame).
    """
    t, h, w = (int(g) for g in item.grid)
    src = item.source.detach().cpu().numpy().astype(np.int64)[: t * h * w].reshape(t, h * w)
    first = {}
    for step in range(t):
        for token in np.unique(src[step]):
            first.setdefault(int(token), step)
    kept = np.bincount(np.fromiter(first.values(), dtype=np.int64, count=len(first)), minlength=t)
    picked = (np.arange(t) * num_frames) // t
    return [{"frame": int(picked[s]), "time_s": None if times is None else round(float(times[picked[s]]), 3),
             "label": None if times is None else _stamp(times, int(picked[s])),
             "tokens": h * w, "kept": int(kept[s])} for s in range(t)]


def timeline_image(timeline: list[dict], *, width: int = 720, height: int = 180) -> np.ndarray:
    """Bars along the video's time axis: tokens per frame unpatched (grey) and kept (blue), mm:ss under."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    # top margin: gradio lays the image's label over its top-left corner
    left, right, top, bottom = 36, 8, 30, height - 22
    top_val = max(max(r["tokens"] for r in timeline), 1)
    n = len(timeline)
    slot = (width - left - right) / n
    bar = max(1.0, slot * 0.8)
    d.text((width - 330, 4), "grey = tokens unpatched, blue = kept after compression", fill=(0, 0, 0))
    d.line([(left - 2, top), (left - 2, bottom)], fill=(0, 0, 0))
    d.line([(left - 2, bottom), (width - right, bottom)], fill=(0, 0, 0))
    d.text((2, top - 4), str(top_val), fill=(0, 0, 0))
    d.text((2, bottom - 10), "0", fill=(0, 0, 0))
    label_every = max(1, -(-n // 8))
    for i, r in enumerate(timeline):
        x0 = left + i * slot + (slot - bar) / 2
        y_all = bottom - (bottom - top) * r["tokens"] / top_val
        y_kept = bottom - (bottom - top) * r["kept"] / top_val
        d.rectangle([x0, y_all, x0 + bar, bottom], fill=(215, 215, 215))
        if r["kept"]:
            d.rectangle([x0, y_kept, x0 + bar, bottom], fill=(40, 110, 220))
        if i % label_every == 0 and r["label"] is not None:
            d.text((x0, bottom + 5), r["label"], fill=(0, 0, 0))
    return np.asarray(img)


# ------------------------------------------------------------------------------------------ numbers

def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_numbers(answer: Answer, *, visual: int, prefill: int) -> dict:
    """The numbers of one run, as the API returns them (seconds, bytes, tokens; None = not measured)."""
    s: RunStats | None = answer.stats
    return {
        "answer": answer.text, "finish": s.finish if s else None, "new_tokens": answer.new_tokens,
        "visual_tokens": visual, "prefill_tokens": prefill,
        "position_span": s.position_span if s else None,
        "seconds": round(answer.seconds, 6),
        "vision_seconds": None if s is None or s.vision_seconds is None else round(s.vision_seconds, 6),
        "first_token_seconds": None if s is None or s.first_token_seconds is None else round(s.first_token_seconds, 6),
        "decode_tokens_per_second": None if s is None or s.decode_tokens_per_second is None
        else round(s.decode_tokens_per_second, 3),
        "peak_memory_bytes": s.peak_memory_bytes if s else None,
        "peak_memory_kind": s.peak_memory_kind if s else None,
        "kv_cache_bytes": s.kv_cache_bytes if s else None,
        "kv_cache_tokens": s.kv_cache_tokens if s else None,
    }


def _fmt_s(v):
    return "–" if v is None else f"{v:.3f} s"


def _fmt_bytes(v):
    if v is None:
        return "–"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if v >= size:
            return f"{v / size:.2f} {unit}"
    return f"{v} B"


def _speed(before, after) -> str:
    """``"2.00× faster"`` / ``"1.50× slower"`` for times ``before`` → ``after`` ("" when unknown)."""
    q = _ratio(before, after)
    if q is None or q == 0:
        return ""
    return f"{q:.2f}× faster" if q >= 1 else f"{1 / q:.2f}× slower"


def token_table(base: Answer, compressed: Answer) -> str:
    """Markdown table: tokens, positions, time, memory of both runs, and the ratio compressed / unpatched."""
    r = compressed.report
    vb, va = r.visual_before, r.visual_after
    pb, pa = r.prefill_before[0], r.prefill_after[0]
    b, c = base.stats, compressed.stats

    def get(s, name):
        return None if s is None else getattr(s, name)

    def change(x, y, fmt="{:.1%}", suffix=""):
        q = _ratio(y, x)
        return "" if q is None else fmt.format(q) + suffix

    av = sum(i.after_vision for i in r.items)
    rows = [
        ("after the vision tower (stage A)", vb, av, change(vb, av, suffix=" kept")),
        ("visual tokens", vb, va, change(vb, va, suffix=" kept")),
        ("prefill tokens", pb, pa, change(pb, pa, suffix=" kept")),
    ]
    span_b, span_a = get(b, "position_span"), get(c, "position_span")
    rows.append(("position span (V2PE)", "–" if span_b is None else f"{span_b:g}",
                 "–" if span_a is None else f"{span_a:g}", change(span_b, span_a)))
    for label, name in (("vision tower", "vision_seconds"), ("time to first token", "first_token_seconds")):
        x, y = get(b, name), get(c, name)
        rows.append((label, _fmt_s(x), _fmt_s(y), _speed(x, y)))
    x, y = get(b, "decode_tokens_per_second"), get(c, "decode_tokens_per_second")
    rows.append(("decode", "–" if x is None else f"{x:.1f} tok/s", "–" if y is None else f"{y:.1f} tok/s",
                 change(x, y, "{:.2f}×")))
    rows.append(("seconds", f"{base.seconds:.3f}", f"{compressed.seconds:.3f}", _speed(base.seconds, compressed.seconds)))
    rows.append(("new tokens", base.new_tokens, compressed.new_tokens, ""))
    kind = get(c, "peak_memory_kind")
    label = "peak GPU memory" if kind == "cuda" else "peak process memory"
    x, y = get(b, "peak_memory_bytes"), get(c, "peak_memory_bytes")
    rows.append((label, _fmt_bytes(x), _fmt_bytes(y), change(x, y)))
    x, y = get(b, "kv_cache_bytes"), get(c, "kv_cache_bytes")
    rows.append(("KV cache", _fmt_bytes(x), _fmt_bytes(y), change(x, y)))
    lines = ["| | unpatched | compressed | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {x} | {y} | {z} |" for a, x, y, z in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Comparison:
    """Both runs on the same frames, plus what to show."""

    base: Answer                    # unpatched
    compressed: Answer              # patched with ``config``; ``compressed.report`` is its CompressionReport
    config: vc.CompressionConfig
    num_frames: int                 # frames sampled from the video
    table: str                      # Markdown table of the numbers
    merge_image: np.ndarray | None  # uint8 [Hs, Ws, 3] tiled frames (None when the item has no token grid)
    note: str                       # about the pictures / the model (Markdown, escaped)
    model: str = ""
    duration: float = 0.0           # seconds of the whole video
    timestamps: list = field(default_factory=list)     # [num_frames] seconds of each sampled frame
    timeline: list = field(default_factory=list)       # frame_timeline rows (empty without a grid)
    timeline_image: np.ndarray | None = None
    heatmap_image: np.ndarray | None = None            # relevance over the shown frames (relevance on)
    relevance_trained: bool | None = None              # None: relevance off

    @property
    def preset(self) -> str:
        return preset_name(self.config)

    def numbers(self) -> dict:
        """Everything the page shows, as plain JSON (the ``/compare`` API endpoint returns this)."""
        r = self.compressed.report
        return {
            "model": self.model, "preset": self.preset, "config": self.config.to_dict(),
            "video": {"duration_s": round(self.duration, 3), "frames_sampled": self.num_frames,
                      "timestamps_s": [round(float(t), 3) for t in self.timestamps]},
            "unpatched": run_numbers(self.base, visual=r.visual_before, prefill=r.prefill_before[0]),
            "compressed": run_numbers(self.compressed, visual=r.visual_after, prefill=r.prefill_after[0]),
            "timeline": self.timeline,
            "relevance": None if self.relevance_trained is None else
            ("synth-clip (trained)" if self.relevance_trained else "tiny CLIP (random weights)"),
        }


def _check_question(question, processor, limit: int) -> str:
    question = (question or "").strip() if isinstance(question, str) or question is None else question
    if not isinstance(question, str) or not question:
        raise DemoError("No question: type what you want to ask about the video.")
    # Tokenizing a megabyte costs seconds; no question under the cap is longer than ~40 characters a token.
    if len(question) > 40 * limit:
        raise DemoError(f"Question too long: {len(question)} characters; the limit is {limit} tokens.")
    tok = getattr(processor, "tokenizer", processor)
    n = len(tok(question, add_special_tokens=False)["input_ids"])
    if n > limit:
        raise DemoError(f"Question too long: {n} tokens; the limit is {limit} tokens.")
    return question


def _check_settings(config, max_new_tokens):
    if not isinstance(config, vc.CompressionConfig):
        raise DemoError(f"Bad settings: config must be a CompressionConfig, got {type(config).__name__}")
    if config.is_identity:
        raise DemoError("Bad settings: these settings compress nothing (keep ratio 1, no token budget, "
                        "temporal merging off, vision keep 1, V2PE δ 1); lower the keep ratio or pick a preset "
                        "other than 'none'.")
    if isinstance(max_new_tokens, float) and max_new_tokens.is_integer():
        max_new_tokens = int(max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 4096:
        raise DemoError(f"Bad settings: max new tokens must be an int in [1, 4096], got {max_new_tokens!r}")
    return max_new_tokens


def iter_comparison(video_path, model: str | None = None, question: str = DEFAULT_QUESTION, *,
                    config: vc.CompressionConfig | None = None, num_frames: int = 16, max_new_tokens: int = 32,
                    device: str | None = None, warmup: bool = True, limits: Limits = Limits(),
                    allowed_models: Sequence[str] | None = None,
                    stop: threading.Event | None = None) -> Iterator[tuple[str, str] | Comparison]:
    """:func:`run_comparison`, step by step: yields ``("unpatched", text so far)`` while the first run
    streams, ``("compressed", text so far)`` during the second, then the :class:`Comparison`.

    ``allowed_models``: names this server offers (None = any hub id or folder). ``stop``: set it to end
    the current run at its next token; a run stopped during the unpatched pass ends there (raises
    DemoError "Stopped"), one stopped during the compressed pass still returns its numbers.

    Raises:
        DemoError: for every failure the user can fix; the message says what went wrong.
    """
    model = (model or default_model()).strip()
    config = PRESETS[DEFAULT_PRESET] if config is None else config
    max_new_tokens = _check_settings(config, max_new_tokens)
    if allowed_models is not None and model not in allowed_models:
        raise DemoError(f"Model {model!r} is not offered by this server: pick one from the list "
                        "(the server was started without --allow-any-model).")
    clip = load_frames(video_path, num_frames, max_duration=limits.max_duration)
    fps = clip.sampled_fps
    mdl, processor = get_model(model, device)
    question = _check_question(question, processor, limits.max_question_tokens)
    recorder = None
    trained = None
    if config.relevance is not None:
        trained = getattr(config.relevance, "trained", None)
        recorder = _Recording(config.relevance)
        config = config.replace(relevance=recorder)
    stop = stop if stop is not None else threading.Event()
    run = dict(fps=fps, max_time=limits.time_limit, stop=stop)
    try:
        key = (model, device, repr(config.replace(relevance=None)), config.relevance is not None)
        if warmup and key not in _warmed:
            # First calls pay one-time costs (allocator, CUDA handles, Triton compiles) that would make
            # whichever run goes first look slow; one untimed token per path keeps the speedup honest.
            for cfg in (None, config):
                for _ in stream_answer(mdl, processor, clip.frames, question, config=cfg, max_new_tokens=1, **run):
                    pass
            _warmed.add(key)
        answers = {}
        for name, cfg in (("unpatched", None), ("compressed", config)):
            for part in stream_answer(mdl, processor, clip.frames, question, config=cfg,
                                      max_new_tokens=max_new_tokens, **run):
                if isinstance(part, Answer):
                    answers[name] = part
                else:
                    yield name, part
            if name == "unpatched" and answers[name].stats.finish == "stopped":
                raise Stopped("Stopped during the unpatched run; press Run to start again.")
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as e:
        if isinstance(e, DemoError):
            raise
        log.exception("model run failed")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DemoError(f"The model could not answer on this video ({type(e).__name__}): {first}") from e
    base, comp = answers["unpatched"], answers["compressed"]

    if comp.report is None or not comp.report.items:
        raise DemoError(f"Model {model!r} received no visual tokens for the video: its processor has no "
                        "video path (tiny-random:llava and tiny-random:llava_next are image-only). Pick a video model.")
    times = [float(t) for t in clip.timestamps]
    item = _video_item(comp.report)
    image = timeline_img = heat = None
    timeline: list = []
    lines = [f"Video {mmss(clip.duration)} long; {clip.num_frames} frames sampled uniformly "
             f"({', '.join(_stamp(times, i) for i in range(min(3, len(times))))}{' …' if len(times) > 3 else ''})."]
    if item is None:
        lines.append("No merge picture: this model's report has no token grid for the video (merging in the "
                     "vision tower, stage A, leaves no grid).")
    else:
        image, shown = merge_strip(item, clip.frames, times=times)
        timeline = frame_timeline(item, times, clip.num_frames)
        timeline_img = timeline_image(timeline)
        t, h, w = (int(g) for g in item.grid)
        grid, tail = t * h * w, item.placeholders - t * h * w
        extra = f" + {tail} newline token{'s' * (tail > 1)}" if tail > 0 else ""
        kept_grid = sum(r["kept"] for r in timeline)
        lines.append(
            f"Frames at {', '.join(_stamp(times, i) for i in shown)} shown. {item.modality.capitalize()} grid "
            f"{t}×{h}×{w} = {grid} tokens{extra} = {item.placeholders} placeholders → {item.after_compress} "
            f"after compression ({kept_grid} from the grid{extra and f', {item.after_compress - kept_grid} newline'}). "
            "Each patch is tinted by the compressed token it ended in: one colour across frames = merged across time.")
        if recorder is not None and recorder.last is not None:
            rel, g = recorder.last
            if tuple(g) == (t, h, w):
                heat, _ = heatmap_strip(rel.reshape(t, h, w).numpy(), clip.frames, times=times)
    if recorder is not None:
        if heat is None:
            lines.append("No relevance heatmap: prompt-guided pooling did not run on a token grid "
                         "(it needs a keep ratio < 1 or a token budget, and no merging in the vision tower).")
        if trained is False:
            lines.append("Relevance from a tiny CLIP with random weights: the heatmap shows the mechanism, not "
                         "what matters.")
    if model.startswith(TINY_PREFIX):
        lines.append("(tiny-random weights: the answers are gibberish; the token counts and the pipeline are real.)")
    note = " ".join(esc(x) for x in lines)
    return_value = Comparison(base, comp, config if recorder is None else config.replace(relevance=recorder.scorer),
                              clip.num_frames, token_table(base, comp), image, note, model=model,
                              duration=float(clip.duration), timestamps=times, timeline=timeline,
                              timeline_image=timeline_img, heatmap_image=heat, relevance_trained=trained)
    yield return_value


def run_comparison(video_path, model: str | None = None, question: str = DEFAULT_QUESTION, **kwargs) -> Comparison:
    """Sample ``num_frames`` frames, ask ``model`` unpatched and compressed with ``config``, and compare.

    ``model`` defaults to :func:`default_model`; ``config`` to the ``balanced`` preset and must compress
    something (else there is nothing to compare). The model is loaded once per name (:func:`get_model`).
    With ``warmup`` the first run of each (model, config) first generates one untimed token on both
    paths, so the times compare fairly. Other keywords: see :func:`iter_comparison`.

    Raises:
        DemoError: for every failure the user can fix; the message says what went wrong.
    """
    for part in iter_comparison(video_path, model, question, **kwargs):
        if isinstance(part, Comparison):
            return part
    raise AssertionError("iter_comparison ended without a Comparison")   # pragma: no cover


# ------------------------------------------------------------------------------------------- the UI

_INTRO = """# vlmcompress: long-video demo
Ask a vision-language model about a video twice, as it is and with **vlmcompress** (token merging in the
vision tower, temporal merging, prompt-guided pooling to a token budget, V2PE positions), and compare the
answers, what each run kept and what it cost. Frames are sampled uniformly over the whole video, so a long
video costs no more than a short one.
"""


def _scorer_for(use: bool):
    if not use:
        return None
    scorer, trained = relevance_scorer()
    try:
        scorer.trained = trained                    # read back by iter_comparison for the label
    except AttributeError:
        pass
    return scorer


class _Sessions:
    """One Stop event per browser session, so that Stop ends only that session's run."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def new(self, session: str) -> threading.Event:
        with self._lock:
            e = self._events[session] = threading.Event()
            return e

    def stop(self, session: str) -> bool:
        with self._lock:
            e = self._events.get(session)
        if e is None:
            return False
        e.set()
        return True

    def done(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]


def _settings_config(preset, keep_ratio, temporal, threshold, delta, vision_keep, token_budget, relevance):
    return build_config(preset, keep_ratio, bool(temporal), threshold, delta, vision_keep=vision_keep,
                        token_budget=token_budget, relevance=_scorer_for(bool(relevance)))


def _status_done(c: Comparison) -> str:
    parts = [f"**Done:** {c.num_frames} frames of a {esc(mmss(c.duration))} video, preset **{esc(c.preset)}** → "
             f"{esc(_config_line(c.config))}"]
    for name, a in (("unpatched", c.base), ("compressed", c.compressed)):
        if a.stats and a.stats.finish == "time limit":
            parts.append(f"The {name} run hit the time limit: its answer is cut short.")
        elif a.stats and a.stats.finish == "stopped":
            parts.append(f"The {name} run was stopped: its answer is cut short.")
    return " ".join(parts)


def build_app(*, device: str | None = None, limits: Limits = Limits(), models: Sequence[str] = (),
              allow_any_model: bool = False, default: str | None = None):
    """The Gradio Blocks app (not launched).

    Args:
        device: where models are loaded (None: where they load).
        limits: what one request may cost (also pass ``limits.max_file_size`` to ``launch``; :func:`main` does).
        models: extra model names to offer (hub ids or folders), beside the shipped and tiny ones.
        allow_any_model: let users type any hub id or folder (off: only the offered list).
        default: the model selected at start (default :func:`default_model`).
    """
    try:
        import gradio as gr
    except ImportError as err:  # an optional extra
        raise ImportError("the web demo needs gradio: pip install 'vlmcompress[demo]'") from err

    choices = model_choices(models)
    offered = [v for _, v in choices]
    allowed = None if allow_any_model else offered
    default = default or default_model()
    if default not in offered:
        choices.insert(0, (default, default))
        offered.insert(0, default)
    try:
        first = example_video(DEFAULT_EXAMPLE)
    except DemoError as e:                          # no ffmpeg: the page still works with uploads
        log.warning("%s", e)
        first = None
    clip_trained = "synth-clip" in _shipped("clip")
    clip_label = "trained synth-clip" if clip_trained else "tiny CLIP, random weights"
    sessions = _Sessions()
    k0, t_on0, t0, d0 = preset_values(DEFAULT_PRESET)

    with gr.Blocks(title="vlmcompress demo", analytics_enabled=False, delete_cache=(1800, 3600)) as app:
        gr.Markdown(_INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                video = gr.Video(value=first.path if first else None, label="Video", sources=["upload"],
                                 elem_id="video", height=260)
                with gr.Row():
                    example = gr.Dropdown([(f"{n}: {EXAMPLES[n][2]}", n) for n in EXAMPLES], value=DEFAULT_EXAMPLE,
                                          label="Examples (generated on first use)", scale=3, elem_id="example")
                    example_btn = gr.Button("Load example", elem_id="example-btn", scale=1)
                model = gr.Dropdown(choices, value=default, label="Model", elem_id="model",
                                    allow_custom_value=allow_any_model,
                                    info="trained = task-trained on the synthetic benchmark (answers mean something); "
                                         "random weights = for trying the pipeline only")
                question = gr.Textbox(value=first.question if first else DEFAULT_QUESTION, label="Question", lines=2,
                                      elem_id="question", max_length=40 * limits.max_question_tokens,
                                      info=f"at most {limits.max_question_tokens} tokens")
                with gr.Row():
                    run = gr.Button("Run: unpatched vs compressed", variant="primary", elem_id="run-btn", scale=3)
                    stop = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
                frames = gr.Slider(2, 64, value=16, step=1, label="Frames to sample",
                                   info="spread uniformly over the whole video")
                preset = gr.Dropdown(sorted(PRESETS) + [CUSTOM], value=DEFAULT_PRESET, label="Preset",
                                     info="sets the sliders below; moving a slider shows which preset that is",
                                     elem_id="preset")
                keep = gr.Slider(0.01, 1.0, value=k0, step=0.01, label="Keep ratio (stage B)",
                                 info="fraction of visual tokens that reach the LLM", elem_id="keep")
                budget = gr.Number(0, label="Token budget (stage B; 0 = off)", precision=0, minimum=0,
                                   info="a cap on the video's visual tokens; the smaller of this and the keep ratio wins")
                with gr.Row():
                    temporal = gr.Checkbox(value=t_on0, label="Temporal merging", scale=1)
                    threshold = gr.Slider(0.5, 1.0, value=t0, step=0.01, label="Temporal threshold (cosine)",
                                          scale=3)
                # On by default with the trained CLIP: on the needle example plain pooling to 7 tokens loses the
                # flash ("green" for yellow) and relevance-weighted pooling keeps it.
                relevance = gr.Checkbox(value=clip_trained, label=f"Prompt-guided pooling (CLIP relevance: {clip_label})",
                                        elem_id="relevance",
                                        info="weights pooling by how relevant each patch is to the question")
                vision_keep = gr.Slider(0.1, 1.0, value=1.0, step=0.05, label="Vision keep (stage A, ToMe in the "
                                        "vision tower)", info="1 = off; SigLIP/CLIP towers only; leaves no token grid")
                delta = gr.Slider(0.001, 1.0, value=d0, step=0.001, label="V2PE δ (stage C)",
                                  info="position step of a visual token; 1 = the model's own positions")
                with gr.Accordion("More", open=False):
                    new_tokens = gr.Slider(1, 256, value=32, step=1, label="Max new tokens")
            with gr.Column(scale=3, min_width=400):
                status = gr.Markdown("Pick a video (or an example), then **Run**.", elem_id="status")
                with gr.Row():
                    base_answer = gr.Textbox(label="Unpatched answer", lines=2, interactive=False, elem_id="base-answer")
                    comp_answer = gr.Textbox(label="Compressed answer", lines=2, interactive=False, elem_id="comp-answer")
                table = gr.Markdown(elem_id="token-table")
                picture = gr.Image(label="Where each patch went (mm:ss under each frame)", type="numpy",
                                   interactive=False, format="png", elem_id="merge-image")
                timeline = gr.Image(label="Tokens kept per frame along the video", type="numpy", interactive=False,
                                    format="png", elem_id="timeline-image")
                heatmap = gr.Image(label="Relevance to the question (prompt-guided pooling on)", type="numpy",
                                   interactive=False, format="png", elem_id="heatmap-image", visible=False)
                note = gr.Markdown(elem_id="merge-note")
                with gr.Accordion("Numbers (JSON, as the /compare API returns them)", open=False):
                    numbers = gr.JSON(elem_id="numbers")

        # Invisible inputs of the /compare API endpoint: an example name instead of an upload keeps the
        # API page's example runnable offline.
        with gr.Column(visible=False):
            api_video = gr.Video(label="video", value=None)
            # The API page's example would otherwise upload gradio's sample video from github.com, which an
            # offline server cannot fetch; None runs the named example instead.
            api_video.example_inputs = lambda: None
            api_example = gr.Textbox(value=DEFAULT_EXAMPLE, label="example")
            api_model = gr.Textbox(value=default, label="model")
            api_question = gr.Textbox(value="", label="question")
            api_frames = gr.Number(16, label="frames", precision=0)
            api_preset = gr.Textbox(value=DEFAULT_PRESET, label="preset")
            api_keep = gr.Number(None, label="keep_ratio")
            api_budget = gr.Number(0, label="token_budget", precision=0)
            api_temporal = gr.Dropdown(["preset", "on", "off"], value="preset", label="temporal")
            api_threshold = gr.Number(None, label="temporal_threshold")
            api_relevance = gr.Checkbox(clip_trained, label="relevance")
            api_vision = gr.Number(1.0, label="vision_keep")
            api_delta = gr.Number(None, label="v2pe_delta")
            api_new = gr.Number(32, label="max_new_tokens", precision=0)
            api_btn = gr.Button("compare")
            api_out = gr.JSON(label="numbers")

        def on_example(name):
            try:
                ex = example_video(name)
            except DemoError as e:
                return gr.update(), gr.update(), f"**Error:** {esc(e)}"
            return ex.path, ex.question, (f"Loaded example **{esc(ex.name)}**: {esc(ex.description)}. "
                                          f"Its answer is {esc(ex.answer)}.")

        example_btn.click(on_example, inputs=example, outputs=[video, question, status], api_visibility="private")

        sliders = [keep, temporal, threshold, delta, vision_keep, budget]

        def on_preset(name):
            if name == CUSTOM:
                return [gr.update()] * len(sliders)
            k, on, t, d = preset_values(name)
            c = PRESETS[name]
            return [k, on, t, d, c.vision_keep, c.token_budget or 0]

        def on_slider(k, on, t, d, vk, b):
            # Which preset the sliders now are: the status and the box must not claim "balanced" after a change.
            try:
                return preset_name(build_config(CUSTOM, k, bool(on), t, d, vision_keep=vk, token_budget=b))
            except DemoError:
                return CUSTOM

        preset.input(on_preset, inputs=preset, outputs=sliders, api_visibility="private")
        for s in sliders:
            s.input(on_slider, inputs=sliders, outputs=preset, api_visibility="private")

        def on_run(video_path, model_name, q, n, preset_box, k, on, t, d, vk, b, rel, mnt,
                   request: gr.Request):
            session = getattr(request, "session_hash", None) or "-"
            event = sessions.new(session)
            texts = {"unpatched": "", "compressed": ""}
            busy = gr.update(interactive=False)
            idle = gr.update(interactive=True)
            clear = ("", None, None, None, "", None)
            try:
                config = _settings_config(preset_box, k, on, t, d, vk, b, rel)
                yield ("**Running 1/2: unpatched** (loading the model and the frames) …", "", "", *clear, busy)
                for part in iter_comparison(video_path, model_name, q, config=config, num_frames=n,
                                            max_new_tokens=mnt, device=device, limits=limits,
                                            allowed_models=allowed, stop=event):
                    if isinstance(part, Comparison):
                        c = part
                        heat = gr.update(value=c.heatmap_image, visible=c.heatmap_image is not None)
                        yield (_status_done(c), c.base.text, c.compressed.text, c.table, c.merge_image,
                               c.timeline_image, heat, c.note, c.numbers(), idle)
                        return
                    name, text = part
                    texts[name] = text
                    step = "1/2: unpatched" if name == "unpatched" else "2/2: compressed"
                    yield (f"**Running {step}** … {len(text)} characters so far", texts["unpatched"],
                           texts["compressed"], *clear, busy)
            except Stopped as e:
                yield (f"**Stopped.** {esc(e)}", texts["unpatched"], texts["compressed"], *clear, idle)
            except DemoError as e:
                yield (f"**Error:** {esc(e)}", texts["unpatched"], texts["compressed"], *clear, idle)
            except Exception as e:              # a bug: say so in the page, keep the traceback in the log
                log.exception("unexpected error in the demo")
                yield (f"**Unexpected error** ({esc(type(e).__name__)}): {esc(e)}. The server log has the details.",
                       "", "", *clear, idle)
            finally:
                sessions.done(session, event)

        # With postponed annotations gradio cannot resolve "gr.Request" (gr is local here): give it the class,
        # before the event is registered (gradio checks the signature then).
        on_run.__annotations__["request"] = gr.Request

        # One run at a time (shared with the API): the model is patched in place for the compressed call.
        run.click(on_run, inputs=[video, model, question, frames, preset, keep, temporal, threshold, delta,
                                  vision_keep, budget, relevance, new_tokens],
                  outputs=[status, base_answer, comp_answer, table, picture, timeline, heatmap, note, numbers, run],
                  concurrency_limit=1, concurrency_id="model", api_visibility="private")

        def on_stop(request: gr.Request):
            if not sessions.stop(getattr(request, "session_hash", None) or "-"):
                return gr.update()
            return "**Stopping** at the next token …"

        on_stop.__annotations__["request"] = gr.Request
        stop.click(on_stop, outputs=status, queue=False, api_visibility="private")

        def compare(video: str | None = None, example: str = DEFAULT_EXAMPLE, model: str = default,
                    question: str = "", frames: float = 16, preset: str = DEFAULT_PRESET,
                    keep_ratio: float | None = None, token_budget: float = 0, temporal: str = "preset",
                    temporal_threshold: float | None = None, relevance: bool = False, vision_keep: float = 1.0,
                    v2pe_delta: float | None = None, max_new_tokens: float = 32) -> dict:
            """Ask the model about a video unpatched and compressed; the numbers of both runs as JSON.

            video: an uploaded file, or None to use the named example ("needle-2min", "digit-1min",
            "moving-square"). temporal: "preset", "on" or "off". Settings left None take the preset's
            value. Errors raise gr.Error."""
            try:
                if temporal not in ("preset", "on", "off", None):
                    raise DemoError(f"Bad settings: temporal must be 'preset', 'on' or 'off', got {temporal!r}")
                on = {"on": True, "off": False}.get(temporal)
                ex = None
                if video is None:
                    ex = example_video(example or DEFAULT_EXAMPLE)
                config = build_config(preset or DEFAULT_PRESET, keep_ratio, on, temporal_threshold, v2pe_delta,
                                      vision_keep=vision_keep, token_budget=token_budget,
                                      relevance=_scorer_for(bool(relevance)))
                c = run_comparison(video if ex is None else ex.path, model or default,
                                   question or (ex.question if ex else ""), config=config, num_frames=frames,
                                   max_new_tokens=max_new_tokens, device=device, limits=limits,
                                   allowed_models=allowed)
            except DemoError as e:
                raise gr.Error(str(e), print_exception=False) from e
            out = c.numbers()
            if ex is not None:
                out["video"]["example"] = {"name": ex.name, "question": ex.question, "answer": ex.answer}
            return out

        api_btn.click(compare, inputs=[api_video, api_example, api_model, api_question, api_frames, api_preset,
                                       api_keep, api_budget, api_temporal, api_threshold, api_relevance, api_vision,
                                       api_delta, api_new],
                      outputs=api_out, api_name="compare", concurrency_limit=1, concurrency_id="model")

        def list_models() -> list[dict]:
            """The models this server offers: name and label."""
            return [{"name": v, "label": label} for label, v in choices]

        def list_examples() -> list[dict]:
            """The example videos: name, description."""
            return [{"name": n, "description": d} for n, (_, _, d) in EXAMPLES.items()]

        gr.api(list_models, api_name="models", queue=False)
        gr.api(list_examples, api_name="examples", queue=False)
    app.queue(max_size=limits.queue_size, default_concurrency_limit=1)
    app.vlmcompress_allowed_paths = [str(example_cache())]     # for launch(): the examples are served from there
    return app


# ----------------------------------------------------------------------------------------- start-up

def free_port(host: str, wanted: int, tries: int = 100) -> int:
    """The first port from ``wanted`` on that ``host`` can bind (``wanted`` itself when free)."""
    for port in range(wanted, min(wanted + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {wanted}-{wanted + tries - 1} on {host}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmcompress.demo.app", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=None,
                   help="port (default: $GRADIO_SERVER_PORT or 7860); when taken, the next free one is used")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--device", default=None, help="where to load models, e.g. cuda (default: cuda if available)")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="offer this model too (hub id or folder; repeatable); the first is selected at start")
    p.add_argument("--allow-any-model", action="store_true",
                   help="let users type any hub id or server folder (off: only the offered list)")
    d = Limits()
    p.add_argument("--max-file-size", default=d.max_file_size, help="largest upload, e.g. 100mb")
    p.add_argument("--max-duration", type=float, default=d.max_duration, help="longest video, seconds")
    p.add_argument("--max-question-tokens", type=int, default=d.max_question_tokens)
    p.add_argument("--time-limit", type=float, default=d.time_limit, help="seconds per generate call")
    p.add_argument("--queue-size", type=int, default=d.queue_size, help="requests waiting before 'busy'")
    args = p.parse_args(argv)
    if args.port is None:
        env = os.environ.get("GRADIO_SERVER_PORT", "").strip()
        try:
            args.port = int(env) if env else 7860
        except ValueError:
            p.error(f"GRADIO_SERVER_PORT must be a port number, got {env!r}")
    for name in ("max_duration", "time_limit"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("max_question_tokens", "queue_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    logging.basicConfig(level=logging.INFO)
    limits = Limits(max_file_size=args.max_file_size, max_duration=args.max_duration,
                    max_question_tokens=args.max_question_tokens, time_limit=args.time_limit,
                    queue_size=args.queue_size)
    port = free_port(args.host, args.port)
    if port != args.port:
        print(f"vlmcompress demo: port {args.port} is taken; serving on port {port} instead "
              "(choose one with --port N or GRADIO_SERVER_PORT)", flush=True)
    app = build_app(device=device, limits=limits, models=args.model, allow_any_model=args.allow_any_model,
                    default=args.model[0] if args.model else None)
    app.launch(server_name=args.host, server_port=port, share=args.share, ssr_mode=False, show_error=True,
               max_file_size=limits.max_file_size, allowed_paths=app.vlmcompress_allowed_paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
