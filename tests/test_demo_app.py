"""The Gradio demo: its plain functions on a generated video with a tiny model, and one browser run."""
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmcompress.config import PRESETS
from vlmcompress.demo import app
from vlmcompress.demo.app import DemoError, build_config, merge_strip, preset_values, run_comparison

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY = "tiny-random:llava_onevision"


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return app.example_video(tmp_path_factory.mktemp("video"))


@pytest.fixture(scope="module")
def comparison(video):
    return run_comparison(video, TINY, "What moves?", num_frames=8, max_new_tokens=3)


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] and not cells[0].startswith("-"):
            rows[cells[0]] = cells[1:]
    return rows


def test_table_numbers_match_the_report(comparison):
    r = comparison.compressed.report
    rows = _table_rows(comparison.table)
    assert rows["visual tokens"][:2] == [str(r.visual_before), str(r.visual_after)]
    assert rows["prefill tokens"][:2] == [str(r.prefill_before[0]), str(r.prefill_after[0])]
    assert rows["new tokens"][:2] == [str(comparison.base.new_tokens), str(comparison.compressed.new_tokens)]
    assert rows["seconds"][:2] == [f"{comparison.base.seconds:.3f}", f"{comparison.compressed.seconds:.3f}"]
    assert rows["visual tokens"][2] == f"{r.visual_after / r.visual_before:.1%} kept"
    assert r.visual_after < r.visual_before                      # balanced preset really compressed
    assert comparison.base.report is None and comparison.num_frames == 8
    assert comparison.config == PRESETS["balanced"]


def test_merge_image_tiles_the_shown_frames(comparison):
    item = next(it for it in comparison.compressed.report.items if it.modality == "video")
    assert item.grid[0] == 8                                     # 8 frames sampled, one grid step each
    width, height = round(128 * app.STRIP_HEIGHT / 96), app.STRIP_HEIGHT   # example video is 128×96
    img = comparison.merge_image
    assert img.dtype == np.uint8
    assert img.shape == (2 * height + 4, 4 * width + 3 * 4, 3)   # 8 frames in 2 rows of 4, 4-px gaps
    assert (img[height:height + 4] == 255).all()                 # white gap between the rows


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


def test_qwen_grid_groups_frames_in_time(video):
    c = run_comparison(video, "tiny-random:qwen2_vl", "What moves?", num_frames=8, max_new_tokens=2,
                       config=build_config("aggressive"))
    item = c.compressed.report.items[0]
    assert item.grid[0] == 4 and c.merge_image.shape[0] == app.STRIP_HEIGHT
    assert "Frames 0, 2, 4, 6 of 8" in c.note


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_values_rebuild_the_preset(preset):
    assert build_config(preset, *preset_values(preset)) == PRESETS[preset]


def test_sliders_override_the_preset():
    c = build_config("balanced", keep_ratio=0.5, temporal=False, temporal_threshold=0.7, v2pe_delta=0.5)
    assert (c.keep_ratio, c.temporal_threshold, c.v2pe_delta) == (0.5, None, 0.5)
    assert build_config("light", temporal=True, temporal_threshold=0.8).temporal_threshold == 0.8


def _garbage(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not really a video")
    return str(bad)


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
def test_bad_inputs_give_a_clear_error(case, message, video, tmp_path):
    kwargs = dict(video_path=video, model=TINY, question="What?", num_frames=4, max_new_tokens=2)
    kwargs.update({
        "no-video": dict(video_path=None),
        "missing-file": dict(video_path=str(tmp_path / "nope.mp4")),
        "garbage-file": dict(video_path=_garbage(tmp_path)),
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
], ids=["keep-ratio-0", "delta-2", "threshold-1.5", "unknown-preset"])
def test_bad_settings_are_named(changes, message):
    with pytest.raises(DemoError, match=re.escape(message)):
        build_config(**{"preset": "balanced", **changes})


def test_ui_callback_shows_errors_as_a_warning_not_a_traceback(video):
    status, base, comp, table, image, note = app._on_run(video, "tiny-random:nope", "q", 4, "balanced",
                                                         0.25, True, 0.9, 1.0, 2)
    assert status.startswith("**Error:**") and "unknown tiny family" in status and "Traceback" not in status
    assert (base, comp, table, image) == ("", "", "", None)


def test_cli_defaults():
    args = app.parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert app.parse_args(["--port", "9000", "--share"]).port == 9000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is missing: the browser test drives Debian's chromium "
                           "(apt-get install chromium)")
def test_browser_example_video_then_run(video):
    from playwright.sync_api import expect, sync_playwright

    expected = run_comparison(video, TINY, app.DEFAULT_QUESTION, num_frames=16, max_new_tokens=32).compressed.report
    demo = app.build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False,
                ssr_mode=False, quiet=True)
    base = f"http://127.0.0.1:{port}"
    outside = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1200})

                def local_only(route):                      # the page must work without the internet
                    if route.request.url.startswith(base):
                        route.continue_()
                    else:
                        outside.append(route.request.url)
                        route.abort()

                page.route("**/*", local_only)
                page.goto(base)
                page.click("#example-btn")
                expect(page.locator("#status")).to_contain_text("Generated a 32-frame example", timeout=30_000)
                page.click("#run-btn")
                table = page.locator("#token-table")
                expect(table).to_contain_text("visual tokens", timeout=60_000)
                row = next(line for line in table.inner_text().splitlines() if line.startswith("visual tokens"))
                assert row.split()[2:4] == [str(expected.visual_before), str(expected.visual_after)]
                expect(page.locator("#merge-image img")).to_be_visible()
                page.screenshot(path="/tmp/vlmcompress_demo_app.png", full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    assert outside == [], f"the page tried to reach outside the app: {outside}"
