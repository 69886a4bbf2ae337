"""vlmcompress-caption end to end, on files the tests generate with ffmpeg: every bad input is a record,
resume is exact, kills and torn lines are survived, batching and Ray give the local batch-1 records."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vlmcompress.demo import caption
from vlmcompress.demo.captioning import inputs as inputs_mod
from vlmcompress.demo.captioning.decode import DecodeError, Sampling, decode, parse_resize, sample_times
from vlmcompress.demo.captioning.records import Store

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command")

MODEL = "tiny-random:llava_onevision"
FAST = ["--model", MODEL, "--frames", "4", "--max-new-tokens", "3", "--no-progress"]
REPO = Path(__file__).resolve().parents[1]


def ffmpeg(*args):
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *map(str, args)], check=True)


def make_video(path, *, size="64x48", seconds=1, rate=8, extra=()):
    ffmpeg("-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}", "-t", seconds, *extra,
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", path)
    return Path(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Good videos in several containers, and every kind of bad input the issue lists."""
    root = tmp_path_factory.mktemp("media")
    good = root / "good"
    (good / "sub").mkdir(parents=True)
    make_video(good / "a.mp4", seconds=1)
    make_video(good / "sub" / "b.mkv", size="96x64", seconds=2, rate=4)
    for suffix in (".ts", ".mpg", ".flv", ".3gp"):        # the containers the old scan skipped
        ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=8", "-t", 1, "-pix_fmt", "yuv420p",
               *(["-c:v", "mpeg2video"] if suffix == ".mpg" else ["-c:v", "libx264"] if suffix != ".3gp"
                 else ["-c:v", "h263", "-s", "176x144"]), good / f"c{suffix}")
    (good / "notes.txt").write_text("not a video")        # not picked up by a folder scan
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "notes.txt").write_text("hello, I am text")
    ffmpeg("-f", "lavfi", "-i", "sine=d=1", "-c:a", "aac", bad / "audio.mp4")
    odd = root / "odd"
    odd.mkdir()
    make_video(odd / "tiny16.mp4", size="16x16")
    make_video(odd / "huge.mp4", size="4000x3000", seconds=1, rate=2)
    # Variable frame rate: 60 frames in the first second, then one frame every 0.5 s up to 4 s.
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x48:rate=60", "-t", 4,
           "-vf", "setpts='if(lt(N,60),N/60/TB,(1+(N-60)/2)/TB)'", "-fps_mode", "vfr",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", odd / "vfr.mp4")
    return root


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def by_name(path):
    return {Path(r["video"]).name: r for r in rows(path)}


# -- inputs ----------------------------------------------------------------------------------------

def test_inputs_folders_globs_lists_and_missing(media, tmp_path, monkeypatch):
    good = media / "good"
    found = inputs_mod.expand([str(good)])
    assert sorted(Path(i.path).name for i in found) == ["a.mp4", "b.mkv", "c.3gp", "c.flv", "c.mpg", "c.ts"]
    assert all(i.error is None and i.size > 0 for i in found)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# a comment\n\n{good / 'a.mp4'}\nmissing.mp4\n")
    monkeypatch.chdir(good)
    items = inputs_mod.expand(["sub/*.mkv", "a.mp4", f"@{lst}", str(good / "a.mp4"), "nothing*.mp4"],
                              files_from=[str(lst)])
    names = [(Path(i.path).name, i.error) for i in items]
    # a.mp4 three times (relative, absolute, from the list) is one item: identity is the resolved path
    assert names[0] == ("b.mkv", None) and names[1] == ("a.mp4", None)
    assert ("missing.mp4", f"no such file or folder: {tmp_path / 'missing.mp4'}") in names
    assert any(e == "no file matches the pattern nothing*.mp4" for _, e in names)
    assert len(items) == 4


def test_missing_list_file_is_a_failed_item(tmp_path):
    [item] = inputs_mod.expand([f"@{tmp_path / 'nope.txt'}"])
    assert item.error.startswith("cannot read list file") and "nope.txt" in item.error


