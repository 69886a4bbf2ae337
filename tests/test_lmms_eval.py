"""The lmms-eval plug-in: model_args, the synthetic task export, and lmms-eval runs end to end.

The first tests need no lmms-eval. The rest run the model through lmms-eval (installed by
``vlmcompress[lmms]``, part of ``dev``) on the exported synthetic task: the shipped task-trained model
when it is installed (``vlmcompress.models.available()``), else a tiny random checkpoint, whose answers
are gibberish but whose plumbing is the same (every doc answered, batches equal singles, the same
answers as ``vlmcompress.evaluate`` on the same files).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmcompress import CompressionConfig
from vlmcompress.evaluation import jsonl_items, normalise_answer, parse_setting
from vlmcompress.lmms_eval.args import compression_config, parse_model_args
from vlmcompress.lmms_eval.export_task import export_task
from vlmcompress.lmms_eval.task_utils import process_results

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("needle", "digit")
PER_TASK, FRAMES = 2, 8


# --- model_args ------------------------------------------------------------------------------------------

def test_model_args_as_lmms_eval_passes_them():
    # lmms-eval coerces "0.5" to float, "2" to int, "true" to bool; a Python caller may pass strings.
    a = parse_model_args(pretrained="synth-onevision", compression="balanced", v2pe_delta="0.5", batch_size="2",
                         max_frames_num=32, temporal_threshold="None", local_files_only="true")
    assert (a.batch_size, a.max_frames_num, a.local_files_only) == (2, 32, True)
    label, config = compression_config(a)
    assert config == CompressionConfig.preset("balanced", v2pe_delta=0.5, temporal_threshold=None)
    assert label == "preset:balanced+temporal_threshold=None,v2pe_delta=0.5"


def test_method_at_keep_is_the_evaluation_method():
    label, config = compression_config(parse_model_args(pretrained="m", compression="uniform-pool@0.25"))
    assert (label, config) == ("uniform-pool@0.25", parse_setting("uniform-pool@0.25").config)
    # Stage A/C fields combine with a method; the method's steps stay.
    _, config = compression_config(parse_model_args(pretrained="m", compression="random-drop@0.1", v2pe_delta=0.5))
    assert config.v2pe_delta == 0.5 and config.steps == parse_setting("random-drop@0.1").config.steps


def test_fields_alone_and_nothing():
    _, config = compression_config(parse_model_args(pretrained="m", keep_ratio=0.25, temporal_threshold=0.9))
    assert config == CompressionConfig(keep_ratio=0.25, temporal_threshold=0.9)
    assert compression_config(parse_model_args(pretrained="m")) == ("none", None)
    assert compression_config(parse_model_args(pretrained="m", compression="none")) == ("none", None)


@pytest.mark.parametrize("kwargs, expected", [
    (dict(pretrained="m", keep_ratoi=0.2), ["'keep_ratoi'", "did you mean 'keep_ratio'", "accepted arguments"]),
    (dict(compression="balanced"), ["pretrained=None", "required", "hub id"]),
    (dict(pretrained="m", keep_ratio="half"), ["keep_ratio='half'", "float"]),
    (dict(pretrained="m", batch_size="auto"), ["batch_size='auto'", "int >= 1"]),
    (dict(pretrained="m", max_frames_num=0), ["max_frames_num=0", "int >= 1"]),
    (dict(pretrained="m", dtype="int8"), ["dtype='int8'", "bfloat16"]),
    (dict(pretrained="m", compression="bogus"), ["compression='bogus'", "balanced", "uniform-pool@0.25"]),
    (dict(pretrained="m", compression="uniform-pool@2"), ["compression='uniform-pool@2'", "(0, 1]"]),
    (dict(pretrained="m", compression="prompt-pool@0.1"), ["compression=prompt-pool@0.1", "clip=synth-clip"]),
    (dict(pretrained="m", compression="uniform-pool@0.25", keep_ratio=0.5), ["keep_ratio=0.5", "stage-B"]),
    (dict(pretrained="m", compression="none", keep_ratio=0.5), ["compression=none", "unpatched"]),
    (dict(pretrained="m", keep_ratio=2.0), ["keep_ratio=2.0", "(0, 1]"]),
])
def test_bad_model_args_name_the_argument_and_what_is_accepted(kwargs, expected):
    with pytest.raises(ValueError) as e:
        compression_config(parse_model_args(**kwargs))
    for text in expected:
        assert text in str(e.value), (text, str(e.value))


# --- the exported task -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("lmms_task")
    names = export_task(out, tasks=TASKS, per_task=PER_TASK, frames=FRAMES)
    assert names == {"vlmc_synth_needle": "needle", "vlmc_synth_digit": "digit", "vlmc_synth": "*"}
    return out


def test_export_writes_videos_docs_and_task_yamls(task_dir):
    from vlmcompress.synthetic import benchmark

    expected = {f"{s.task}-{s.index}-{FRAMES}f": s.answer for s in benchmark(TASKS, per_task=PER_TASK, frames=FRAMES)}
    docs = [json.loads(line) for t in TASKS for line in (task_dir / f"{t}.jsonl").read_text().splitlines()]
    assert {d["id"]: d["answer"] for d in docs} == expected
    assert all((task_dir / d["video"]).is_file() for d in docs)
    # The docs are the JSONL that vlmcompress-eval reads: the videos decode to FRAMES frames.
    items = jsonl_items(task_dir / "needle.jsonl", frames=FRAMES)
    assert [it.frames.shape[0] for it in items] == [FRAMES] * PER_TASK
    for t in TASKS:
        yaml = (task_dir / f"vlmc_synth_{t}.yaml").read_text()
        assert f"task: vlmc_synth_{t}" in yaml and str(task_dir / f"{t}.jsonl") in yaml
    assert "vlmc_synth_needle" in (task_dir / "vlmc_synth.yaml").read_text()
    assert "process_results: !function utils.process_results" in (task_dir / "_template_yaml").read_text()


def test_exact_match_scoring():
    doc = {"answer": "yellow"}
    assert process_results(doc, ["Yellow."]) == {"exact_match": 1.0}
    assert process_results(doc, ["yellowish"]) == {"exact_match": 0.0}
    assert process_results(doc, [""]) == {"exact_match": 0.0}


def test_export_replaces_an_earlier_export_and_refuses_other_folders(tmp_path):
    out = tmp_path / "t"
    export_task(out, tasks=["colour", "count"], per_task=1, frames=2)
    export_task(out, tasks=["count"], per_task=1, frames=2)
    # lmms-eval indexes every YAML in --include_path: the earlier export's colour task must be gone.
    assert sorted(p.name for p in out.glob("*.yaml")) == ["vlmc_synth.yaml", "vlmc_synth_count.yaml"]
    assert [p.name for p in (out / "videos").iterdir()] == ["count-0000-2f.mp4"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_task(other, tasks=["count"], per_task=1, frames=2)
    with pytest.raises(ValueError, match="tasks must be"):
        export_task(tmp_path / "new", tasks=["nope"])
    assert not (tmp_path / "new").exists()


# --- through lmms-eval -----------------------------------------------------------------------------------

def _lmms_eval_or_skip():
    return pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: pip install 'vlmcompress[lmms]'")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The shipped task-trained model when it is installed, else a tiny random LLaVA-OneVision folder."""
    from vlmcompress import models

    if "synth-onevision" in models.available():
        return "synth-onevision"
    from vlmcompress.testing.tiny_models import save_tiny_checkpoint

    return str(save_tiny_checkpoint("llava_onevision", tmp_path_factory.mktemp("tiny_ov")))


