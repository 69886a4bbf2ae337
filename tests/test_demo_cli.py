"""The main job (demo CLI) and the captioning command, end to end on generated videos."""
import json

import pytest
import torch

from vlmcompress.demo import caption
from vlmcompress.demo.__main__ import main as demo_main
from vlmcompress.testing.video import make_test_video


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    make_test_video(root / "a.mp4", frames=8, size=(64, 64), pattern="moving_square")
    (root / "sub").mkdir()
    make_test_video(root / "sub" / "b.mp4", frames=8, size=(64, 64), pattern="static", seed=1)
    (root / "notes.txt").write_text("not a video")
    return root


def test_demo_prints_token_table(capsys):
    assert demo_main(["--frames", "8", "--max-new-tokens", "3", "--model", "tiny-random:qwen2_vl"]) == 0
    out = capsys.readouterr().out
    assert "| unpatched |" in out and "| balanced |" in out
    assert "visual tokens" in out


def test_caption_writes_one_line_per_video_and_resumes(videos, tmp_path):
    out = tmp_path / "c.jsonl"
    args = [str(videos), "-o", str(out), "--frames", "4", "--max-new-tokens", "3", "--model", "tiny-random:llava_onevision"]
    assert caption.main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["video"].split("/")[-1] for r in rows) == ["a.mp4", "b.mp4"]
    assert all("caption" in r and r["visual_tokens_kept"] < r["visual_tokens"] for r in rows)
    assert caption.main(args) == 0                       # resumes: nothing new to write
    assert len(out.read_text().splitlines()) == 2


def test_caption_reports_bad_files_and_goes_on(videos, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not really a video")
    out = tmp_path / "c.jsonl"
    code = caption.main([str(bad), str(videos / "a.mp4"), "-o", str(out), "--frames", "4", "--max-new-tokens", "2"])
    assert code == 0
    rows = {r["video"].split("/")[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "error" in rows["broken.mp4"] and "caption" in rows["a.mp4"]


def test_caption_missing_input_is_a_clear_error(tmp_path, capsys):
    assert caption.main([str(tmp_path / "nope"), "-o", str(tmp_path / "c.jsonl")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_missing_model_folder_is_a_clear_error(tmp_path, capsys):
    from vlmcompress.demo.runner import load

    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="dtype must be"):
        load(str(tmp_path), dtype="float17")
    assert demo_main(["--frames", "4", "--model", str(tmp_path / "nope")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    assert demo_main(["--video", str(tmp_path / "nope.mp4")]) == 2
    assert "could not read video" in capsys.readouterr().err


def test_caption_missing_model_is_a_clear_error(videos, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert caption.main([str(videos / "a.mp4"), "-o", str(out), "--model", "tiny-random:bert"]) == 2
    assert "unknown tiny family" in capsys.readouterr().err


def test_load_a_saved_folder_offline(tmp_path):
    from vlmcompress.demo.runner import load
    from vlmcompress.testing.tiny_models import tiny_model_and_processor

    model, processor = tiny_model_and_processor("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load(str(tmp_path), dtype="bfloat16", local_files_only=True)
    assert type(loaded) is type(model) and loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded_processor.tokenizer.padding_side == "left"
