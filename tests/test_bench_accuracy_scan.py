"""benchmarks/accuracy_scan.py: every config it names builds, and a one-item-per-task scan prints a row per
selected setting with the unpatched model's answers right."""
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_scan.py"


def _module():
    from vlmcompress.testing.bench import load_script

    return load_script(PATH, "_benchmarks_accuracy_scan")


def test_every_config_builds():
    from vlmcompress.config import CompressionConfig

    scan = _module()
    made = {name: (make() if make is not None else None) for name, make in scan.configs().items()}
    assert made["none"] is None
    assert all(isinstance(c, CompressionConfig) for name, c in made.items() if name != "none")
    assert made["A 0.5 + skip + T 0.9, LLM PA"].llm_proportional_attention
    assert not made["A 0.5 + skip + T 0.9"].llm_proportional_attention
    assert made["A 0.6 + skip, LLM PA"].vision_keep == 0.6


def test_scan_prints_the_selected_rows(capsys):
    from vlmcompress import models

    if "synth-qwen2-vl" not in models.available():
        pytest.skip("the shipped synth-qwen2-vl model is not installed")
    scan = _module()
    assert scan.main(["--model", "synth-qwen2-vl", "--per-task", "1", "--only", "A 0.5 + skip + T 0.9, LLM PA",
                      "--no-csv"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| setting")}
    assert set(rows) == {"none", "A 0.5 + skip + T 0.9, LLM PA"}
    cells = [c.strip() for c in rows["none"].strip("|").split("|")]
    assert float(cells[1]) >= 6 / 7 and len(cells) == 2 + len(scan.TASKS)
