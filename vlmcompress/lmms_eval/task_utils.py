"""The functions an exported synthetic task's YAML points at (see :mod:`.export_task`).

Each exported folder gets a three-line ``utils.py`` that binds :func:`doc_to_visual` to its own folder
(lmms-eval loads ``!function utils.<name>`` from the YAML's folder), so the folder can move as a whole.
A doc is one line of the folder's JSONL: ``{"id", "task", "question", "answer", "video", "fps", "frames"}``,
``video`` relative to the folder.
"""
from __future__ import annotations

from pathlib import Path

from ..evaluation.dataset import normalise_answer

__all__ = ["doc_to_visual", "doc_to_text", "process_results"]


def doc_to_visual(doc: dict, folder: str | Path) -> list[str]:
    """``[path of the doc's video]``: lmms-eval video models read the file themselves."""
    path = Path(folder) / doc["video"]
    if not path.is_file():
        raise FileNotFoundError(f"video {path} of doc {doc.get('id')!r} is missing; export the task again")
    return [str(path)]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question exactly as the synthetic models were trained on it (and as ``vlmcompress-eval`` asks
    it), with the task's optional ``pre_prompt``/``post_prompt``."""
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """``{"exact_match": 1.0 | 0.0}``: the normalised response (lower case, no surrounding punctuation)
    equals the normalised answer, the same rule as ``vlmcompress-eval``."""
    response = results[0] if results else ""
    return {"exact_match": float(normalise_answer(str(response)) == normalise_answer(doc["answer"]))}
