"""Task-trained tiny VLMs shipped inside the package (trained on :mod:`vlmcompress.synthetic`).

They exist to measure and to demo compression offline: real `transformers` classes with small
configs, trained from scratch on the synthetic benchmark's train split, saved with `save_pretrained`
beside their tokenizer and processor. They load the way users load real models::

    from transformers import AutoModelForImageTextToText, AutoProcessor
    import vlmcompress as vc
    path = vc.models.path("synth-onevision")
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)

`synth-clip` is an open_clip model trained contrastively on the same frames and captions, for
prompt-guided pooling (:func:`relevance_scorer`).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["MODELS", "DEFAULT", "names", "available", "path", "load", "relevance_scorer"]

_ROOT = Path(__file__).resolve().parent
# name -> (kind, what it is)
MODELS: dict[str, tuple[str, str]] = {
    "synth-onevision": ("vlm", "LLaVA-OneVision (SigLIP tower, Qwen2 LLM, 1-D RoPE), trained with V2PE δ-mix"),
    "synth-qwen2-vl": ("vlm", "Qwen2-VL (M-RoPE), trained with δ = 1"),
    "synth-clip": ("clip", "open_clip ViT + text tower, contrastive on the synthetic frames and captions"),
}
DEFAULT = "synth-onevision"


def _check(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown shipped model {name!r}; shipped models are {sorted(MODELS)}")


def path(name: str) -> Path:
    """The folder holding shipped model `name` (config, safetensors weights, tokenizer, processor)."""
    _check(name)
    folder = _ROOT / name
    if not (folder / "config.json").is_file() and not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"shipped model {name!r} is not in this installation ({folder} has no weights); "
                                f"train it with `python -m vlmcompress.training.train_vlm` (see README)")
    return folder


def names(kind: str | None = "vlm") -> list[str]:
    """Names of the shipped models of `kind` ("vlm", "clip" or None for all), whether installed or not."""
    return [n for n, (k, _) in MODELS.items() if kind is None or k == kind]


def available(kind: str | None = "vlm") -> list[str]:
    """Names of the shipped models of `kind` whose files are present."""
    out = []
    for n in names(kind):
        try:
            path(n)
        except FileNotFoundError:
            continue
        out.append(n)
    return out


def load(name: str, *, device: str = "cpu", dtype=None):
    """``(model, processor)`` of shipped VLM `name`, loaded offline (eval mode, on `device`)."""
    if MODELS.get(name, ("vlm",))[0] != "vlm":
        raise ValueError(f"{name!r} is not a VLM; VLMs are {names('vlm')}")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = path(name)
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, **kwargs).to(device).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model, processor


def relevance_scorer(name: str = "synth-clip", **kwargs):
    """A :class:`vlmcompress.ClipRelevanceScorer` on the shipped, trained CLIP model."""
    if MODELS.get(name, ("clip",))[0] != "clip":
        raise ValueError(f"{name!r} is not a CLIP model; CLIP models are {names('clip')}")
    from ..training.clip import load_scorer

    return load_scorer(path(name), **kwargs)
