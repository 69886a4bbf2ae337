"""The plumbing the benchmark scripts share (vlmcompress.testing.bench)."""
import csv

from vlmcompress.testing.bench import append_csv, machine, status_kb


def test_append_csv_writes_the_header_once(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    assert append_csv(path, ["a", "b"], [{"a": 1, "b": 2}]) == 1
    assert append_csv(path, ["a", "b"], ({"a": i, "b": -i} for i in range(3))) == 3
    rows = list(csv.DictReader(path.open()))
    assert [r["a"] for r in rows] == ["1", "0", "1", "2"]


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
