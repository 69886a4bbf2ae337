"""Evaluation results: per-setting summary rows, a terminal table, CSV, JSON and a PNG plot."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["EvalResult", "SUMMARY_FIELDS"]

SUMMARY_FIELDS = ["setting", "method", "keep", "task", "items", "accuracy", "retained", "agreement", "kl",
                  "visual_before", "visual_after", "kept_fraction", "prefill_before", "prefill_after",
                  "vision_s", "prefill_s", "decode_s", "total_s", "peak_mb", "kv_mb",
                  "vision_x", "prefill_x", "decode_x", "total_x", "peak_x", "kv_x"]


def _mean(values) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else float("nan")


def _ratio(ref: float, value: float) -> float:
    """How many times smaller `value` is than `ref` (a speed-up or a memory saving)."""
    if not ref or not value or math.isnan(ref) or math.isnan(value):
        return float("nan")
    return ref / value


class EvalResult:
    """What :func:`vlmcompress.evaluate` measured.

    Attributes:
        records: one dict per (setting, item): answer, correct, agree, kl, token counts, stage times.
        summary: one row per (setting, task) and one per setting with ``task="mean"`` (accuracy averaged
            over tasks): accuracy, accuracy retained vs ``none``, agreement, KL, tokens, times, and each
            time/memory as a ratio ``none / setting`` (``*_x``, higher is better).
    """

    def __init__(self, records: list[dict], *, model_name: str = ""):
        self.records = records
        self.model_name = model_name
        self.summary = self._summarise()

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.records))

    @property
    def settings(self) -> list[str]:
        return list(dict.fromkeys(r["setting"] for r in self.records))

    def _summarise(self) -> list[dict]:
        rows = []
        by_setting: dict[str, list[dict]] = {}
        for r in self.records:
            by_setting.setdefault(r["setting"], []).append(r)
        ref_rows = {}
        for label, recs in by_setting.items():
            task_rows = []
            for task in self.tasks:
                sub = [r for r in recs if r["task"] == task]
                if sub:
                    task_rows.append(self._row(label, task, sub))
            mean = self._row(label, "mean", recs)
            mean["accuracy"] = _mean([t["accuracy"] for t in task_rows])  # macro: every task counts once
            rows += task_rows + [mean]
            if label == "none":
                ref_rows = {r["task"]: r for r in task_rows + [mean]}
        for row in rows:
            ref = ref_rows.get(row["task"])
            if ref is None:
                continue
            row["retained"] = row["accuracy"] / ref["accuracy"] if ref["accuracy"] else float("nan")
            for k in ("vision", "prefill", "decode", "total"):
                row[f"{k}_x"] = _ratio(ref[f"{k}_s"], row[f"{k}_s"])
            row["peak_x"] = _ratio(ref["peak_mb"], row["peak_mb"])
            row["kv_x"] = _ratio(ref["kv_mb"], row["kv_mb"])
        return rows

    @staticmethod
    def _row(label: str, task: str, recs: list[dict]) -> dict:
        before = sum(r["visual_before"] for r in recs)
        after = sum(r["visual_after"] for r in recs)
        return dict(
            setting=label, method=recs[0]["method"], keep=recs[0]["keep"], task=task, items=len(recs),
            accuracy=_mean([float(r["correct"]) for r in recs]), retained=float("nan"),
            agreement=_mean([float(r["agree"]) for r in recs]), kl=_mean([r["kl"] for r in recs]),
            visual_before=before / len(recs), visual_after=after / len(recs),
            kept_fraction=after / before if before else float("nan"),
            prefill_before=_mean([r["prefill_before"] for r in recs]), prefill_after=_mean([r["prefill_after"] for r in recs]),
            vision_s=_mean([r["vision_s"] for r in recs]), prefill_s=_mean([r["prefill_s"] for r in recs]),
            decode_s=_mean([r["decode_s"] for r in recs]), total_s=_mean([r["total_s"] for r in recs]),
            peak_mb=_mean([r["peak_mb"] for r in recs]), kv_mb=_mean([r["kv_bytes"] for r in recs]) / 2**20,
        )

    def row(self, setting: str, task: str = "mean") -> dict:
        for r in self.summary:
            if r["setting"] == setting and r["task"] == task:
                return r
        raise KeyError(f"no summary row for setting {setting!r}, task {task!r}")

    # --- output -----------------------------------------------------------------------------------------
    def table(self, *, per_task: bool = True) -> str:
        """A Markdown table: one row per setting; accuracy per task, then the mean and the ratios."""
        tasks = self.tasks
        head = ["setting", "kept", *([f"{t}" for t in tasks] if per_task else []), "mean acc", "retained", "agree",
                "KL", "vision ×", "prefill ×", "decode ×", "total ×", "KV ×"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label in self.settings:
            m = self.row(label)
            cells = [label, f"{m['visual_after']:.0f}/{m['visual_before']:.0f}"]
            if per_task:
                cells += [f"{self.row(label, t)['accuracy']:.2f}" for t in tasks]
            cells += [f"{m['accuracy']:.3f}", _pct(m["retained"]), f"{m['agreement']:.2f}", _g(m["kl"]),
                      *[_x(m[k]) for k in ("vision_x", "prefill_x", "decode_x", "total_x", "kv_x")]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def write(self, folder: str | Path, *, stem: str = "eval", plot: bool = True) -> dict[str, Path]:
        """Write ``<stem>.csv`` (summary rows), ``<stem>.json`` (summary + per-item records), ``<stem>.md``
        (the table) and ``<stem>.png`` (the plot); returns the paths."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {k: folder / f"{stem}.{k}" for k in ("csv", "json", "md")}
        with paths["csv"].open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
            w.writeheader()
            for r in self.summary:
                w.writerow({k: r.get(k) for k in SUMMARY_FIELDS})
        doc = _clean({"model": self.model_name, "summary": self.summary, "records": self.records})
        paths["json"].write_text(json.dumps(doc, indent=1, allow_nan=False))
        paths["md"].write_text(self.table() + "\n")
        if plot:
            paths["png"] = self.plot(folder / f"{stem}.png")
        return paths

    def plot(self, path: str | Path) -> Path:
        """Accuracy retained vs visual tokens kept, one line per method, one panel per task (+ mean)."""
        import logging

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)

        panels = self.tasks + ["mean"]
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False, sharey=True)
        methods = [m for m in dict.fromkeys(r["method"] for r in self.summary) if m not in ("none", "custom")]
        for ax, task in zip(axes.flat, panels):
            for method in methods:
                pts = sorted((r["kept_fraction"], r["retained"]) for r in self.summary
                             if r["method"] == method and r["task"] == task and not math.isnan(r["retained"]))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                            linestyle="--" if method in ("random-drop", "uniform-pool") else "-")
            ref = [r for r in self.summary if r["setting"] == "none" and r["task"] == task]
            title = task if not ref else f"{task} (uncompressed {ref[0]['accuracy']:.2f})"
            ax.set_title(title, fontsize=9)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator([0.05, 0.1, 0.25, 0.5, 1.0]))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.set_xlabel("visual tokens kept (fraction)", fontsize=8)
            ax.axhline(1.0, color="grey", linewidth=0.6)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes[0][0].set_ylabel("accuracy retained")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        if labels:  # none when the reference answers nothing right (accuracy retained is undefined)
            fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
        fig.tight_layout(rect=(0, 0.08 if len(labels) <= 4 else 0.12, 1, 1))
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def _g(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2g}"


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.0f} %"


def _x(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.2f}×"


def _clean(o):
    """JSON-safe copy: NaN → null (strict JSON has no NaN), numpy/torch scalars → Python numbers."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item") and not isinstance(o, (str, bytes)):
        o = o.item()
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return o