# -- decoding --------------------------------------------------------------------------------------

def test_bad_files_give_plain_reasons(media):
    reasons = {}
    for name in ("corrupt.mp4", "empty.mp4", "notes.txt", "audio.mp4"):
        with pytest.raises(DecodeError) as e:
            decode(media / "bad" / name, Sampling(frames=4))
        reasons[name] = str(e.value)
    assert reasons["empty.mp4"] == "the file is empty (0 bytes)"
    assert reasons["audio.mp4"] == "the file has no video stream (audio only?)"
    assert reasons["corrupt.mp4"].startswith("not a video the decoder can read")
    assert reasons["notes.txt"].startswith("not a video the decoder can read")
    assert not any(".cc:" in r for r in reasons.values())      # no decoder source locations


def test_small_and_huge_videos_decode_resized(media):
    # decord reads a 16-px-wide video natively as 6 "channels"; decoding at a width multiple of 32 is right
    small = decode(media / "odd" / "tiny16.mp4", Sampling(frames=4))
    assert small.frames.shape == (4, 32, 32, 3) and small.source_size == (16, 16)
    huge = decode(media / "odd" / "huge.mp4", Sampling(frames=2, resize=("short", 96)))
    assert huge.source_size == (4000, 3000)
    assert huge.frames.shape == (2, 96, 128, 3)              # 96 px short side, aspect 4:3 kept
    exact = decode(media / "good" / "a.mp4", Sampling(frames=2, resize=("exact", 64, 64)))
    assert exact.frames.shape == (2, 64, 64, 3)


def test_variable_frame_rate_is_sampled_by_time(media):
    d = decode(media / "odd" / "vfr.mp4", Sampling(frames=16))
    # by frame number, 60 of its 66 frames are in the first second (15 of 16 samples would be there); by
    # time, the first second is 1/3.5 of the video: 5 of the 16 sample times fall in it
    assert (d.timestamps < 1.0).sum() == 5
    assert d.timestamps.max() >= 3.0
    assert np.all(np.diff(d.timestamps) > 0)
    assert d.sampled_fps == pytest.approx(len(d.frames) / d.duration) and 3.5 < d.duration < 3.6


def test_window_fps_and_max_frames(media):
    d = decode(media / "good" / "sub" / "b.mkv", Sampling(fps=2, start=0.5, end=1.5))
    assert list(np.round(d.timestamps, 3)) == [0.5, 1.0] and d.window == (0.5, 1.5)
    d = decode(media / "good" / "sub" / "b.mkv", Sampling(fps=4, max_frames=3))
    assert len(d.frames) == 3
    with pytest.raises(DecodeError, match="past the end"):
        decode(media / "good" / "a.mp4", Sampling(start=5.0))
    assert list(sample_times((0.0, 4.0), frames=4, fps=None, max_frames=None)) == [0.5, 1.5, 2.5, 3.5]


def test_parse_resize():
    assert parse_resize("384") == ("short", 384)
    assert parse_resize("640x360") == ("exact", 640, 360)
    assert parse_resize("none") is None and parse_resize("auto") == "auto"
    with pytest.raises(ValueError, match="--resize must be"):
        parse_resize("big")


# -- the command: failures are records ------------------------------------------------------------

