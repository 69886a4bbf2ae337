"""Named compression methods for evaluation, each at a kept fraction: ``"<method>@<keep>"``.

| method | what it runs (stage B steps unless said) |
|---|---|
| ``none`` | the unpatched model (the reference every other setting is compared with) |
| ``random-drop`` | baseline: a seeded uniform subset of each item's tokens, at their own positions |
| ``uniform-pool`` | baseline: plain average pooling to the same grid (no relevance) |
| ``prompt-pool`` | PPLLaVA: pooling weighted by CLIP relevance to the question (needs a scorer) |
| ``merge`` | ToMe bipartite merging after the projector, to the same count |
| ``temporal+uniform-pool`` / ``temporal+prompt-pool`` | temporal merging (half of each frame's tokens), then pooling to the budget |
| ``tome-tower`` | stage A only: ToMe inside the vision tower at ``vision_keep=keep`` (the LLM count may stay) |
| ``tome-tower+prompt-pool`` | stage A at 0.5, then prompt-guided pooling to the budget |
| ``v2pe`` | nothing merged; visual positions advance by δ = keep (the V2PE measurement) |
| ``preset:<name>`` | a :data:`vlmcompress.PRESETS` entry (its own budget; no ``@keep``) |

Every budgeted method keeps ``keep × N`` tokens of an item of ``N`` (the steps share one budget rule),
so the baselines and the methods are compared at the same count.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import PRESETS, CompressionConfig

__all__ = ["Setting", "METHODS", "BASELINES", "parse_setting", "default_settings"]

BASELINES = ("random-drop", "uniform-pool")
METHODS = ("none", "random-drop", "uniform-pool", "prompt-pool", "merge", "temporal+uniform-pool",
           "temporal+prompt-pool", "tome-tower", "tome-tower+prompt-pool", "v2pe")
_NEEDS_SCORER = ("prompt-pool", "temporal+prompt-pool", "tome-tower+prompt-pool")


@dataclass(frozen=True)
class Setting:
    """One evaluated setting: a label, its method and kept fraction, and the config (None = unpatched)."""

    label: str
    method: str
    keep: float
    config: CompressionConfig | None


def _config(method: str, keep: float, scorer, seed: int) -> CompressionConfig | None:
    from ..steps import MergeToBudget, PromptGuidedPool, RandomDrop, TemporalMerge, UniformPool

    if method == "none":
        return None
    if method == "random-drop":
        return CompressionConfig.from_steps(RandomDrop(keep_ratio=keep, seed=seed))
    if method == "uniform-pool":
        return CompressionConfig.from_steps(UniformPool(keep_ratio=keep))
    if method == "prompt-pool":
        return CompressionConfig.from_steps(PromptGuidedPool(keep_ratio=keep, relevance=scorer))
    if method == "merge":
        return CompressionConfig.from_steps(MergeToBudget(keep_ratio=keep))
    if method == "temporal+uniform-pool":
        return CompressionConfig.from_steps(TemporalMerge(keep=0.5), UniformPool(keep_ratio=keep))
    if method == "temporal+prompt-pool":
        return CompressionConfig.from_steps(TemporalMerge(keep=0.5), PromptGuidedPool(keep_ratio=keep, relevance=scorer))
    if method == "tome-tower":
        return CompressionConfig(vision_keep=keep)
    if method == "tome-tower+prompt-pool":
        return CompressionConfig.from_steps(PromptGuidedPool(keep_ratio=keep, relevance=scorer), vision_keep=0.5)
    if method == "v2pe":
        return CompressionConfig(v2pe_delta=keep)
    raise AssertionError(method)


def parse_setting(spec, *, scorer=None, seed: int = 0) -> Setting:
    """A :class:`Setting` from ``"method@keep"``, ``"none"``, ``"preset:<name>"``, or a
    ``(label, CompressionConfig)`` pair. Raises ValueError naming what is accepted."""
    if isinstance(spec, Setting):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], CompressionConfig):
        return Setting(str(spec[0]), "custom", float("nan"), spec[1])
    if isinstance(spec, CompressionConfig):
        return Setting(repr(spec), "custom", float("nan"), spec)
    if not isinstance(spec, str):
        raise TypeError(f"a setting must be 'method@keep', 'preset:<name>', a CompressionConfig or a (label, "
                        f"CompressionConfig) pair, got {type(spec).__name__}")
    if spec == "none":
        return Setting("none", "none", 1.0, None)
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in setting {spec!r}; presets are {sorted(PRESETS)}")
        return Setting(spec, spec, float("nan"), CompressionConfig.preset(name))
    method, sep, keep_text = spec.partition("@")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in setting {spec!r}; methods are {list(METHODS)} "
                         "(as 'method@keep', e.g. 'prompt-pool@0.1'), or 'preset:<name>'")
    if not sep:
        raise ValueError(f"setting {spec!r} needs a kept fraction: '{method}@0.25'")
    try:
        keep = float(keep_text)
    except ValueError:
        raise ValueError(f"kept fraction in setting {spec!r} must be a number in (0, 1], got {keep_text!r}") from None
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"kept fraction in setting {spec!r} must be in (0, 1], got {keep}")
    if method in _NEEDS_SCORER and scorer is None:
        raise ValueError(f"setting {spec!r} needs a relevance scorer (evaluate(..., scorer=...) or --clip); "
                         "use uniform-pool for pooling without one")
    return Setting(spec, method, keep, _config(method, keep, scorer, seed))


def default_settings(keeps=(0.5, 0.25, 0.1, 0.05), *, scorer=None, stage_a: bool = True) -> list[str]:
    """``none`` plus every budgeted method and both baselines at each kept fraction."""
    methods = ["random-drop", "uniform-pool", "merge", "temporal+uniform-pool"]
    if scorer is not None:
        methods += ["prompt-pool", "temporal+prompt-pool"]
        if stage_a:
            methods.append("tome-tower+prompt-pool")
    return ["none"] + [f"{m}@{k:g}" for k in keeps for m in methods]
