"""The training scripts run end to end on a very small setting, so they cannot rot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmcompress.synthetic import ANSWERS
from vlmcompress.training import train_vlm
from vlmcompress.training.build import FAMILIES, seeing_tokenizer


@pytest.mark.parametrize("family", FAMILIES)
def test_every_answer_is_one_token(family):
    tok = seeing_tokenizer(family)
    for answers in ANSWERS.values():
        for word in answers:
            assert len(tok.encode(word, add_special_tokens=False)) == 1, word


def test_labels_cover_only_the_assistant_turns():
    header, end = [7, 8], 9
    ids = torch.tensor([[1, 7, 8, 5, 9, 2, 7, 8, 6, 6, 9, 0]])
    labels = train_vlm._labels(ids, header, end)
    assert labels.tolist() == [[-100, -100, -100, 5, 9, -100, -100, -100, 6, 6, 9, -100]]


def test_v2pe_positions_follow_the_package_rule():
    from vlmcompress.positions import v2pe_position_ids

    ids = torch.tensor([[1, 2, 5, 5, 5, 5, 3, 4], [1, 5, 5, 5, 5, 3, 4, 0]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0]])
    pos = train_vlm.v2pe_positions(ids, mask, 5, [0.25, 1.0])
    assert pos[0].tolist() == [0, 1, 1.25, 1.5, 1.75, 2.0, 3, 4]
    assert pos[1, :7].tolist() == list(range(7))
    assert torch.equal(pos[1:], v2pe_position_ids(ids[1:] == 5, 1.0, attention_mask=mask[1:], dtype=torch.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_and_export(family, tmp_path):
    run = tmp_path / "run"
    common = ["--family", family, "--out", str(run), "--batch", "2", "--eval-every", "100", "--eval-per-task", "1",
              "--ckpt-every", "2", "--max-frames", "8"]
    if family == "llava_onevision":
        common.append("--v2pe-mix")
    assert train_vlm.main(common + ["--steps", "2"]) == 0
    log = json.loads((run / "checkpoint" / "train_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)
    assert any("scene" in e for e in log)  # the LLM-level direction/count head is trained by default
    state = torch.load(run / "checkpoint" / "train_state.pt", weights_only=False)
    assert {"aux", "aux_position", "scene", "scene_shape"} <= set(state)   # every head resumes with the model
    assert train_vlm.main(common + ["--steps", "3", "--resume"]) == 0  # continues at step 3, evaluates at the end
    log = json.loads((run / "checkpoint" / "train_log.json").read_text())
    assert [e["step"] for e in log] == [1, 2, 3] and set(log[-1]["acc"]) == set(ANSWERS)
    dest = train_vlm.export(run, "synth-test", "the command", root=tmp_path / "models")
    info = json.loads((dest / "training.json").read_text())
    assert info["steps"] == 3 and info["command"] == "the command"
    assert not (dest / "train_state.pt").exists()

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(dest, local_files_only=True)
    processor = AutoProcessor.from_pretrained(dest, local_files_only=True)
    acc = train_vlm.answer_accuracy(model, processor, per_task=1, frames=4, tasks=("colour",))
    assert set(acc) == {"colour"} and 0.0 <= acc["colour"] <= 1.0

    # Fine-tuning from that run (--init): new schedule, the chain of commands and times is exported.
    tuned = tmp_path / "tuned"
    assert train_vlm.main(["--family", family, "--out", str(tuned), "--init", str(run), "--batch", "2",
                           "--steps", "1", "--eval-every", "100", "--eval-per-task", "1", "--max-frames", "8"]) == 0
    log = json.loads((tuned / "checkpoint" / "train_log.json").read_text())
    assert [e["step"] for e in log] == [1]
    info = json.loads((train_vlm.export(tuned, "synth-tuned", "cmd2", root=tmp_path / "models") / "training.json").read_text())
    assert info["init_from"]["steps"] == 3 and "--init" not in (info["init_from"]["command"] or "")
    assert info["total_wall_minutes_with_init_runs"] >= info["wall_minutes"]

    # An exported model carries its auxiliary heads, so training can go on from the shipped folder.
    assert (dest / train_vlm.HEADS_FILE).is_file()
    again = tmp_path / "again"
    assert train_vlm.main(["--family", family, "--out", str(again), "--init", str(dest), "--batch", "2",
                           "--steps", "1", "--eval-every", "100", "--eval-per-task", "1", "--max-frames", "8"]) == 0
    state = torch.load(again / "checkpoint" / "train_state.pt", weights_only=False)
    from safetensors.torch import load_file

    shipped = load_file(dest / train_vlm.HEADS_FILE)
    assert set(shipped) == {f"{h}/{k}" for h in ("aux", "aux_position", "scene", "scene_shape") for k in ("weight", "bias")}
    assert json.loads((again / "init_from.json").read_text())["steps"] == 3
    assert state["step"] == 1


def test_clip_training_and_scorer(tmp_path):
    from vlmcompress.synthetic import make_scene
    from vlmcompress.training import clip

    ckpt = clip.train_clip(tmp_path / "clip", steps=2, batch=4, log_every=1)
    log = json.loads((ckpt / "train_log.json").read_text())
    assert len(log) == 2 and all(np.isfinite(e["grounding"]) for e in log)
    dest = clip.export(tmp_path / "clip", "cmd", root=tmp_path / "models")
    scorer = clip.load_scorer(dest)
    scene = make_scene("object", 0, frames=4)
    rel = scorer.score("What digit is shown?", scene.frames, target_grid=(4, 4, 4))
    assert rel.shape == (1, 64) and torch.isfinite(rel).all()


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        train_vlm.main(["--steps", "1"])
    assert "--family and --out are required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_vlm.main(["--export", "somewhere"])
    assert "--export needs --name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_vlm.main(["--family", "qwen2_vl", "--out", "/tmp/never-written", "--init", "/nonexistent/run"])
    assert "--init /nonexistent/run: no finished run there" in capsys.readouterr().err
    assert not Path("/tmp/never-written").exists()            # refused before anything is written
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(SystemExit):
            train_vlm.main(["--family", "qwen2_vl", "--out", "/tmp/never-written", "--count-share", bad])
        assert "--count-share: must be a fraction in [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("share,kinds", [(1.0, {"count"}), (0.0, {"object"})])
def test_count_share_sets_the_spatial_mix(share, kinds):
    import random

    from vlmcompress.training.build import seeing_processor

    processor = seeing_processor("qwen2_vl")
    _, scenes = train_vlm._batch(processor, "spatial", random.Random(0), 3, 6, 2, 0.0, share)
    assert {s.kind for s in scenes} == kinds
    _, default = train_vlm._batch(processor, "spatial", random.Random(0), 3, 32, 2, 0.0)
    assert {s.kind for s in default} == {"object", "count"}      # the default mix has both


def test_aux_cell_labels_mark_what_is_drawn():
    from vlmcompress.synthetic import SHAPES, make_scene
    from vlmcompress.training.aux_labels import cell_labels

    s = make_scene("object", 3, frames=4)
    for t in range(4):
        lab = cell_labels(s, t, 8)
        y, x, h, w = s.facts["object_boxes"][t]
        centre = int((y + h // 2) // 8) * 8 + int((x + w // 2) // 8)
        assert lab["shape"][centre] == 1 + SHAPES.index(s.facts["shape"])
        y, x, h, w = s.facts["digit_box"]
        centre = int((y + h // 2) // 8) * 8 + int((x + w // 2) // 8)
        assert lab["digit"][centre] == 1 + int(s.facts["digit"])
        assert 0 < int((lab["shape"] > 0).sum()) <= 4 and int((lab["digit"] > 0).sum()) >= 2
    n = make_scene("needle", 1, frames=6)
    k = n.facts["needle_frame"]
    assert (cell_labels(n, k, 4)["colour"] > 0).sum() == 4            # a 32-px marker covers 2×2 16-px cells
    assert all((cell_labels(n, t, 4)["colour"] == 0).all() for t in range(6) if t != k)


def test_scene_token_labels_follow_the_object_and_the_count():
    from vlmcompress.synthetic import DIRECTIONS, SHAPES, make_scene
    from vlmcompress.training.aux_scene import scene_token_labels

    def _over(box, cell):          # a quarter of the 16-px cell or more under the object
        y, x, h, w = box
        i, j = divmod(cell, 4)
        oy = max(0, min(y + h, (i + 1) * 16) - max(y, i * 16))
        ox = max(0, min(x + w, (j + 1) * 16) - max(x, j * 16))
        return oy * ox >= 64

    for seed in range(6):
        s = make_scene("object", seed, frames=8)
        d, c, sh = scene_token_labels(s, 1)
        assert d.shape == (8 * 16,) and (c == -100).all()
        want = torch.tensor([_over(s.facts["object_boxes"][t], k) for t in range(8) for k in range(16)])
        assert torch.equal(sh >= 0, want)                            # every frame, the cells under the object
        assert (sh[sh >= 0] == SHAPES.index(s.facts["shape"])).all() and (sh.view(8, 16)[:4] >= 0).any(1).all()
        marked = d.view(8, 16) >= 0
        assert not marked[:4].any() and marked[4:].any(1).all()      # second half only, every such frame
        assert (d[d >= 0] == DIRECTIONS.index(s.facts["direction"])).all()
        for t in range(4, 8):                                       # the marked cells hold the object
            y, x, h, w = s.facts["object_boxes"][t]
            for cell in marked[t].nonzero().squeeze(1).tolist():
                i, j = divmod(cell, 4)
                assert y < (i + 1) * 16 and i * 16 < y + h and x < (j + 1) * 16 and j * 16 < x + w
        q, _, _ = scene_token_labels(s, 2)                             # Qwen: 4 slots of 2 frames
        assert q.shape == (4 * 16,) and not (q.view(4, 16)[:1] >= 0).any()
    n = make_scene("count", 2, frames=4)
    d, c, sh = scene_token_labels(n, 2)
    want = ["one", "two", "three", "four", "five"].index(n.facts["count"])
    assert (d == -100).all() and (sh == -100).all() and (c[:15] == -100).all() and (c[15:] == want).all()
    assert (scene_token_labels(make_scene("needle", 0, frames=4), 1)[0] == -100).all()
