"""lmms-eval plug-in: run standard benchmarks on a compressed model with one flag.

    pip install 'vlmcompress[lmms]'
    python -m lmms_eval --model vlmcompress \\
        --model_args pretrained=lmms-lab/llava-onevision-qwen2-7b-ov-hf,compression=balanced,max_frames_num=32 \\
        --tasks videomme --batch_size 4

The model registers through lmms-eval's plug-in mechanism, the ``lmms_eval.models`` entry point (this
package's :func:`manifest`, named in vlmcompress's ``pyproject.toml``): installing vlmcompress is enough,
nothing in lmms-eval is edited. ``--model_args`` are listed in :class:`.model.VLMCompress` and
:mod:`.args`. :mod:`.export_task` writes the synthetic benchmark as a local task folder for
``--include_path``.

Importing this package does not import lmms-eval; :mod:`.model` does.
"""
from __future__ import annotations

__all__ = ["MODEL_NAME", "manifest"]

MODEL_NAME = "vlmcompress"


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval calls it while building its model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="vlmcompress.lmms_eval.model.VLMCompress")