def test_entry_point_registers_the_model():
    _lmms_eval_or_skip()
    from lmms_eval.models import get_model

    from vlmcompress.lmms_eval.model import VLMCompress

    assert get_model("vlmcompress") is VLMCompress


def _requests(lm, task_dir: Path, gen_kwargs: dict):
    """lmms-eval's Instances for every exported doc, as its task code builds them."""
    from lmms_eval.api.instance import Instance

    from vlmcompress.lmms_eval.task_utils import doc_to_text, doc_to_visual

    docs = [json.loads(line) for t in TASKS for line in (task_dir / f"{t}.jsonl").read_text().splitlines()]
    lm.task_dict = {"synth": {"test": docs}}
    return docs, [Instance(request_type="generate_until", idx=0, metadata={"task": "synth", "doc_id": i, "repeats": 1},
                           arguments=(doc_to_text(d), dict(gen_kwargs), lambda doc: doc_to_visual(doc, task_dir), i,
                                      "synth", "test"))
                  for i, d in enumerate(docs)]


@pytest.mark.parametrize("family, compression", [("llava_onevision", "uniform-pool@0.25"),
                                                 ("qwen2_vl", "balanced")])
def test_batches_equal_singles_and_match_vlmcompress_evaluate(family, compression, task_dir, tmp_path):
    _lmms_eval_or_skip()
    import vlmcompress as vc
    from vlmcompress.lmms_eval.model import VLMCompress
    from vlmcompress.testing.tiny_models import save_tiny_checkpoint

    path = save_tiny_checkpoint(family, tmp_path / family)
    lm = VLMCompress(pretrained=str(path), compression=compression, max_frames_num=FRAMES, batch_size=3,
                     device="cpu")
    assert vc.is_patched(lm.model)
    docs, requests = _requests(lm, task_dir, {"max_new_tokens": 4, "until": [], "temperature": 0})
    batched = lm.generate_until(requests)
    lm.batch_size_per_gpu = 1
    assert lm.generate_until(requests) == batched
    assert len(batched) == len(docs) and all(isinstance(r, str) for r in batched)
    # The same prompt, frames and config as vlmcompress-eval: the same greedy answers.
    vc.unpatch(lm.model)
    items = [it for t in TASKS for it in jsonl_items(task_dir / f"{t}.jsonl", frames=FRAMES)]
    result = vc.evaluate(lm.model, lm.processor, items, [compression if "@" in compression else f"preset:{compression}"],
                         max_new_tokens=4, batch_size=2)
    want = {r["item"]: r["answer"] for r in result.records if r["setting"] != "none"}
    assert [normalise_answer(r) for r in batched] == [want[d["id"]] for d in docs]


