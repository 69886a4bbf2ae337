"""vlmcompress.evaluate / vlmcompress-eval on tiny models: identities, equal kept counts, outputs, bad input."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from vlmcompress.evaluation import (DatasetError, EvalItem, evaluate, jsonl_items, parse_setting, synthetic_items)
from vlmcompress.evaluation.cli import main as eval_main
from vlmcompress.testing.tiny_models import tiny_model_and_processor


@pytest.fixture(scope="module")
def ov():
    return tiny_model_and_processor("llava_onevision")


@pytest.fixture(scope="module")
def items():
    # The tiny OneVision reads 48-px frames; the synthetic videos are resized by its processor.
    return synthetic_items(["colour", "needle"], per_task=2, frames=4, size=48)


@pytest.fixture(scope="module")
def result(ov, items):
    model, processor = ov
    return evaluate(model, processor, items,
                    ["uniform-pool@1", "v2pe@1", "random-drop@0.25", "uniform-pool@0.25", "merge@0.25"], batch_size=2)


def test_identity_settings_have_zero_kl_and_full_agreement(result):
    for label in ("none", "uniform-pool@1", "v2pe@1"):
        row = result.row(label)
        assert row["kl"] == 0.0 and row["agreement"] == 1.0, label
        assert row["visual_after"] == row["visual_before"]
    assert result.row("merge@0.25")["kl"] > 0.0  # the KL does see a change when tokens go


def test_baselines_keep_exactly_the_same_count(result, items):
    from vlmcompress.pool import grid_for_budget
    from vlmcompress.schedule import kept_count

    # A 4-frame tiny OneVision video: 4×3×3 grid + 1 newline token; pooling to 25 % picks a grid.
    n = 4 * 3 * 3
    expected = math.prod(grid_for_budget((4, 3, 3), kept_count(0.25, n + 1))) + 1
    for label in ("random-drop@0.25", "uniform-pool@0.25"):
        recs = [r for r in result.records if r["setting"] == label]
        assert len(recs) == len(items)
        assert {r["visual_after"] for r in recs} == {expected}, label
        assert {r["visual_before"] for r in recs} == {n + 1}


def test_summary_rows_and_ratios(result):
    none = result.row("none")
    assert none["total_x"] == 1.0 and none["kv_x"] == 1.0
    # Random weights answer nothing right: accuracy retained is undefined (0 / 0), not a number.
    assert none["accuracy"] == 0.0 and math.isnan(none["retained"])
    for row in result.summary:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["kl"] >= 0.0
        assert row["vision_s"] >= 0 and row["total_s"] > 0 and row["kv_mb"] > 0
    # The mean row is the macro average of the task rows.
    for label in result.settings:
        tasks = [result.row(label, t)["accuracy"] for t in result.tasks]
        assert result.row(label)["accuracy"] == pytest.approx(sum(tasks) / len(tasks))
    # Fewer tokens reach the LLM, so the KV cache shrinks.
    assert result.row("uniform-pool@0.25")["kv_mb"] < none["kv_mb"]


def test_outputs_are_written(result, tmp_path):
    paths = result.write(tmp_path, stem="run")
    rows = list(csv.DictReader(paths["csv"].open()))
    assert {r["setting"] for r in rows} == set(result.settings)
    doc = json.loads(paths["json"].read_text())
    assert len(doc["records"]) == len(result.records) and doc["summary"]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| none |" in paths["md"].read_text()


def test_bad_settings_name_what_is_accepted():
    with pytest.raises(ValueError, match="unknown method 'blur'.*methods are"):
        parse_setting("blur@0.1")
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        parse_setting("uniform-pool@2")
    with pytest.raises(ValueError, match="needs a kept fraction"):
        parse_setting("uniform-pool")
    with pytest.raises(ValueError, match="needs a relevance scorer"):
        parse_setting("prompt-pool@0.1")
    with pytest.raises(ValueError, match="unknown preset"):
        parse_setting("preset:extreme")
    with pytest.raises(TypeError, match="a setting must be"):
        parse_setting(0.1)


def test_repeated_settings_and_empty_dataset_are_refused(ov, items):
    model, processor = ov
    with pytest.raises(ValueError, match="repeated"):
        evaluate(model, processor, items, ["merge@0.5", "merge@0.5"])
    with pytest.raises(ValueError, match="no items"):
        evaluate(model, processor, [], ["merge@0.5"])


def test_jsonl_dataset_and_its_errors(tmp_path):
    from vlmcompress.synthetic import make_sample, write_video

    s = make_sample("colour", 0, frames=4)
    write_video(s.frames, tmp_path / "a.mp4", fps=4)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"video": "a.mp4", "question": s.question, "answer": s.answer, "task": "colour"}) + "\n\n")
    [item] = jsonl_items(good, frames=4)
    assert item.answers == (s.answer,) and item.frames.shape == (4, 64, 64, 3) and item.task == "colour"
    cases = {
        '{"video": "a.mp4", "question": "q"': "line 2: not valid JSON",
        '{"question": "q", "answer": "a"}': 'line 2: needs exactly one of "video" or "image"',
        '{"video": "a.mp4", "answer": "a"}': 'line 2: "question" must be',
        '{"video": "a.mp4", "question": "q", "answers": []}': 'line 2: "answer" must be',
        '{"video": "missing.mp4", "question": "q", "answer": "a"}': "line 2: video file .* does not exist",
        '[1, 2]': "line 2: expected a JSON object",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(good.read_text().strip() + "\n" + line + "\n")
        with pytest.raises(DatasetError, match=message):
            jsonl_items(bad)
    (tmp_path / "notavideo.mp4").write_text("hello")
    bad.write_text('{"video": "notavideo.mp4", "question": "q", "answer": "a"}\n')
    with pytest.raises(DatasetError, match="line 1: cannot read video"):
        jsonl_items(bad)


def test_image_items(ov):
    model, processor = ov
    rng = np.random.default_rng(0)
    img = EvalItem(id="img", task="t", question="What colour?", answers=("red",),
                   image=rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    res = evaluate(model, processor, [img], ["merge@0.5"])
    assert res.row("merge@0.5")["visual_after"] < res.row("none")["visual_after"]


def test_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    code = eval_main(["--model", "tiny-random:llava_onevision", "--clip", "none", "--tasks", "count", "--per-task", "2",
                      "--frames", "4", "--settings", "uniform-pool@0.5", "random-drop@0.5", "--out", str(out), "--no-plot"])
    assert code == 0
    assert (out / "eval.csv").is_file() and (out / "eval.json").is_file() and not (out / "eval.png").exists()
    assert "| uniform-pool@0.5 |" in capsys.readouterr().out
    assert eval_main(["--model", "tiny-random:llava_onevision", "--clip", "none", "--settings", "blur@0.1",
                      "--per-task", "1", "--tasks", "count", "--frames", "2", "--out", str(out)]) == 2
    assert "unknown method 'blur'" in capsys.readouterr().err
    assert eval_main(["--data", str(tmp_path / "none.jsonl"), "--model", "tiny-random:llava_onevision"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert eval_main(["--tasks", "smell", "--model", "tiny-random:llava_onevision"]) == 2
    assert "tasks must be" in capsys.readouterr().err
