"""The main job (demo CLI), end to end on a generated video (the captioning command: test_caption.py)."""

import pytest
import torch

from vlmcompress.demo.__main__ import main as demo_main


@pytest.fixture(autouse=True)
def example_cache(tmp_path, monkeypatch):
    """The demo's example video is generated here, not into the user's ~/.cache."""
    monkeypatch.setenv("VLMCOMPRESS_CACHE", str(tmp_path / "cache"))


def test_demo_prints_token_table(capsys):
    assert demo_main(["--frames", "8", "--max-new-tokens", "3", "--model", "tiny-random:qwen2_vl"]) == 0
    out = capsys.readouterr().out
    assert "| unpatched |" in out and "| balanced |" in out
    assert "visual tokens" in out
    assert "example needle-2min" in out                  # the web demo's default example, by default


def test_demo_default_model_is_the_shipped_one_when_installed():
    from vlmcompress import models
    from vlmcompress.demo.__main__ import parse_args

    expected = "synth-onevision" if "synth-onevision" in models.available() else "tiny-random:llava_onevision"
    assert parse_args([]).model == expected


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


def test_load_a_saved_folder_offline(tmp_path):
    from vlmcompress.demo.runner import load
    from vlmcompress.testing.tiny_models import tiny_model_and_processor

    model, processor = tiny_model_and_processor("qwen2_vl")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load(str(tmp_path), dtype="bfloat16", local_files_only=True)
    assert type(loaded) is type(model) and loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded_processor.tokenizer.padding_side == "left"