def test_lmms_eval_command_line_end_to_end(pretrained, task_dir, tmp_path):
    """`python -m lmms_eval --model vlmcompress ... --include_path <export>`: a real lmms-eval run, batch 2,
    whose answers and scores equal vlmcompress.evaluate's on the same model, files and setting."""
    _lmms_eval_or_skip()
    import vlmcompress as vc
    from vlmcompress.demo.runner import load

    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    cmd = [sys.executable, "-P", "-m", "lmms_eval", "--model", "vlmcompress",
           "--model_args", f"pretrained={pretrained},compression=uniform-pool@0.25,max_frames_num={FRAMES},device=cpu",
           "--tasks", "vlmc_synth", "--include_path", str(task_dir), "--batch_size", "2",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # lmms-eval logs a failing task and still exits 0: no results file then; show its log.
    found = list(out.rglob("*results.json"))
    assert len(found) == 1, f"lmms-eval wrote {found}; its log:\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = found
    results = json.loads(results_file.read_text())["results"]
    # lmms-eval 0.7 logs each sample as {"doc_id", "target", "filtered_resps", ...}, one file per task.
    by_task = {t: [it for it in jsonl_items(task_dir / f"{t}.jsonl", frames=FRAMES)] for t in TASKS}
    samples = {}
    for f in out.rglob("*samples_*.jsonl"):
        task = f.stem.rsplit("vlmc_synth_", 1)[1]
        for line in f.read_text().splitlines():
            s = json.loads(line)
            item = by_task[task][s["doc_id"]]
            assert s["target"] == item.answers[0]
            samples[item.id] = s
    assert len(samples) == len(TASKS) * PER_TASK             # every doc answered, once
    resp = {k: s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
            for k, s in samples.items()}

    model, processor = load(pretrained, device="cpu")
    items = [it for t in TASKS for it in by_task[t]]
    result = vc.evaluate(model, processor, items, ["uniform-pool@0.25"], max_new_tokens=4, batch_size=1)
    want = {r["item"]: r for r in result.records if r["setting"] == "uniform-pool@0.25"}
    assert {k: normalise_answer(v) for k, v in resp.items()} == {k: r["answer"] for k, r in want.items()}
    for t in TASKS:
        correct = [r["correct"] for r in want.values() if r["task"] == t]
        assert results[f"vlmc_synth_{t}"]["exact_match,none"] == pytest.approx(sum(correct) / len(correct))
