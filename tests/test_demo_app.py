"""The Gradio demo: its plain functions on generated videos with a tiny model, its API through
gradio_client, its limits, and one browser session in headless Chromium."""
import json
import os
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmcompress as vc
from vlmcompress.config import PRESETS
from vlmcompress.demo import app
from vlmcompress.demo.app import (DemoError, Limits, Stopped, build_config, esc, iter_comparison, merge_strip, mmss,
                                  preset_name, preset_values, run_comparison)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY = "tiny-random:llava_onevision"
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"{CHROMIUM} is missing: the browser test drives Debian's chromium "
                                           "(apt-get install chromium)")


@pytest.fixture(scope="module", autouse=True)
def example_cache(tmp_path_factory):
    """Examples are generated into a fresh cache folder, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    old = os.environ.get("VLMCOMPRESS_CACHE")
    os.environ["VLMCOMPRESS_CACHE"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("VLMCOMPRESS_CACHE", None)
    else:
        os.environ["VLMCOMPRESS_CACHE"] = old


@pytest.fixture(scope="module")
def square():
    return app.example_video("moving-square")


@pytest.fixture(scope="module")
def needle():
    return app.example_video("needle-2min")


@pytest.fixture(scope="module")
def comparison(square):
    return run_comparison(square.path, TINY, "What moves?", num_frames=8, max_new_tokens=3)


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] and not cells[0].startswith("-"):
            rows[cells[0]] = cells[1:]
    return rows


# ------------------------------------------------------------------------------------------ numbers

def test_table_numbers_match_the_report_and_the_stats(comparison):
    r = comparison.compressed.report
    b, c = comparison.base.stats, comparison.compressed.stats
    rows = _table_rows(comparison.table)
    assert rows["visual tokens"][:2] == [str(r.visual_before), str(r.visual_after)]
    assert rows["prefill tokens"][:2] == [str(r.prefill_before[0]), str(r.prefill_after[0])]
    assert rows["new tokens"][:2] == [str(comparison.base.new_tokens), str(comparison.compressed.new_tokens)]
    assert rows["seconds"][:2] == [f"{comparison.base.seconds:.3f}", f"{comparison.compressed.seconds:.3f}"]
    assert rows["visual tokens"][2] == f"{r.visual_after / r.visual_before:.1%} kept"
    assert rows["time to first token"][:2] == [f"{b.first_token_seconds:.3f} s", f"{c.first_token_seconds:.3f} s"]
    assert rows["vision tower"][:2] == [f"{b.vision_seconds:.3f} s", f"{c.vision_seconds:.3f} s"]
    assert r.visual_after < r.visual_before                      # balanced preset really compressed
    assert comparison.base.report is None and comparison.num_frames == 8
    assert comparison.config == PRESETS["balanced"] and comparison.preset == "balanced"


def test_run_stats_are_measured(comparison):
    b, c = comparison.base, comparison.compressed
    r = c.report
    for a, prefill in ((b, r.prefill_before[0]), (c, r.prefill_after[0])):
        s = a.stats
        assert 0 < s.vision_seconds < s.first_token_seconds <= a.seconds
        assert s.finish in ("eos", "length") and a.new_tokens >= 1
        # the cache holds the prompt and every new token but the last (its keys are never computed)
        assert s.kv_cache_tokens == prefill + a.new_tokens - 1
        assert s.peak_memory_bytes > 0
    assert c.stats.kv_cache_bytes < b.stats.kv_cache_bytes       # fewer tokens, smaller cache
    # bytes per cached token are the same in both runs: the size is read from the cache, not guessed
    assert b.stats.kv_cache_bytes / b.stats.kv_cache_tokens == c.stats.kv_cache_bytes / c.stats.kv_cache_tokens
    assert b.stats.position_span == r.prefill_before[0] - 1      # unpatched: positions 0 … L−1


def test_v2pe_shrinks_the_position_span(square):
    full = run_comparison(square.path, TINY, "What moves?", num_frames=8, max_new_tokens=1,
                          config=build_config("balanced", v2pe_delta=1.0))
    half = run_comparison(square.path, TINY, "What moves?", num_frames=8, max_new_tokens=1,
                          config=build_config("balanced", v2pe_delta=0.5))
    assert half.compressed.stats.position_span < full.compressed.stats.position_span
    assert _table_rows(half.table)["position span (V2PE)"][1] == f"{half.compressed.stats.position_span:g}"


def test_numbers_are_plain_json(comparison):
    n = json.loads(json.dumps(comparison.numbers()))             # fails on tensors, numpy ints, dataclasses
    r = comparison.compressed.report
    assert n["unpatched"]["visual_tokens"] == r.visual_before and n["compressed"]["visual_tokens"] == r.visual_after
    assert n["compressed"]["kv_cache_bytes"] == comparison.compressed.stats.kv_cache_bytes
    assert n["preset"] == "balanced" and n["video"]["frames_sampled"] == 8
    assert sum(row["kept"] for row in n["timeline"]) <= r.visual_after


def test_note_counts_the_newline_token_on_both_sides(needle):
    # OneVision appends one newline token to the video grid: 16×3×3 = 144 grid tokens + 1 = 145 placeholders.
    c = run_comparison(needle.path, TINY, needle.question, num_frames=16, max_new_tokens=1)
    item = next(it for it in c.compressed.report.items if it.modality == "video")
    t, h, w = item.grid
    assert item.placeholders == t * h * w + 1
    note = c.note.replace("\\", "")
    assert (f"{t}×{h}×{w} = {t * h * w} tokens + 1 newline token = {item.placeholders} placeholders → "
            f"{item.after_compress} after compression") in note
    assert f"({item.after_compress - 1} from the grid, 1 newline)" in note
    assert "Video 02:00 long" in note


# ----------------------------------------------------------------------------------------- pictures

def test_merge_image_tiles_the_shown_frames_with_times(comparison, square):
    item = next(it for it in comparison.compressed.report.items if it.modality == "video")
    assert item.grid[0] == 8                                     # 8 frames sampled, one grid step each
    width, height = round(128 * app.STRIP_HEIGHT / 96), app.STRIP_HEIGHT + app.LABEL_HEIGHT   # video is 128×96
    img = comparison.merge_image
    assert img.dtype == np.uint8
    assert img.shape == (2 * height + 4, 4 * width + 3 * 4, 3)   # 8 frames in 2 rows of 4, 4-px gaps
    assert (img[height:height + 4] == 255).all()                 # white gap between the rows
    band = img[app.STRIP_HEIGHT:height, :width]                  # the mm:ss band under the first frame
    assert (band < 128).any() and (band == 255).any()            # dark text on white


def test_merge_strip_colours_patches_by_token():
    class Item:  # a Qwen-like item: 4 frames, 2 per grid step, 1×2 tokens per step
        grid = (2, 1, 2)
        source = torch.tensor([0, 1, 0, 2])                      # left patch merged across time
    frames = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    strip, shown = merge_strip(Item, frames, height=8, columns=8, gap=2)
    assert shown == [0, 2]                                       # first frame of each grid step
    assert strip.shape == (8, 8 + 2 + 8, 3)
    left0, right0 = strip[4, 1], strip[4, 6]                     # interior pixels (borders are black)
    left1, right1 = strip[4, 10 + 1], strip[4, 10 + 6]
    assert (left0 == left1).all()                                # same token → same tint
    assert not (right0 == right1).all() and not (left0 == right0).all()
    assert (strip[:, 8:10] == 255).all()                         # white gap


def test_timeline_counts_tokens_per_frame():
    class Item:  # 3 frames of 2 tokens: frame 1 merged into frame 0, frame 2 keeps one new token
        grid = (3, 1, 2)
        source = torch.tensor([0, 1, 0, 1, 0, 2, 3])             # + a newline token (3)
    rows = app.frame_timeline(Item, [0.0, 61.0, 122.0], 3)
    assert [r["kept"] for r in rows] == [2, 0, 1]
    assert [r["label"] for r in rows] == ["00:00", "01:01", "02:02"] and all(r["tokens"] == 2 for r in rows)
    img = app.timeline_image(rows)
    assert img.shape == (180, 720, 3) and img.dtype == np.uint8
    blue = (img[..., 2] > 200) & (img[..., 0] < 80)
    cols = np.flatnonzero(blue.any(axis=0))
    slot = (720 - 36 - 8) / 3
    assert {int((x - 36) // slot) for x in cols} == {0, 2}      # bars only over frames that kept tokens


def test_qwen_grid_groups_frames_in_time(square):
    c = run_comparison(square.path, "tiny-random:qwen2_vl", "What moves?", num_frames=8, max_new_tokens=2,
                       config=build_config("aggressive"))
    item = c.compressed.report.items[0]
    assert item.grid[0] == 4 and c.merge_image.shape[0] == app.STRIP_HEIGHT + app.LABEL_HEIGHT
    times = [mmss(t, 1) for t in c.timestamps]                      # a 4-second clip: tenths of seconds
    assert f"Frames at {', '.join(times[i] for i in (0, 2, 4, 6))} shown" in c.note.replace("\\", "")


def test_relevance_heatmap_shows_the_scorer_map(square):
    config = build_config("balanced", relevance=app._scorer_for(True))
    c = run_comparison(square.path, TINY, "Where is the square?", num_frames=8, max_new_tokens=1, config=config)
    assert c.heatmap_image is not None and c.heatmap_image.shape == c.merge_image.shape
    assert c.numbers()["relevance"] in ("synth-clip (trained)", "tiny CLIP (random weights)")
    assert c.numbers()["config"]["relevance"] == "ClipRelevanceScorer"
    off = run_comparison(square.path, TINY, "Where is the square?", num_frames=8, max_new_tokens=1)
    assert off.heatmap_image is None and off.numbers()["relevance"] is None


def test_heatmap_strip_puts_high_relevance_bright():
    rel = np.zeros((2, 2, 2))
    rel[1, 0, 1] = 1.0                                           # one hot patch in the second step
    frames = np.full((2, 8, 8, 3), 128, dtype=np.uint8)
    img, shown = app.heatmap_strip(rel, frames, height=8, columns=2, gap=2)
    assert shown == [0, 1]
    hot, cold = img[1, 10 + 6], img[1, 1]                        # top-right of frame 1 / top-left of frame 0
    assert hot.sum() > cold.sum() + 200


# ----------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_values_rebuild_the_preset(preset):
    assert build_config(preset, *preset_values(preset)) == PRESETS[preset]
    assert preset_name(build_config("custom", *preset_values(preset))) == preset


def test_sliders_override_the_preset_and_the_label_follows():
    c = build_config("balanced", keep_ratio=0.5, temporal=False, temporal_threshold=0.7, v2pe_delta=0.5)
    assert (c.keep_ratio, c.temporal_threshold, c.v2pe_delta) == (0.5, None, 0.5)
    assert preset_name(c) == "custom"
    assert build_config("light", temporal=True, temporal_threshold=0.8).temporal_threshold == 0.8
    assert preset_name(build_config("balanced", keep_ratio=0.5, temporal=False)) == "light"


def test_stage_a_budget_and_relevance_are_reachable():
    c = build_config("balanced", vision_keep=0.5, token_budget=24.0)
    assert (c.vision_keep, c.token_budget) == (0.5, 24) and isinstance(c.token_budget, int)
    assert build_config("balanced", token_budget=0).token_budget is None
    scorer = app._scorer_for(True)
    assert build_config("balanced", relevance=scorer).relevance is scorer


def test_stage_a_runs_end_to_end(square):
    c = run_comparison(square.path, "tiny-random:qwen2_vl", "What moves?", num_frames=4, max_new_tokens=1,
                       config=build_config("none", vision_keep=0.5))
    item = c.compressed.report.items[0]
    assert item.after_vision < item.placeholders                  # merged inside the vision tower
    assert _table_rows(c.table)["after the vision tower (stage A)"][:2] == [str(item.placeholders),
                                                                            str(item.after_vision)]
    assert c.merge_image is None and "No merge picture" in c.note    # ToMe leaves no token grid


def test_token_budget_caps_the_tokens(square):
    c = run_comparison(square.path, TINY, "What moves?", num_frames=8, max_new_tokens=1,
                       config=build_config("none", token_budget=6))
    assert c.compressed.report.visual_after <= 6 + 1              # + OneVision's newline token


# ------------------------------------------------------------------------------------------ streams

def test_streamed_answer_comes_before_the_result(square):
    events = list(iter_comparison(square.path, TINY, "What moves?", num_frames=4, max_new_tokens=6))
    final = events[-1]
    assert isinstance(final, app.Comparison) and not any(isinstance(e, app.Comparison) for e in events[:-1])
    base = [text for name, text in events[:-1] if name == "unpatched"]
    comp = [text for name, text in events[:-1] if name == "compressed"]
    assert len(base) == final.base.new_tokens and len(comp) == final.compressed.new_tokens
    i_last_base = max(i for i, e in enumerate(events[:-1]) if e[0] == "unpatched")
    assert i_last_base < min(i for i, e in enumerate(events[:-1]) if e[0] == "compressed")
    assert base[-1].strip() == final.base.text and comp[-1].strip() == final.compressed.text


def test_stop_ends_the_run(square):
    stop = threading.Event()
    stream = iter_comparison(square.path, TINY, "What moves?", num_frames=4, max_new_tokens=64, stop=stop,
                             warmup=False)
    with pytest.raises(Stopped, match="Stopped during the unpatched run"):
        for event in stream:
            stop.set()                                           # after the first streamed token
    # the model is usable again, and closing a stream early leaves no patch behind
    model, _ = app.get_model(TINY)
    assert not vc.is_patched(model)
    assert run_comparison(square.path, TINY, "What moves?", num_frames=4, max_new_tokens=1).base.new_tokens == 1


# ------------------------------------------------------------------------------------------- limits

def test_long_question_is_refused_in_tokens(square):
    with pytest.raises(DemoError, match=r"Question too long: \d+ tokens; the limit is 8 tokens"):
        run_comparison(square.path, TINY, "what " * 20, num_frames=4, max_new_tokens=1,
                       limits=Limits(max_question_tokens=8))
    with pytest.raises(DemoError, match="Question too long: 20000 characters"):
        run_comparison(square.path, TINY, "x" * 20000, num_frames=4, max_new_tokens=1)
    assert run_comparison(square.path, TINY, "what " * 3, num_frames=4, max_new_tokens=1,
                          limits=Limits(max_question_tokens=8)).base.new_tokens == 1


def test_time_limit_cuts_generation(square):
    c = run_comparison(square.path, TINY, "What moves?", num_frames=4, max_new_tokens=4000,
                       limits=Limits(time_limit=0.3))
    for a in (c.base, c.compressed):
        assert a.stats.finish == "time limit" and a.new_tokens < 4000 and a.seconds < 5
    assert "hit the time limit" in app._status_done(c)


def test_long_video_is_refused(needle):
    with pytest.raises(DemoError, match=r"Video too long: 02:00; this server takes videos up to 01:00"):
        run_comparison(needle.path, TINY, "q", num_frames=4, max_new_tokens=1, limits=Limits(max_duration=60))


def test_only_offered_models_run(square):
    offered = [name for _, name in app.model_choices()]
    assert TINY in offered and all(n.startswith(app.TINY_PREFIX) or n.startswith("synth-") for n in offered)
    with pytest.raises(DemoError, match="not offered by this server"):
        run_comparison(square.path, "/etc", "q", num_frames=4, allowed_models=offered)
    assert app.model_choices(["my/vlm"])[len(app._shipped())] == ("my/vlm", "my/vlm")


def test_examples_are_cached_not_left_in_tmp(example_cache):
    from vlmcompress import synthetic
    from vlmcompress.video import read_video

    before = {p.name for p in Path(tempfile.gettempdir()).glob("vlmcompress-demo-*")}
    a = app.example_video("needle-2min")
    b = app.example_video("needle-2min")
    assert a == b and Path(a.path).parent == example_cache / "demo-examples"
    assert {p.name for p in Path(tempfile.gettempdir()).glob("vlmcompress-demo-*")} == before
    assert a.question == "What colour was the flash?" and a.answer in synthetic.ANSWERS["needle"]
    clip = read_video(a.path, num_frames=16)
    assert clip.duration == pytest.approx(120, abs=0.5)


def test_needle_example_flash_is_seen_by_16_sampled_frames(needle):
    from vlmcompress import synthetic
    from vlmcompress.video import read_video

    s = synthetic.make_sample("needle", 0, frames=16, size=64)
    assert needle.answer == s.answer
    clip = read_video(needle.path, num_frames=16)
    k = s.facts["needle_frame"]
    y, x, h, w = s.facts["marker_box"]
    colour = np.array(synthetic.COLOURS[s.answer], dtype=float)
    patch = clip.frames[:, y + 2:y + h - 2, x + 2:x + w - 2].reshape(16, -1, 3).mean(axis=1)
    near = np.abs(patch - colour).max(axis=1) < 40
    assert near.tolist() == [i == k for i in range(16)]        # exactly the sampled frame k shows the flash


# ---------------------------------------------------------------------------------------- messages

def test_mmss():
    assert [mmss(0), mmss(75.4), mmss(3723), mmss(3.46, 1), mmss(59.96, 1)] == \
        ["00:00", "01:15", "1:02:03", "00:03.5", "01:00.0"]


def test_messages_are_escaped():
    text = "pick tiny-random:<family> or a_b *c*"
    md = esc(text)
    assert "<family>" not in md and "&lt;family&gt;" in md
    assert re.sub(r"\\(.)", r"\1", md.replace("&lt;", "<").replace("&gt;", ">")) == text


@pytest.mark.parametrize("case, message", [
    ("no-video", "No video"),
    ("missing-file", "Could not read the video: video file not found"),
    ("garbage-file", "Could not read the video: could not read"),
    ("unknown-tiny-family", "Could not load model 'tiny-random:nope': unknown tiny family"),
    ("missing-folder", "Could not load model '/no/such/model': no such folder"),
    ("image-only-model", "received no visual tokens"),
    ("empty-question", "No question"),
    ("zero-frames", "frames to sample must be an int in [1,"),
    ("compresses-nothing", "compress nothing"),
])
def test_bad_inputs_give_a_clear_error(case, message, square, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not really a video")
    kwargs = dict(video_path=square.path, model=TINY, question="What?", num_frames=4, max_new_tokens=2)
    kwargs.update({
        "no-video": dict(video_path=None),
        "missing-file": dict(video_path=str(tmp_path / "nope.mp4")),
        "garbage-file": dict(video_path=str(bad)),
        "unknown-tiny-family": dict(model="tiny-random:nope"),
        "missing-folder": dict(model="/no/such/model"),
        "image-only-model": dict(model="tiny-random:llava"),
        "empty-question": dict(question="  "),
        "zero-frames": dict(num_frames=0),
        "compresses-nothing": dict(config=PRESETS["none"]),
    }[case])
    with pytest.raises(DemoError) as err:
        run_comparison(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("changes, message", [
    (dict(keep_ratio=0.0), "keep_ratio must be a fraction in (0, 1]"),
    (dict(v2pe_delta=2.0), "v2pe_delta must be in (0, 1]"),
    (dict(temporal=True, temporal_threshold=1.5), "temporal_threshold must be a cosine"),
    (dict(preset="fastest"), "unknown preset 'fastest'"),
    (dict(vision_keep=0.0), "vision_keep must be a fraction in (0, 1]"),
    (dict(token_budget=-3), "token_budget must be a positive int"),
], ids=["keep-ratio-0", "delta-2", "threshold-1.5", "unknown-preset", "vision-keep-0", "budget-negative"])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(DemoError, match=re.escape(message)):
        build_config(**{"preset": "balanced", **changes})


# ------------------------------------------------------------------------------------------ start-up

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_from_env_and_fallback_to_the_next_free_one(monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.allow_any_model) == ("127.0.0.1", 7860, False, False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9123")
    assert app.parse_args([]).port == 9123
    assert app.parse_args(["--port", "9000"]).port == 9000      # the flag wins over the variable
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.free_port("127.0.0.1", port) > port
    with pytest.raises(SystemExit):
        monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
        app.parse_args([])


def test_main_falls_back_to_the_next_free_port_and_says_so(monkeypatch, capsys):
    launched = {}

    class Fake:
        vlmcompress_allowed_paths = ["/x"]

        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(app, "build_app", lambda **kwargs: launched.update(build=kwargs) or Fake())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))
        assert app.main(["--max-file-size", "5mb", "--model", "my/vlm"]) == 0
    assert launched["server_port"] > port and launched["max_file_size"] == "5mb"
    assert launched["build"]["models"] == ["my/vlm"] and launched["build"]["allow_any_model"] is False
    assert f"port {port} is taken; serving on port {launched['server_port']} instead" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ served: API

class Served:
    def __init__(self, demo, port):
        self.demo, self.port, self.url = demo, port, f"http://127.0.0.1:{port}"


def _serve(**kwargs) -> Served:
    limits = kwargs.setdefault("limits", Limits())
    demo = app.build_app(default=TINY, **kwargs)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
                quiet=True, max_file_size=limits.max_file_size, allowed_paths=demo.vlmcompress_allowed_paths)
    return Served(demo, port)


@pytest.fixture(scope="module")
def server():
    s = _serve(limits=Limits(max_file_size="200kb"))
    yield s
    s.demo.close()


def test_api_compare_returns_the_numbers(server):
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/compare", "/models", "/examples"} <= set(info)
    params = [p["parameter_name"] for p in info["/compare"]["parameters"]]
    assert params[:4] == ["video", "example", "model", "question"]
    assert all(p["parameter_has_default"] for p in info["/compare"]["parameters"])   # the example runs as shown
    out = client.predict(example="moving-square", frames=8, max_new_tokens=2, api_name="/compare")
    assert out["video"]["example"]["name"] == "moving-square" and out["model"] == TINY
    assert out["compressed"]["visual_tokens"] < out["unpatched"]["visual_tokens"]
    assert out["unpatched"]["first_token_seconds"] > 0 and out["compressed"]["kv_cache_bytes"] > 0
    assert [m["name"] for m in client.predict(api_name="/models")][:1] == [app.model_choices()[0][1]]


def test_api_errors_are_errors(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match="Question too long"):
        client.predict(example="moving-square", question="why " * 400, api_name="/compare")
    with pytest.raises(AppError, match="not offered by this server"):
        client.predict(example="moving-square", model="/etc", api_name="/compare")
    with pytest.raises(AppError, match="Unknown example 'nope'"):
        client.predict(example="nope", api_name="/compare")
    out = client.predict(example="moving-square", frames=4, max_new_tokens=1, api_name="/compare")   # still serves
    assert out["compressed"]["new_tokens"] == 1


def test_oversized_upload_is_refused_and_the_app_goes_on(server, tmp_path):
    import httpx
    from gradio_client import Client

    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(400_000))
    with big.open("rb") as f:
        r = httpx.post(f"{server.url}/gradio_api/upload", files={"files": ("big.mp4", f, "video/mp4")}, timeout=30)
    assert r.status_code == 413 and "maximum" in r.text.lower()
    out = Client(server.url, verbose=False).predict(example="moving-square", frames=4, max_new_tokens=1,
                                                    api_name="/compare")
    assert out["unpatched"]["new_tokens"] == 1


def _slow_stream(monkeypatch, seconds):
    """Every streamed token takes ``seconds`` longer: the runs become long enough to watch and to stop."""
    original = app.stream_answer

    def slow(*args, **kwargs):
        for part in original(*args, **kwargs):
            if isinstance(part, str):
                time.sleep(seconds)
            yield part

    monkeypatch.setattr(app, "stream_answer", slow)


def test_queue_full_says_busy_and_the_app_goes_on(monkeypatch):
    from gradio_client import Client
    from gradio_client.utils import QueueError

    s = _serve(limits=Limits(queue_size=1))
    try:
        client = Client(s.url, verbose=False)
        client.predict(example="moving-square", frames=4, max_new_tokens=1, api_name="/compare")    # warm
        _slow_stream(monkeypatch, 0.3)
        jobs = [client.submit(example="moving-square", frames=4, max_new_tokens=3, api_name="/compare")
                for _ in range(4)]
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(job.result(timeout=120)["compressed"]["new_tokens"])
            except QueueError as e:
                outcomes.append(str(e))
        assert outcomes.count("Queue is full! Please try again.") >= 1 and 3 in outcomes
        monkeypatch.undo()
        assert client.predict(example="moving-square", frames=4, max_new_tokens=1,
                              api_name="/compare")["compressed"]["new_tokens"] == 1
    finally:
        s.demo.close()


# ------------------------------------------------------------------------------------- the browser

@needs_chromium
def test_browser_upload_run_stream_stop_and_errors(square, tmp_path, monkeypatch):
    from playwright.sync_api import expect, sync_playwright

    s = _serve(allow_any_model=True)
    outside = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1400})

                def local_only(route):                      # the page must work without the internet
                    if route.request.url.startswith(s.url):
                        route.continue_()
                    else:
                        outside.append(route.request.url)
                        route.abort()

                page.route("**/*", local_only)
                page.goto(s.url)
                status = page.locator("#status")
                # upload (replaces the preloaded example), run, and see the answers, table and pictures
                page.click("#video button[aria-label=Clear]")
                page.locator("#video input[type=file]").set_input_files(square.path)
                page.locator("#question textarea").fill("What moves?")
                page.click("#run-btn")
                expect(status).to_contain_text("Done", timeout=120_000)
                table = page.locator("#token-table")
                for row in ("visual tokens", "time to first token", "decode", "KV cache", "position span"):
                    expect(table).to_contain_text(row)
                expect(page.locator("#merge-image img")).to_be_visible()
                expect(page.locator("#timeline-image img")).to_be_visible()
                assert page.locator("#comp-answer textarea").input_value() != ""
                page.screenshot(path=str(tmp_path / "1-done.png"), full_page=True)

                # a slider away from the preset: the preset box says so
                page.locator("#keep input[type=number]").fill("0.37")
                page.locator("#keep input[type=number]").press("Enter")
                expect(page.locator("#preset input")).to_have_value("custom", timeout=10_000)

                # streaming: the unpatched answer is on the page while the run is still going; then Stop
                _slow_stream(monkeypatch, 0.4)
                page.locator("#keep input[type=number]").fill("0.25")
                page.locator("#keep input[type=number]").press("Enter")
                page.click("#run-btn")
                expect(status).to_contain_text("Running 1/2: unpatched", timeout=60_000)
                expect(page.locator("#base-answer textarea")).not_to_have_value("", timeout=60_000)
                expect(status).to_contain_text("Running", timeout=1_000)
                page.screenshot(path=str(tmp_path / "2-streaming.png"), full_page=True)
                page.click("#stop-btn")
                expect(status).to_contain_text("Stopped", timeout=60_000)
                monkeypatch.undo()

                # an error, shown intact although it holds <...>
                page.locator("#model input").fill("tiny-random:<family>")
                page.locator("#model input").press("Enter")
                page.click("#run-btn")
                expect(status).to_contain_text("Could not load model 'tiny-random:<family>': unknown tiny family",
                                               timeout=60_000)
                page.screenshot(path=str(tmp_path / "3-error.png"), full_page=True)
            finally:
                browser.close()
    finally:
        s.demo.close()
    assert outside == [], f"the page tried to reach outside the app: {outside}"
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ("1-done.png", "2-streaming.png", "3-error.png"))


# ------------------------------------------------------------------------------ with the shipped model

def _shipped_default():
    try:
        from vlmcompress import models
    except ImportError:
        return None
    return models.DEFAULT if models.DEFAULT in models.available("vlm") else None


@pytest.mark.skipif(_shipped_default() is None,
                    reason="the shipped synth-onevision weights are not installed (train them: see README); "
                           "the default example's answer is only meaningful with them")
def test_default_example_is_answered_correctly_by_the_shipped_model(needle):
    # The page's default run: the shipped model, the needle example, 16 frames, preset balanced, and
    # prompt-guided pooling when the trained CLIP is installed (the page ticks it then).
    assert app.default_model() == "synth-onevision"
    relevance = app._scorer_for("synth-clip" in app._shipped("clip"))
    c = run_comparison(needle.path, None, needle.question, num_frames=16, max_new_tokens=4,
                       config=build_config("balanced", relevance=relevance))
    assert c.base.text.strip().lower() == needle.answer
    if relevance is not None:
        assert c.compressed.text.strip().lower() == needle.answer
    assert c.compressed.report.visual_after < c.compressed.report.visual_before / 4
