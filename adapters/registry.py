"""Which adapter serves which ``config.model_type``."""
from __future__ import annotations

from .base import FamilyAdapter

_REGISTRY: dict[str, type[FamilyAdapter]] = {}


def register(adapter_cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: serve every ``model_type`` the adapter lists."""
    for model_type in adapter_cls.model_types:
        _REGISTRY[model_type] = adapter_cls
    return adapter_cls


def supported_model_types() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def adapter_for(model) -> FamilyAdapter:
    _load_families()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _REGISTRY:
        raise ValueError(f"vlmcompress has no adapter for model_type={model_type!r} ({type(model).__name__}); "
                         f"supported families: {', '.join(sorted(_REGISTRY))}")
    if not hasattr(model, "model") or not hasattr(model, "generate"):
        raise TypeError(f"patch() expects a ...ForConditionalGeneration model with .model and .generate, "
                        f"got {type(model).__name__}")
    return _REGISTRY[model_type](model)


def _load_families() -> None:
    # Imported lazily so that `import vlmcompress` does not import transformers' model code.
    from . import families  # noqa: F401