def test_every_failure_is_a_record_and_the_run_goes_on(media, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    bad = media / "bad"
    args = [str(bad / "corrupt.mp4"), str(bad / "empty.mp4"), str(bad / "notes.txt"), str(bad / "audio.mp4"),
            str(tmp_path / "missing.mp4"), str(media / "odd"), str(media / "good" / "a.mp4"),
            "-o", str(out), "--resize", "96", *FAST]
    assert caption.main(args) == 1                              # non-zero: some failed
    recs = by_name(out)
    assert len(recs) == 9
    failed = {n: r for n, r in recs.items() if r["status"] == "failed"}
    assert sorted(failed) == ["audio.mp4", "corrupt.mp4", "empty.mp4", "missing.mp4", "notes.txt"]
    for name, r in failed.items():
        assert name in r["error"] and r["caption"] is None        # the file is named in its error
    assert failed["missing.mp4"]["error_stage"] == "input"
    assert failed["audio.mp4"]["error"].endswith("the file has no video stream (audio only?)")
    done = {n: r for n, r in recs.items() if r["status"] == "done"}
    assert sorted(done) == ["a.mp4", "huge.mp4", "tiny16.mp4", "vfr.mp4"]
    assert done["huge.mp4"]["decoded_size"] == [128, 96]
    err = capsys.readouterr().err
    assert "done 4, skipped 0, failed 5" in err and "saved" in err
    assert "random weights" in err                              # tiny-random is named with a warning


def test_record_is_complete(media, tmp_path):
    out = tmp_path / "c.jsonl"
    assert caption.main([str(media / "good" / "a.mp4"), "-o", str(out), "--keep-ratio", "0.5", *FAST]) == 0
    [r] = rows(out)
    assert r["status"] == "done" and isinstance(r["caption"], str) and r["error"] is None
    assert r["model"] == MODEL and r["prompt"] == "Describe this video in detail." and r["preset"] == "balanced"
    assert r["settings"]["compression"]["keep_ratio"] == 0.5
    assert r["settings"]["sampling"]["frames"] == 4 and r["settings"]["max_new_tokens"] == 3
    assert r["frames"] == 4 and len(r["timestamps"]) == 4 and r["timestamps"] == sorted(r["timestamps"])
    assert 0 < r["visual_tokens_kept"] < r["visual_tokens"]
    assert 0 < r["prefill_tokens_kept"] < r["prefill_tokens"]
    assert r["prefill_tokens"] - r["prefill_tokens_kept"] == r["visual_tokens"] - r["visual_tokens_kept"]
    assert 1 <= r["generated_tokens"] <= 3
    assert set(r["seconds"]) == {"decode", "vision", "prefill", "generate", "total"}
    assert all(v >= 0 for v in r["seconds"].values()) and r["seconds"]["vision"] > 0
    assert r["video"] == str((media / "good" / "a.mp4").resolve())


def test_stdout_output(media, tmp_path, capsys):
    assert caption.main([str(media / "good" / "a.mp4"), "-o", "-", *FAST]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and json.loads(out[0])["status"] == "done"


# -- resume ---------------------------------------------------------------------------------------

def test_resume_is_keyed_on_path_model_settings_and_prompt(media, tmp_path, capsys, monkeypatch):
    out = tmp_path / "c.jsonl"
    good = media / "good"
    assert caption.main([str(good / "a.mp4"), str(good / "sub"), "-o", str(out), *FAST]) == 0
    assert len(rows(out)) == 2
    monkeypatch.chdir(good)                                    # the same files, spelled relatively
    assert caption.main(["a.mp4", "sub/b.mkv", "-o", str(out), *FAST]) == 0
    assert len(rows(out)) == 2
    assert "done 0, skipped 2, failed 0" in capsys.readouterr().err
    for change in (["--keep-ratio", "0.5"], ["--prompt", "What moves?"], ["--preset", "light"], ["--frames", "2"]):
        assert caption.main(["a.mp4", "-o", str(out), *FAST, *change]) == 0
    assert len(rows(out)) == 6                                 # each change captioned a.mp4 again
    assert len({r["key"] for r in rows(out)}) == 6
    # a file that changed (size/mtime) is captioned again
    copy = tmp_path / "copy.mp4"
    shutil.copy(good / "a.mp4", copy)
    assert caption.main([str(copy), "-o", str(out), *FAST]) == 0
    os.utime(copy, (time.time() + 10, time.time() + 10))
    assert caption.main([str(copy), "-o", str(out), *FAST]) == 0
    assert sum(Path(r["video"]).name == "copy.mp4" for r in rows(out)) == 2


def test_retry_failed_and_overwrite_keep_one_record_per_video(media, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    args = [str(media / "bad" / "empty.mp4"), str(media / "good" / "a.mp4"), "-o", str(out), *FAST]
    assert caption.main(args) == 1
    assert caption.main(args) == 0                             # failed ones are skipped, and said so
    assert "1 failed before: --retry-failed" in capsys.readouterr().err
    assert caption.main(args + ["--retry-failed"]) == 1
    assert "done 0, skipped 1, failed 1" in capsys.readouterr().err
    assert len(rows(out)) == 2
    first = by_name(out)["a.mp4"]["time"]
    time.sleep(1.1)
    assert caption.main(args + ["--overwrite"]) == 1
    recs = rows(out)
    assert len(recs) == 2 and by_name(out)["a.mp4"]["time"] != first


def test_torn_last_line_is_dropped_with_a_warning(media, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    good = media / "good"
    assert caption.main([str(good / "a.mp4"), "-o", str(out), *FAST]) == 0
    torn = json.dumps(rows(out)[0] | {"video": "x"})[:40]
    with out.open("a") as f:
        f.write(torn)                                          # a kill in the middle of a write
    assert caption.main([str(good / "a.mp4"), str(good / "sub"), "-o", str(out), *FAST]) == 0
    assert "last line is cut off" in capsys.readouterr().err
    recs = rows(out)                                           # every line parses again
    assert sorted(Path(r["video"]).name for r in recs) == ["a.mp4", "b.mkv"]


def test_bad_line_in_the_middle_is_skipped(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text('{"key": "k1", "status": "done"}\nnot json\n{"key": "k2", "error": "x"}\n')
    warnings = []
    assert Store(str(out), warn=warnings.append).load() == {"k1": "done", "k2": "failed"}
    assert len(warnings) == 1 and "line 2" in warnings[0]


def test_second_run_on_one_output_is_refused(media, tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "c.jsonl"
    with FileLock(str(out) + ".lock", timeout=0):             # another run holds the output
        assert caption.main([str(media / "good" / "a.mp4"), "-o", str(out), *FAST]) == 2
    assert "another run is writing" in capsys.readouterr().err
    assert not out.exists()
    assert caption.main([str(media / "good" / "a.mp4"), "-o", str(out), *FAST]) == 0


def test_output_folder_gets_one_shard_per_run(media, tmp_path):
    out = tmp_path / "shards"
    assert caption.main([str(media / "good" / "a.mp4"), "-o", f"{out}/", *FAST]) == 0
    assert caption.main([str(media / "good" / "a.mp4"), str(media / "good" / "sub"), "-o", str(out), *FAST]) == 0
    shards = sorted(out.glob("*.jsonl"))
    assert len(shards) == 2
    assert sorted(Path(r["video"]).name for s in shards for r in rows(s)) == ["a.mp4", "b.mkv"]


def _spawn(args, out):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-P", "-m", "vlmcompress.demo.caption", *args, "-o", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(out, proc, n=1, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"no record within {timeout} s: {proc.poll()=}")


@pytest.fixture(scope="module")
def many(media, tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    for i in range(8):
        shutil.copy(media / "good" / "a.mp4", root / f"v{i}.mp4")
        os.utime(root / f"v{i}.mp4", (1e9 + i, 1e9 + i))       # distinct files: distinct mtimes
    return root


def test_kill_9_mid_run_then_rerun_gives_every_video_once(many, tmp_path):
    out = tmp_path / "c.jsonl"
    args = [str(many), "--model", MODEL, "--frames", "4", "--max-new-tokens", "24", "--decode-workers", "0"]
    proc = _spawn(args, out)
    _wait_for_lines(out, proc)
    proc.kill()
    proc.wait()
    assert len(out.read_text().splitlines()) < 8, "the run ended before it could be killed mid-way"
    again = _spawn(args, out)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err
    recs = rows(out)
    assert sorted(Path(r["video"]).name for r in recs) == [f"v{i}.mp4" for i in range(8)]
    assert all(r["status"] == "done" for r in recs)


def test_sigint_finishes_the_record_and_says_how_to_resume(many, tmp_path):
    out = tmp_path / "c.jsonl"
    proc = _spawn([str(many), "--model", MODEL, "--frames", "4", "--max-new-tokens", "24"], out)
    _wait_for_lines(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 130
    assert "Traceback" not in err and "run the same command again to resume" in err
    recs = rows(out)                                           # whole lines only
    assert 1 <= len(recs) < 8


def test_decoder_messages_do_not_reach_the_terminal(media, tmp_path):
    out = tmp_path / "c.jsonl"
    proc = _spawn([str(media / "bad" / "corrupt.mp4"), str(media / "bad" / "notes.txt"), *FAST], out)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 1
    assert ".cc:" not in err and "Invalid data" not in err      # decord/ffmpeg's own lines are silenced
    assert "failed 2" in err
    proc = _spawn([str(media / "bad" / "corrupt.mp4"), *FAST, "--verbose"], tmp_path / "d.jsonl")
    assert ".cc:" in proc.communicate(timeout=900)[1]           # and kept with --verbose


# -- batching and Ray give the same records --------------------------------------------------------

SAME = ("caption", "frames", "timestamps", "visual_tokens", "visual_tokens_kept", "prefill_tokens",
        "prefill_tokens_kept", "generated_tokens", "key", "status")


@pytest.fixture(scope="module")
def batch_one(media, tmp_path_factory):
    out = tmp_path_factory.mktemp("b1") / "c.jsonl"
    args = [str(media / "good" / "a.mp4"), str(media / "good" / "sub"), str(media / "odd" / "vfr.mp4"),
            str(media / "bad" / "empty.mp4"), "--max-new-tokens", "8"]
    assert caption.main([*args, "-o", str(out), "--model", MODEL, "--frames", "4", "--no-progress"]) == 1
    return args, by_name(out)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl"])
def test_batched_captions_equal_batch_one(media, tmp_path, family):
    videos = [str(media / "good" / "a.mp4"), str(media / "good" / "sub" / "b.mkv"), str(media / "odd" / "vfr.mp4")]
    common = [*videos, "--model", f"tiny-random:{family}", "--frames", "4", "--max-new-tokens", "8", "--no-progress"]
    assert caption.main([*common, "-o", str(tmp_path / "one.jsonl"), "--batch-size", "1"]) == 0
    assert caption.main([*common, "-o", str(tmp_path / "three.jsonl"), "--batch-size", "3"]) == 0
    one, three = by_name(tmp_path / "one.jsonl"), by_name(tmp_path / "three.jsonl")
    assert {r["batch_size"] for r in three.values()} == {3}
    for name in one:
        assert {k: one[name][k] for k in SAME} == {k: three[name][k] for k in SAME}, name


def test_ray_engine_gives_the_local_records(batch_one, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed: pip install 'vlmcompress[ray]' (the dev extra has it)")
    args, local = batch_one
    out = tmp_path / "ray"
    code = caption.main([*args, "-o", f"{out}/", "--model", MODEL, "--frames", "4", "--no-progress",
                         "--engine", "ray", "--workers", "2", "--batch-size", "2"])
    assert code == 1
    remote = {Path(r["video"]).name: r for s in out.glob("*.jsonl") for r in rows(s)}
    assert sorted(remote) == sorted(local)
    assert [r["status"] for r in remote.values()].count("failed") == 1, [r["error"] for r in remote.values()]
    for name in local:
        assert {k: local[name][k] for k in SAME} == {k: remote[name][k] for k in SAME}, name
    # and the same resume logic reads it: nothing left to do
    assert caption.main([*args, "-o", f"{out}/", "--model", MODEL, "--frames", "4", "--no-progress"]) == 0


# -- model, device, output and flags ---------------------------------------------------------------

def test_default_model_is_the_shipped_one_or_model_is_required(media, tmp_path, capsys, monkeypatch):
    from vlmcompress import models
    from vlmcompress.testing.tiny_models import tiny_model_and_processor

    monkeypatch.setattr(models, "available", lambda kind="vlm": [])
    assert caption.main([str(media / "good" / "a.mp4"), "-o", str(tmp_path / "c.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "give --model" in err and models.DEFAULT in err
    loaded = []

    def fake_load(name, **kw):
        loaded.append(name)
        return tiny_model_and_processor("llava_onevision")

    monkeypatch.setattr(models, "available", lambda kind="vlm": [models.DEFAULT])
    monkeypatch.setattr(models, "load", fake_load)
    out = tmp_path / "d.jsonl"
    assert caption.main([str(media / "good" / "a.mp4"), "-o", str(out), "--frames", "4", "--max-new-tokens", "2"]) == 0
    assert loaded == [models.DEFAULT] and rows(out)[0]["model"] == models.DEFAULT
    assert "random weights" not in capsys.readouterr().err
    assert caption.main([str(media / "good" / "a.mp4"), "-o", str(out), "--model", "synth-qwen2-vl", "--frames", "4",
                         "--max-new-tokens", "2"]) == 0                 # shipped names are accepted
    assert loaded[-1] == "synth-qwen2-vl"


def test_unusable_model_device_or_output_is_a_clear_error_before_any_work(media, tmp_path, capsys):
    video = str(media / "good" / "a.mp4")
    out = tmp_path / "c.jsonl"
    assert caption.main([video, "-o", str(out), "--model", "tiny-random:llava"]) == 2
    assert "reads images only" in capsys.readouterr().err
    assert not out.exists()                                    # no empty output left behind
    assert caption.main([video, "-o", str(out), "--model", "tiny-random:bert"]) == 2
    assert "unknown tiny family" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert caption.main([video, "-o", str(out), *FAST, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


def test_missing_output_folder_message(media, tmp_path, capsys):
    assert caption.main([str(media / "good" / "a.mp4"), "-o", str(tmp_path / "no" / "c.jsonl"), *FAST]) == 2
    assert f"output folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err


def test_every_compression_field_is_a_flag():
    import dataclasses

    from vlmcompress.config import CompressionConfig

    flags = {a.dest for a in caption.parser()._actions}
    missing = [f.name for f in dataclasses.fields(CompressionConfig) if f.name not in flags]
    assert missing == []
    args = caption.parse_args(["x.mp4", "--preset", "aggressive", "--keep-ratio", "0.3", "--temporal-threshold", "none",
                               "--token-budget", "50", "--no-proportional-attention", "--v2pe-delta", "0.5",
                               "--vision-keep", "0.8", "--budget-method", "merge"])
    c = args.config
    assert (c.keep_ratio, c.temporal_threshold, c.token_budget, c.proportional_attention, c.v2pe_delta,
            c.vision_keep, c.budget_method) == (0.3, None, 50, False, 0.5, 0.8, "merge")


@pytest.mark.parametrize("argv, message", [
    (["--keep-ratio", "1.5"], "keep_ratio must be a fraction"),
    (["--frames", "0"], "must be > 0"),
    (["--resize", "huge"], "--resize must be"),
    (["--start", "3", "--end", "2"], "--end (2 s) must be after --start (3 s)"),
    (["--fps", "2", "--frames", "3"], "give --frames or --fps"),
    (["--shard", "4/4"], "--shard must be I/N"),
])
def test_bad_flags_name_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        caption.parse_args(["x.mp4", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_steps_flag_builds_stage_b_steps():
    steps = pytest.importorskip("vlmcompress.steps")
    from vlmcompress.config import CompressionConfig

    if "steps" not in {f.name for f in __import__("dataclasses").fields(CompressionConfig)}:
        pytest.skip("this CompressionConfig has no steps field")
    args = caption.parse_args(["x.mp4", "--steps", '[{"step": "RandomDrop", "keep_ratio": 0.25, "seed": 0}]'])
    assert args.config.steps == (steps.RandomDrop(keep_ratio=0.25, seed=0),)
    with pytest.raises(SystemExit):
        caption.parse_args(["x.mp4", "--steps", '[{"step": "Nope"}]'])
