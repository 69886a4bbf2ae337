"""The task-trained models shipped in the package: they load offline as users load real models, they
see (held-out accuracy), patching at ratio 1 changes nothing, and their CLIP points at what is asked."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmcompress as vc
from vlmcompress.evaluation import EvalItem, evaluate, synthetic_items

VLMS = vc.models.names("vlm")


@pytest.fixture(scope="module", params=VLMS)
def shipped(request):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = vc.models.path(request.param)  # raises if the weights are missing from the package
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return request.param, model, processor


def test_models_ship_with_their_training_record():
    import json

    for name in vc.models.names(None):
        info = json.loads((vc.models.path(name) / "training.json").read_text())
        assert info["command"] and info["steps"] > 0


# What the shipped models reach on held-out items (README, "Models that see": 48 items per task, 16
# frames: 0.90-1.00 on every task). The bar is 95 %; shape (0.90 / 0.92) and OneVision's count
# (0.94) are just under it. Here: 4 fixed unseen items per task, so a bar is a number of hits.
LEARNED = {"colour": 0.9, "needle": 0.9, "digit": 0.9, "order": 0.9, "direction": 0.9, "shape": 0.75, "count": 0.75}


def test_sees_the_held_out_split(shipped):
    name, model, processor = shipped
    # 4 unseen items per task (indices far from the training monitor's), 16 frames, full greedy decoding.
    items = synthetic_items(list(LEARNED), per_task=4, frames=16, start=500)
    result = evaluate(model, processor, items, [], batch_size=8)
    for task, bar in LEARNED.items():
        assert result.row("none", task)["accuracy"] >= bar, (task, result.table())
    # The bar for this check: >= 90 % on the held-out sample as a whole.
    mean = sum(result.row("none", task)["accuracy"] for task in LEARNED) / len(LEARNED)
    assert mean >= 0.9, result.table()


def test_patched_at_ratio_one_is_bit_identical(shipped):
    name, model, processor = shipped
    items = synthetic_items(["digit", "order"], per_task=2, frames=8, start=600)
    result = evaluate(model, processor, items, [("ratio 1", vc.CompressionConfig())], batch_size=4)
    same = [r for r in result.records if r["setting"] == "ratio 1"]
    assert all(r["agree"] and r["kl"] == 0.0 for r in same)


def test_static_video_merged_to_one_frame_keeps_the_answer(shipped):
    from vlmcompress.steps import TemporalMerge
    from vlmcompress.synthetic import make_sample

    name, model, processor = shipped
    items = []
    for i in range(4):
        s = make_sample("count", 700 + i, frames=8)
        frames = np.repeat(s.frames[:1], 8, axis=0)  # a static video: every frame identical
        items.append(EvalItem(id=f"static-{i}", task="count", question=s.question, answers=(s.answer,), frames=frames))
    result = evaluate(model, processor, items, [("one frame", vc.CompressionConfig.from_steps(TemporalMerge(threshold=0.99)))],
                      batch_size=4)
    merged = [r for r in result.records if r["setting"] == "one frame"]
    per_frame = merged[0]["visual_before"] // 8 if name == "synth-qwen2-vl" else (merged[0]["visual_before"] - 1) // 8
    for r in merged:
        # Qwen pairs frames, so one "frame" of its grid is two video frames.
        one = r["visual_before"] // 4 if name == "synth-qwen2-vl" else per_frame + 1  # + OneVision's newline token
        assert r["visual_after"] == one and r["agree"], r


def test_clip_relevance_points_at_what_is_asked():
    from vlmcompress.synthetic import make_scene, make_sample

    scorer = vc.models.relevance_scorer()
    hits = []
    for i in range(6):
        s = make_scene("object", 800 + i, frames=2)
        rel = scorer.score("What digit is shown?", s.frames[:1]).reshape(8, 8)
        y, x, h, w = s.facts["digit_box"]
        box = torch.zeros(64, 64)
        box[y:y + h, x:x + w] = 1
        cells = box.reshape(8, 8, 8, 8).mean((1, 3)) > 0
        hits.append(float(rel[cells].sum()))
    assert np.mean(hits) > 0.5, hits  # most of the softmax mass on the digit's patches
    s = make_sample("needle", 900, frames=8)
    rel = scorer.score(s.question, s.frames).reshape(8, 64)
    assert int(rel.sum(1).argmax()) == s.facts["needle_frame"]
