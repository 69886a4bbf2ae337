"""benchmarks/tower.py end to end at the smallest settings: every vision tower whose adapter supports stage A
gets a measured row (64-wide towers, real token counts, 2 layers, 2 frames, 1 round)."""
import math
import re
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "tower.py"


def _tower_module():
    from vlmcompress.testing.bench import load_script

    return load_script(PATH, "_benchmarks_tower")


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows by tower key: ``| key: label | input | tokens | ... |``."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| tower"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].split(":")[0]] = cells
    return rows


def test_tower_benchmark_has_a_measured_row_per_stage_a_tower(capsys):
    from vlmcompress.adapters.registry import adapter_for
    from vlmcompress.testing.tiny_models import tiny_model

    tower = _tower_module()
    threads = torch.get_num_threads()
    try:
        assert tower.main(["--quick", "--no-csv", "--tiny", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {t.key for t in tower.TOWERS}
    for t in tower.TOWERS:
        cells = rows[t.key]
        if not adapter_for(tiny_model(t.family)).supports_vision_merge:
            assert cells[2].startswith("not supported"), cells
            continue
        tokens, speedup, ideal = cells[2], cells[5], cells[6]
        n_in, n_out = map(int, re.fullmatch(r"(\d+) -> (\d+)", tokens).groups())
        # vision_keep 0.5: ceil(patches / 2) per image/frame (Qwen: per temporal patch, in whole 2x2 units)
        assert n_in / 2 <= n_out <= n_in / 2 + 2, (t.key, tokens)
        assert float(speedup.split("x")[0]) > 0, cells
        assert float(ideal.rstrip("x")) >= 1, cells
        assert math.isfinite(float(cells[7].rstrip("%"))), cells
