"""Gradio demo for long video: ask a VLM about a video twice, unpatched and compressed, and compare.

    python -m vlmcompress.demo.app                    # http://127.0.0.1:7860, tiny random model by default
    python -m vlmcompress.demo.app --host 0.0.0.0 --port 8080 --device cuda

The logic lives in plain functions (:func:`build_config`, :func:`run_comparison`, :func:`token_table`,
:func:`merge_strip`), so it is tested without a browser; :func:`build_app` only wires them to widgets.
Every expected failure (no video, unreadable video, unknown model, bad settings, a model that rejects
the input) is a :class:`DemoError` with a message meant for the user, shown in the page as a warning.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

# Before gradio is imported: no telemetry or version check (gradio reads this at import and launch).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402

import vlmcompress as vc  # noqa: E402
from vlmcompress.config import PRESETS  # noqa: E402

from .runner import TINY_PREFIX, Answer, ask, load  # noqa: E402

__all__ = [
    "Comparison", "DemoError", "build_app", "build_config", "example_video", "get_model", "main",
    "merge_strip", "preset_values", "run_comparison", "token_table",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = TINY_PREFIX + "llava_onevision"
DEFAULT_QUESTION = "What is moving in this video?"
DEFAULT_PRESET = "balanced"
MAX_FRAMES = 512          # plain-function cap; the UI slider stops at 64
DECODE_MAX_SIDE = 768     # frames are downscaled while decoding: 64 frames of 1080p would be ~400 MB
STRIP_FRAMES = 8          # frames shown in the merge picture
STRIP_HEIGHT = 128        # pixels per frame in the merge picture
STRIP_COLUMNS = 4         # frames per row in the merge picture (8 in one row were ~50 px tall in the page)
MODEL_CACHE_SIZE = 2      # loaded models kept in memory (a 7B model is ~15 GB)


class DemoError(ValueError):
    """A failure the user can fix (the message says how); shown in the page, never as a traceback."""


@dataclass
class Comparison:
    """Both runs on the same frames, plus what to show."""

    base: Answer                    # unpatched
    compressed: Answer              # patched with ``config``; ``compressed.report`` is its CompressionReport
    config: vc.CompressionConfig
    num_frames: int                 # frames sampled from the video
    table: str                      # Markdown token table
    merge_image: np.ndarray | None  # uint8 [Hs, Ws, 3] tiled frames (None when the item has no token grid)
    note: str                       # one line about the merge picture / the model


# ----------------------------------------------------------------------------------------- settings

def preset_values(preset: str) -> tuple[float, bool, float, float]:
    """``(keep_ratio, temporal_on, temporal_threshold, v2pe_delta)`` of a preset, for the sliders."""
    if preset not in PRESETS:
        raise DemoError(f"unknown preset {preset!r}; presets are {', '.join(sorted(PRESETS))}")
    c = PRESETS[preset]
    on = c.temporal_threshold is not None
    return c.keep_ratio, on, (c.temporal_threshold if on else 0.9), c.v2pe_delta


def build_config(preset: str = DEFAULT_PRESET, keep_ratio: float | None = None, temporal: bool | None = None,
                 temporal_threshold: float | None = None, v2pe_delta: float | None = None) -> vc.CompressionConfig:
    """The preset with the slider values on top (``None`` keeps the preset's value).

    ``temporal=False`` switches temporal merging off whatever the threshold; ``temporal=True`` needs a
    threshold (the given one, else the preset's, else 0.9).

    Raises:
        DemoError: unknown preset or a value the config rejects (its message names the setting).
    """
    if preset not in PRESETS:
        raise DemoError(f"Bad settings: unknown preset {preset!r}; presets are {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset]
    changes: dict = {}
    if keep_ratio is not None:
        changes["keep_ratio"] = _number(keep_ratio)
    if v2pe_delta is not None:
        changes["v2pe_delta"] = _number(v2pe_delta)
    if temporal is False:
        changes["temporal_threshold"] = None
    elif temporal is True or temporal_threshold is not None:
        t = temporal_threshold if temporal_threshold is not None else base.temporal_threshold
        changes["temporal_threshold"] = _number(0.9 if t is None else t)
    try:
        return base.replace(**changes)
    except (ValueError, TypeError) as e:
        raise DemoError(f"Bad settings: {e}") from e


def _number(v):
    # Gradio sliders send floats; an int-valued float is still fine for the config, bools are not numbers.
    return float(v) if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) else v


# ------------------------------------------------------------------------------------ video + model

def example_video(folder: str | os.PathLike | None = None) -> str:
    """Generate the example clip (32 frames, 8 fps, a square sliding over a static gradient); its path.

    Written under the system temp folder by default (gradio serves files from there).
    """
    from vlmcompress.testing.video import make_test_video

    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="vlmcompress-demo-"))
    try:
        return str(make_test_video(folder / "example.mp4", frames=32, size=(128, 96), fps=8))
    except RuntimeError as e:                                  # no ffmpeg
        raise DemoError(f"Could not generate the example video: {e}") from e


def _decode_size(path: str) -> tuple[int, int] | None:
    """``(width, height)`` to decode at so the longer side is at most DECODE_MAX_SIDE; None keeps it."""
    if not os.path.isfile(path):
        return None
    try:
        import decord

        h, w = decord.VideoReader(path, ctx=decord.cpu(0))[0].shape[:2]
    except Exception:                                           # read_video reports it properly
        return None
    scale = DECODE_MAX_SIDE / max(h, w)
    if scale >= 1:
        return None
    return max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2)


def load_frames(video_path, num_frames: int):
    """``VideoClip`` of ``num_frames`` frames spread uniformly over the whole video (fewer if shorter)."""
    from vlmcompress.video import read_video

    if video_path is None or (isinstance(video_path, str) and not video_path.strip()):
        raise DemoError("No video: upload one, or click 'Example video'.")
    if isinstance(num_frames, float) and num_frames.is_integer():
        num_frames = int(num_frames)
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_FRAMES:
        raise DemoError(f"Bad settings: frames to sample must be an int in [1, {MAX_FRAMES}], got {num_frames!r}")
    path = str(video_path)
    try:
        return read_video(path, num_frames=num_frames, size=_decode_size(path))
    except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
        raise DemoError(f"Could not read the video: {e}") from e


_models: OrderedDict = OrderedDict()
_warmed: set = set()          # (model name, device, config) already run once: see run_comparison
_models_lock = threading.Lock()


def get_model(name: str, device: str | None = None):
    """``(model, processor)``, loaded once per ``(name, device)`` and kept (the last MODEL_CACHE_SIZE).

    Raises:
        DemoError: an unknown ``tiny-random:`` family, a missing local folder, or a hub id that could not
            be loaded (no network, no such repository, not a vision-language model).
    """
    name = (name or "").strip()
    if not name:
        raise DemoError("No model: type a hub id, a local folder, or tiny-random:<family>.")
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


# ------------------------------------------------------------------------------------------ outputs

def token_table(base: Answer, compressed: Answer) -> str:
    """Markdown table: visual and prefill tokens, new tokens and seconds of both runs, and the ratios."""
    r = compressed.report
    vb, va = r.visual_before, r.visual_after
    pb, pa = r.prefill_before[0], r.prefill_after[0]
    speedup = base.seconds / compressed.seconds if compressed.seconds > 0 else float("inf")
    return "\n".join([
        "| | unpatched | compressed | change |",
        "|---|---:|---:|---:|",
        f"| visual tokens | {vb} | {va} | {va / vb:.1%} kept |",
        f"| prefill tokens | {pb} | {pa} | {pa / pb:.1%} kept |",
        f"| new tokens | {base.new_tokens} | {compressed.new_tokens} | |",
        f"| seconds | {base.seconds:.3f} | {compressed.seconds:.3f} | {speedup:.2f}× speedup |",
    ])


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


def merge_strip(item, frames: np.ndarray, *, max_frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT,
                columns: int = STRIP_COLUMNS, gap: int = 4) -> tuple[np.ndarray, list[int]]:
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

    Returns:
        ``(picture, shown)``: uint8 ``[r·height + (r−1)·gap, c·width + (c−1)·gap, 3]`` with ``k`` frames in
        ``c = min(columns, k)`` columns and ``r = ceil(k / c)`` rows, and the ``k`` indices (into ``frames``)
        of the frames shown. Same colour in two frames = merged across time.
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
    steps = np.unique(np.round(np.linspace(0, t - 1, min(max_frames, t))).astype(np.int64))
    k, width = len(steps), tinted.shape[2]
    cols = min(columns, k)
    rows = -(-k // cols)
    out = np.full((rows * height + (rows - 1) * gap, cols * width + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i, s in enumerate(steps):
        y, x = (i // cols) * (height + gap), (i % cols) * (width + gap)
        out[y:y + height, x:x + width] = tinted[s]
    return out, [int(picked[s]) for s in steps]


# ------------------------------------------------------------------------------------------ the run

def run_comparison(video_path, model: str = DEFAULT_MODEL, question: str = DEFAULT_QUESTION, *,
                   config: vc.CompressionConfig | None = None, num_frames: int = 16,
                   max_new_tokens: int = 32, device: str | None = None, warmup: bool = True) -> Comparison:
    """Sample ``num_frames`` frames, ask ``model`` unpatched and compressed with ``config``, and compare.

    ``config`` defaults to the ``balanced`` preset; it must compress something (else there is nothing
    to compare). The model is loaded once per name (:func:`get_model`). With ``warmup`` the first run of
    each (model, config) first generates one untimed token on both paths, so the times compare fairly.

    Raises:
        DemoError: for every failure the user can fix; the message says what went wrong.
    """
    config = PRESETS[DEFAULT_PRESET] if config is None else config
    if not isinstance(config, vc.CompressionConfig):
        raise DemoError(f"Bad settings: config must be a CompressionConfig, got {type(config).__name__}")
    if config.is_identity:
        raise DemoError("Bad settings: these settings compress nothing (keep ratio 1, temporal merging off, "
                        "V2PE δ 1); lower the keep ratio or pick a preset other than 'none'.")
    question = (question or "").strip()
    if not question:
        raise DemoError("No question: type what you want to ask about the video.")
    if isinstance(max_new_tokens, float) and max_new_tokens.is_integer():
        max_new_tokens = int(max_new_tokens)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 4096:
        raise DemoError(f"Bad settings: max new tokens must be an int in [1, 4096], got {max_new_tokens!r}")

    clip = load_frames(video_path, num_frames)
    fps = clip.sampled_fps
    mdl, processor = get_model(model, device)
    try:
        key = (model.strip(), device, repr(config))
        if warmup and key not in _warmed:
            # First calls pay one-time costs (allocator, CUDA handles, Triton compiles) that would make
            # whichever run goes first look slow; one untimed token per path keeps the speedup honest.
            ask(mdl, processor, clip.frames, question, fps=fps, config=None, max_new_tokens=1)
            ask(mdl, processor, clip.frames, question, fps=fps, config=config, max_new_tokens=1)
            _warmed.add(key)
        base = ask(mdl, processor, clip.frames, question, fps=fps, config=None, max_new_tokens=max_new_tokens)
        comp = ask(mdl, processor, clip.frames, question, fps=fps, config=config, max_new_tokens=max_new_tokens)
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as e:
        log.exception("model run failed")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DemoError(f"The model could not answer on this video ({type(e).__name__}): {first}") from e

    if comp.report is None or not comp.report.items:
        raise DemoError(f"Model {model.strip()!r} received no visual tokens for the video: its processor has no "
                        "video path (tiny-random:llava and tiny-random:llava_next are image-only). Pick a video model.")
    item = _video_item(comp.report)
    image, note = None, "No merge picture: this model's report has no token grid for the video."
    if item is not None:
        image, shown = merge_strip(item, clip.frames)
        t, h, w = item.grid
        note = (f"Frames {', '.join(map(str, shown))} of {clip.num_frames} sampled; {item.modality} grid "
                f"{t}×{h}×{w} = {t * h * w} tokens → {item.after_compress} after compression. Each patch is "
                "tinted by the compressed token it ended in: one colour across frames = merged across time.")
    if model.strip().startswith(TINY_PREFIX):
        note += " (tiny-random weights: the answers are gibberish; the token counts and the pipeline are real.)"
    return Comparison(base, comp, config, clip.num_frames, token_table(base, comp), image, note)


# ------------------------------------------------------------------------------------------- the UI

def _on_run(video, model, question, num_frames, preset, keep_ratio, temporal, threshold, delta, max_new_tokens,
            device=None):
    """UI callback: ``(status, unpatched answer, compressed answer, table, image, note)``; never raises."""
    try:
        config = build_config(preset, keep_ratio, bool(temporal), threshold, delta)
        c = run_comparison(video, model, question, config=config, num_frames=num_frames,
                           max_new_tokens=max_new_tokens, device=device)
    except DemoError as e:
        return f"**Error:** {e}", "", "", "", None, ""
    except Exception as e:                       # a bug: say so in the page, keep the traceback in the log
        log.exception("unexpected error in the demo")
        return (f"**Unexpected error** ({type(e).__name__}): {e}. The server log has the details.",
                "", "", "", None, "")
    status = f"**Done:** {c.num_frames} frames, preset **{preset}** → `{_config_line(c.config)}`"
    return status, c.base.text, c.compressed.text, c.table, c.merge_image, c.note


def _on_example():
    """UI callback for the example button: ``(video path, status)``."""
    try:
        return example_video(), "Generated a 32-frame example: a square sliding over a static background."
    except DemoError as e:
        return None, f"**Error:** {e}"


def _config_line(config: vc.CompressionConfig) -> str:
    d = config.to_dict()
    default = vc.CompressionConfig().to_dict()
    changed = {k: v for k, v in d.items() if v != default[k]}
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "no compression"


_INTRO = """# vlmcompress: long-video demo
Ask a vision-language model about a video twice, as it is and with **vlmcompress** (temporal merging,
prompt-guided pooling to a token budget, V2PE positions), and compare the answers, the token counts and
the time. Frames are sampled uniformly over the whole video, so a long video costs no more than a short one.
"""


def build_app(*, device: str | None = None):
    """The Gradio Blocks app (not launched). ``device``: where models are loaded (None: where they load)."""
    try:
        import gradio as gr
    except ImportError as err:  # an optional extra
        raise ImportError("the web demo needs gradio: pip install 'vlmcompress[demo]'") from err

    k0, t_on0, t0, d0 = preset_values(DEFAULT_PRESET)
    with gr.Blocks(title="vlmcompress demo", analytics_enabled=False) as app:
        gr.Markdown(_INTRO)
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                example = gr.Button("Example video (generated)", elem_id="example-btn")
                model = gr.Textbox(
                    value=DEFAULT_MODEL, label="Model", elem_id="model",
                    info="A hub id or local folder, or tiny-random:<family> = random weights: for trying the "
                         "pipeline without downloads (llava_onevision, llava_next_video, qwen2_vl, qwen2_5_vl, "
                         "qwen3_vl, internvl).")
                question = gr.Textbox(value=DEFAULT_QUESTION, label="Question", lines=2, elem_id="question")
                frames = gr.Slider(2, 64, value=16, step=1, label="Frames to sample",
                                   info="spread uniformly over the whole video")
                preset = gr.Dropdown(sorted(PRESETS), value=DEFAULT_PRESET, label="Preset",
                                     info="sets the sliders below; then adjust")
                keep = gr.Slider(0.01, 1.0, value=k0, step=0.01, label="Keep ratio",
                                 info="fraction of visual tokens that reach the LLM")
                with gr.Row():
                    temporal = gr.Checkbox(value=t_on0, label="Temporal merging", scale=1)
                    threshold = gr.Slider(0.5, 1.0, value=t0, step=0.01, label="Temporal threshold (cosine)",
                                          scale=3)
                delta = gr.Slider(0.001, 1.0, value=d0, step=0.001, label="V2PE δ",
                                  info="position step of a visual token; 1 = the model's own positions")
                with gr.Accordion("More", open=False):
                    new_tokens = gr.Slider(1, 256, value=32, step=1, label="Max new tokens")
                run = gr.Button("Run: unpatched vs compressed", variant="primary", elem_id="run-btn")
            with gr.Column(scale=3, min_width=400):
                status = gr.Markdown("Pick a video (or the example), then **Run**.", elem_id="status")
                with gr.Row():
                    base_answer = gr.Textbox(label="Unpatched answer", lines=3, interactive=False)
                    comp_answer = gr.Textbox(label="Compressed answer", lines=3, interactive=False)
                table = gr.Markdown(elem_id="token-table")
                picture = gr.Image(label="Where each patch went", type="numpy", interactive=False,
                                   format="png", elem_id="merge-image")
                note = gr.Markdown(elem_id="merge-note")

        example.click(_on_example, outputs=[video, status])
        preset.change(preset_values, inputs=preset, outputs=[keep, temporal, threshold, delta])

        def on_run(*args):
            return _on_run(*args, device=device)

        # One run at a time: the model is patched in place for the compressed call.
        run.click(on_run, inputs=[video, model, question, frames, preset, keep, temporal, threshold, delta,
                                  new_tokens],
                  outputs=[status, base_answer, comp_answer, table, picture, note], concurrency_limit=1)
    return app


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vlmcompress.demo.app", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--device", default=None, help="where to load models, e.g. cuda (default: cuda if available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    logging.basicConfig(level=logging.INFO)
    build_app(device=device).launch(server_name=args.host, server_port=args.port, share=args.share,
                                    ssr_mode=False, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
