"""The plumbing the benchmark scripts share (vlmcompress.testing.bench)."""
import csv

import pytest

from vlmcompress.testing.bench import append_csv, csv_row, machine, status_kb


def test_append_csv_writes_the_header_once(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert append_csv(path, ["a", "b"], [{"a": 1, "b": 2}]) == 1
    assert append_csv(path, ["a", "b"], ({"a": i, "b": -i} for i in range(3))) == 3
    rows = list(csv.DictReader(path.open()))
    assert [r["a"] for r in rows] == ["1", "0", "1", "2"]


def test_csv_row_rounds_floats_and_blanks_missing_values():
    row = {"a": 1.234567891, "b": None, "c": "x", "d": 3, "extra": 1}
    assert csv_row(row, ["a", "b", "c", "d", "e"]) == {"a": 1.2346, "b": "", "c": "x", "d": 3, "e": ""}


def test_machine_and_memory_counters():
    assert machine("cpu").strip()
    assert 0 < status_kb("VmRSS") <= status_kb("VmHWM")


def test_load_average_and_log(capsys):
    from vlmcompress.testing.bench import load_average, log

    parts = load_average().split("/")
    assert len(parts) == 3 and all(float(p) >= 0 for p in parts)
    log("progress line")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "progress line\n"


def test_fidelity_tables_are_built_from_the_committed_results():
    """The README's accuracy tables come from benchmarks/fidelity_tables.py on the committed JSON:
    one table per model and length, retained = mean accuracy over the unpatched model's."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity_tables.py"
    spec = importlib.util.spec_from_file_location("fidelity_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    results = sorted(p for p in mod.FOLDER.glob("*f.json") if "-v2pe-" not in p.name)
    assert results
    for p in results:
        text = mod.table(p)
        assert text.count("\n| ") == 1 + len({r["method"] for r in json.loads(p.read_text())["summary"]} - {"none"})
        summary = json.loads(p.read_text())["summary"]
        acc = {}
        for r in summary:
            acc.setdefault(r["setting"], []).append(r["accuracy"])
        want = sum(acc["random-drop@0.5"]) / sum(acc["none"])
        row = next(line for line in text.splitlines() if line.startswith("| *random-drop*"))
        assert row.split(" | ")[1] == f"{want:.0%}".replace("%", " %")


def test_load_script_runs_once_and_forgets_a_failed_load(tmp_path):
    import sys

    from vlmcompress.testing.bench import load_script

    good = tmp_path / "good.py"
    good.write_text("import itertools\nCOUNTER = itertools.count()\nFIRST = next(COUNTER)\n")
    try:
        first = load_script(good, "_test_load_script_good")
        assert load_script(good, "_test_load_script_good") is first and next(first.COUNTER) == 1
    finally:
        sys.modules.pop("_test_load_script_good", None)
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('broken script')\n")
    with pytest.raises(RuntimeError, match="broken script"):
        load_script(bad, "_test_load_script_bad")
    assert "_test_load_script_bad" not in sys.modules
