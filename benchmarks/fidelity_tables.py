"""README tables from the fidelity results: accuracy retained per method and kept fraction.

    python -P benchmarks/fidelity_tables.py        # every benchmarks/results/fidelity/<model>-<N>f.json

Retained = the setting's mean accuracy over tasks / the unpatched model's, on the same items.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

FOLDER = Path(__file__).resolve().parent / "results" / "fidelity"
KEEPS = (0.5, 0.25, 0.1, 0.05)
BASELINES = ("random-drop", "uniform-pool")


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    acc = defaultdict(dict)              # setting -> task -> accuracy
    meta = {}
    for row in data["summary"]:
        if row["task"] in ("all", "mean"):
            continue
        acc[row["setting"]][row["task"]] = row["accuracy"]
        meta[row["setting"]] = (row["method"], row["keep"], row["visual_before"])
    base = acc["none"]
    mean = lambda s: sum(acc[s].values()) / len(acc[s])            # noqa: E731
    methods = list(dict.fromkeys(m for m, k, _ in meta.values() if m != "none"))
    items = data["summary"][0]["items"]
    lines = [f"**`{Path(data.get('model') or path.stem).name}`, {path.stem.rsplit('-', 1)[1][:-1]} frames** "
             f"({int(meta['none'][2])} visual tokens, {items} items per task; uncompressed mean accuracy "
             f"{mean('none'):.2f}, needle {base['needle']:.2f}, digit {base['digit']:.2f}). Accuracy retained, "
             "mean over tasks (needle / digit at 10 %):", "",
             "| method | 50 % | 25 % | 10 % | 5 % | needle @10 % | digit @10 % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        cells = []
        for k in KEEPS:
            s = f"{m}@{k:g}"
            cells.append(f"{mean(s) / mean('none'):.0%}".replace("%", " %") if s in acc else "—")
        s10 = f"{m}@0.1"
        extra = [f"{acc[s10][t] / base[t]:.0%}".replace("%", " %") if s10 in acc and base[t] else "—"
                 for t in ("needle", "digit")]
        name = f"*{m}* (baseline)" if m in BASELINES else m
        lines.append(f"| {name} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = sorted(p for p in FOLDER.glob("*f.json") if "-v2pe-" not in p.name)
    if not paths:
        print(f"no results in {FOLDER}: run benchmarks/fidelity.py first", file=sys.stderr)
        return 2
    for p in paths:
        print(table(p) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
