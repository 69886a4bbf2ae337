"""The plug-in's ``--model_args``: parsed, type-checked and turned into a :class:`CompressionConfig`.

Kept apart from the lmms-eval class so that it imports (and is tested) without lmms-eval installed.

lmms-eval hands the model ``key=value`` pairs with its own coercion (``"0.25"`` → float, ``"1"`` → int,
``"true"`` → bool, anything else a string); a user constructing the class in Python may pass strings.
Both arrive here and leave as one typed :class:`ModelArgs`, or as a ``ValueError`` that names the
argument and what it accepts.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import PRESETS, CompressionConfig

__all__ = ["ModelArgs", "CONFIG_FIELDS", "parse_model_args", "compression_config"]

# CompressionConfig fields settable from the command line, with their type. `relevance` and `steps` hold
# objects (a scorer, step instances) that a `key=value` string cannot express: `clip=` and
# `compression=<method>@<keep>` cover them.
CONFIG_FIELDS: dict[str, str] = {
    "vision_keep": "float",
    "vision_ramp": "float",
    "proportional_attention": "bool",
    "temporal_threshold": "float?",
    "temporal_keep": "float",
    "keep_ratio": "float",
    "token_budget": "int?",
    "budget_method": "str",
    "pool_tau": "float",
    "v2pe_delta": "float",
    "llm_proportional_attention": "bool",
}

_HELP = {
    "pretrained": "a Hugging Face hub id, a local model folder, a shipped model name (synth-onevision, "
                  "synth-qwen2-vl) or tiny-random:<family>",
    "compression": f"a preset ({', '.join(sorted(PRESETS))}), a method at a kept fraction ('uniform-pool@0.25', "
                   "'prompt-pool@0.1', ...; see vlmcompress.evaluation.methods), 'preset:<name>' or 'none'",
    "clip": "the CLIP that scores relevance for the prompt-pool methods: 'synth-clip' (shipped) or an open_clip "
            "hub id / folder",
    "max_frames_num": "an int >= 1: frames sampled uniformly from each video",
    "batch_size": "an int >= 1: requests per generate() call",
    "device": "cpu, cuda, cuda:1, ... (default: cuda when available)",
    "dtype": "auto (the checkpoint's own), bfloat16, float16 or float32",
    "max_new_tokens": "an int >= 1: the generation length when the task does not set one",
    "seed": "an int: the seed of the random-drop baseline",
    "local_files_only": "true/false: never touch the network when loading the model",
}
_HELP.update({name: f"CompressionConfig.{name} ({kind.rstrip('?')}{' or none' if kind.endswith('?') else ''})"
              for name, kind in CONFIG_FIELDS.items()})
# lmms-eval passes `max_batch_size` next to `batch_size` (for its --batch_size auto); we never grow batches.
_IGNORED = ("max_batch_size",)


@dataclass(frozen=True)
class ModelArgs:
    """Everything the plug-in was asked for, typed. ``fields`` are CompressionConfig overrides."""

    pretrained: str
    compression: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    clip: str | None = None
    max_frames_num: int = 16
    batch_size: int = 1
    device: str | None = None
    dtype: str = "auto"
    max_new_tokens: int = 32
    seed: int = 0
    local_files_only: bool = False


def _fail(name: str, value, why: str = "") -> ValueError:
    return ValueError(f"vlmcompress model_args: {name}={value!r} is not valid{': ' + why if why else ''}; "
                      f"{name} accepts {_HELP[name]}")


def _is_none(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))


def _int(name: str, value, *, minimum: int | None = 1) -> int:
    if isinstance(value, bool):
        raise _fail(name, value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _fail(name, value) from None
    if not isinstance(value, int) or (minimum is not None and value < minimum):
        raise _fail(name, value)
    return value


def _float(name: str, value) -> float:
    if isinstance(value, bool):
        raise _fail(name, value)
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _fail(name, value) from None
    if not isinstance(value, (int, float)) or math.isnan(value):
        raise _fail(name, value)
    return float(value)


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _fail(name, value)


def _field(name: str, value):
    kind = CONFIG_FIELDS[name]
    if kind.endswith("?"):
        if _is_none(value):
            return None
        kind = kind[:-1]
    if kind == "float":
        return _float(name, value)
    if kind == "int":
        return _int(name, value)
    if kind == "bool":
        return _bool(name, value)
    return str(value)


def parse_model_args(**kwargs) -> ModelArgs:
    """A :class:`ModelArgs` from lmms-eval's ``model_args`` (plus its ``batch_size``/``device``).

    Raises:
        ValueError: an unknown argument (with the closest accepted name), a missing ``pretrained``, or a
            value of the wrong type; the message names the argument and what it accepts.
    """
    unknown = [k for k in kwargs if k not in _HELP and k not in _IGNORED]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(_HELP), n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"vlmcompress model_args: unknown argument {', '.join(hints)}; accepted arguments are "
                         f"{', '.join(_HELP)}")
    pretrained = kwargs.get("pretrained")
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise _fail("pretrained", pretrained, "it is required")
    out: dict[str, Any] = {"pretrained": pretrained.strip()}
    compression = kwargs.get("compression")
    if compression is not None:     # "none" is kept: it means "unpatched" and conflicts with fields
        if not isinstance(compression, str) or not compression.strip():
            raise _fail("compression", compression)
        out["compression"] = compression.strip()
    if not _is_none(kwargs.get("clip")):
        out["clip"] = str(kwargs["clip"]).strip()
    for name in ("max_frames_num", "batch_size", "max_new_tokens"):
        if name in kwargs and not _is_none(kwargs[name]):
            out[name] = _int(name, kwargs[name])
    if "seed" in kwargs:
        out["seed"] = _int("seed", kwargs["seed"], minimum=None)
    if not _is_none(kwargs.get("device")):
        out["device"] = str(kwargs["device"]).strip()
    if not _is_none(kwargs.get("dtype")):
        dtype = str(kwargs["dtype"]).strip()
        if dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise _fail("dtype", kwargs["dtype"])
        out["dtype"] = dtype
    if "local_files_only" in kwargs:
        out["local_files_only"] = _bool("local_files_only", kwargs["local_files_only"])
    out["fields"] = {name: _field(name, kwargs[name]) for name in CONFIG_FIELDS if name in kwargs}
    return ModelArgs(**out)


def compression_config(args: ModelArgs, *, scorer=None) -> tuple[str, CompressionConfig | None]:
    """``(label, config)`` for ``args``: ``config`` is None when the model runs unpatched.

    - ``compression=<preset>`` (or ``preset:<preset>``): the preset, with any field overrides;
    - ``compression=<method>@<keep>``: the evaluation method (the same config ``vlmcompress-eval`` runs),
      with any stage A/C field overrides (stage-B fields conflict with a method's steps: an error);
    - only fields: ``CompressionConfig(**fields)``; nothing: the unpatched model.

    Raises:
        ValueError: an unknown preset or method, a method that needs ``clip=``, or fields the config rejects
            (CompressionConfig's own message, prefixed with the arguments that caused it).
    """
    from ..evaluation import parse_setting

    spec, fields = args.compression, args.fields
    given = ", ".join([f"compression={spec}"] * (spec is not None) + [f"{k}={v}" for k, v in fields.items()])
    if spec == "none" and fields:
        raise ValueError(f"vlmcompress model_args ({given}): compression=none runs the unpatched model; "
                         "drop compression=none or the fields")
    if spec is None or spec == "none":
        if not fields:
            return "none", None
        base, label = None, "custom"
    elif (spec.split(":", 1)[1] if spec.startswith("preset:") else spec) in PRESETS:
        name = spec.split(":", 1)[1] if spec.startswith("preset:") else spec
        base, label = PRESETS[name], f"preset:{name}"
    else:
        if spec.split("@", 1)[0].endswith("prompt-pool") and scorer is None:
            raise ValueError(f"vlmcompress model_args: compression={spec} scores relevance with a CLIP: add "
                             "clip=synth-clip (the shipped one) or clip=<open_clip hub id or folder>")
        try:
            setting = parse_setting(spec, scorer=scorer, seed=args.seed)
        except (ValueError, TypeError) as e:
            raise ValueError(f"vlmcompress model_args: compression={spec!r} is not valid: {e}; compression accepts "
                             f"{_HELP['compression']}") from None
        if setting.config is None and not fields:
            return setting.label, None
        base, label = setting.config or CompressionConfig(), setting.label
    try:
        config = CompressionConfig(**fields) if base is None else base.replace(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"vlmcompress model_args ({given}): {e}") from None
    if fields:
        label += ("+" if base is not None else "(") + ",".join(f"{k}={v}" for k, v in fields.items()) \
            + (")" if base is None else "")
    return label, config
