"""The lmms-eval model ``vlmcompress``: any supported HF VLM, patched with a preset or a method@keep.

lmms-eval finds it through the ``lmms_eval.models`` entry point (see :mod:`vlmcompress.lmms_eval`);
this module imports lmms-eval and is loaded only by it (or by a user who has it installed).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .args import ModelArgs, compression_config, parse_model_args

__all__ = ["VLMCompress"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _load_scorer(spec: str | None):
    if spec is None:
        return None
    from .. import models

    if spec in models.names("clip"):
        return models.relevance_scorer(spec)
    from ..relevance import ClipRelevanceScorer

    return ClipRelevanceScorer.from_pretrained(spec)


def _visual_block(visual, max_frames: int) -> tuple[dict, dict | None, tuple]:
    """``(chat content block, video metadata or None, shape key)`` of one thing ``doc_to_visual`` gave.

    Accepted: a video file path (``max_frames`` frames spread uniformly over it, as lmms-eval's own
    video models do), an image path, a PIL image, or uint8 frames ``[T, H, W, 3]`` (taken as 1 fps).
    """
    from PIL import Image

    if isinstance(visual, (str, os.PathLike)):
        path = Path(visual)
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            visual = Image.open(path)
        else:
            from ..video import read_video

            clip = read_video(path, num_frames=max_frames)
            frames = np.asarray(clip.frames)
            t = frames.shape[0]
            meta = dict(total_num_frames=t, fps=float(clip.sampled_fps), duration=float(clip.duration),
                        frames_indices=list(range(t)))
            return {"type": "video", "video": frames}, meta, ("video", frames.shape)
    if isinstance(visual, Image.Image):
        image = visual.convert("RGB")
        return {"type": "image", "image": image}, None, ("image", image.size)
    if isinstance(visual, np.ndarray) and visual.ndim == 4 and visual.shape[-1] == 3 and visual.dtype == np.uint8:
        t = visual.shape[0]
        meta = dict(total_num_frames=t, fps=1.0, duration=float(t), frames_indices=list(range(t)))
        return {"type": "video", "video": visual}, meta, ("video", visual.shape)
    raise TypeError(f"vlmcompress lmms-eval model: doc_to_visual gave a {type(visual).__name__}; accepted are video "
                    "or image paths, PIL images and uint8 [T, H, W, 3] frame arrays")


def _gen_key(gen_kwargs: dict) -> str:
    return json.dumps(gen_kwargs, sort_keys=True, default=str)


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string in `until`."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class VLMCompress(lmms):
    """An HF VLM (any family ``vlmcompress.patch`` supports) under a compression setting, for lmms-eval.

    ``--model_args`` (see :mod:`vlmcompress.lmms_eval.args` for all, with types)::

        pretrained=<hub id | folder | synth-onevision | tiny-random:<family>>   (required)
        compression=<preset | method@keep | none>     e.g. balanced, uniform-pool@0.25, prompt-pool@0.1
        keep_ratio=0.25,temporal_threshold=0.9,v2pe_delta=0.5,...   CompressionConfig fields (override)
        clip=synth-clip                               relevance scorer for the prompt-pool methods
        max_frames_num=16,batch_size=4,device=cuda,dtype=bfloat16,max_new_tokens=32

    ``batch_size`` and ``device`` may also come from lmms-eval's ``--batch_size``/``--device``; a value in
    ``--model_args`` wins (lmms-eval always passes its ``--batch_size``, default 1).
    Requests are batched by generation settings; a batch goes to ``generate()`` in one call (left
    padding), split only where visuals differ in shape (video processors stack frames).
    """

    is_simple = True

    def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.args: ModelArgs = parse_model_args(pretrained=pretrained, **kwargs)
        # Data parallel (`accelerate launch -m lmms_eval ...`): lmms-eval gives each process the docs of its
        # rank (older releases read the rank from the model, newer ones set it too); one GPU per process.
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            self._rank, self._world_size = int(os.environ.get("RANK", "0")), world
        scorer = _load_scorer(self.args.clip)
        self.label, self.config = compression_config(self.args, scorer=scorer)
        device = self.args.device
        if device is None:
            device = "cpu" if not torch.cuda.is_available() else \
                f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world > 1 else "cuda"
        from ..demo.runner import load

        self._model, self.processor = load(self.args.pretrained, dtype=self.args.dtype, device=device,
                                           local_files_only=self.args.local_files_only)
        if getattr(self.processor, "tokenizer", None) is None:
            raise ValueError(f"vlmcompress model_args: pretrained={self.args.pretrained!r} has no tokenizer in its "
                             "processor; a VLM processor (AutoProcessor) is needed")
        # Left padding: each row's last prompt token sits at the end, so greedy batches equal singles.
        self.processor.tokenizer.padding_side = "left"
        if self.config is not None:
            import vlmcompress as vc

            vc.patch(self._model, self.config, processor=self.processor)
        self._device = self._model.device
        self.batch_size_per_gpu = self.args.batch_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lmms-eval's constructor: ``--model_args`` win over its ``--batch_size``/``--device``."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vlmcompress lmms-eval model: loglikelihood (multiple_choice output) is not "
                                  "implemented; use a task's generate_until variant")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("vlmcompress lmms-eval model: multi-round generation is not implemented")

    def _visuals(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]

    @torch.no_grad()
    def _generate(self, contexts: Sequence[str], blocks: Sequence[list[dict]], metas: Sequence[list[dict]],
                  gen_kwargs: dict) -> list[str]:
        chats = [[{"role": "user", "content": [*b, {"type": "text", "text": c}]}] for c, b in zip(contexts, blocks)]
        kwargs: dict[str, Any] = {"padding": True}
        video_meta = [m for ms in metas for m in ms]
        if video_meta:
            kwargs["video_metadata"] = video_meta
        inputs = self.processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", processor_kwargs=kwargs)
        inputs = inputs.to(self._device)
        # Only floating tensors take the model's dtype (pixel values); ids and grids stay integers.
        dtype = self._model.dtype
        for k, v in inputs.items():
            if torch.is_tensor(v) and v.is_floating_point():
                inputs[k] = v.to(dtype)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        generate = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.args.max_new_tokens)),
                        do_sample=do_sample, num_beams=int(gen_kwargs.get("num_beams", 1) or 1))
        if do_sample:
            generate["temperature"] = temperature if temperature > 0 else 1.0
            if gen_kwargs.get("top_p") is not None:
                generate["top_p"] = float(gen_kwargs["top_p"])
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is not None:
            generate["pad_token_id"] = tokenizer.pad_token_id
        out = self._model.generate(**inputs, **generate)
        prompt = inputs["input_ids"].shape[1]
        return self.processor.batch_decode(out[:, prompt:], skip_special_tokens=True)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Responses in request order. Requests sharing generation settings are batched ``batch_size`` at a
        time (in their original order, so a run with ``--limit`` batches the same docs every time)."""
        from tqdm.auto import tqdm

        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(_gen_key(r.args[1] or {}), []).append(i)
        responses: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc=f"vlmcompress[{self.label}]", disable=self.rank != 0)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                loaded = [[_visual_block(v, self.args.max_frames_num) for v in self._visuals(requests[i])]
                          for i in chunk]
                # Split the chunk where the visuals' shapes differ (stacked pixel tensors need one shape).
                by_shape: dict[tuple, list[int]] = {}
                for j, vis in enumerate(loaded):
                    by_shape.setdefault(tuple(key for _, _, key in vis), []).append(j)
                for members in by_shape.values():
                    texts = self._generate([requests[chunk[j]].args[0] for j in members],
                                           [[b for b, _, _ in loaded[j]] for j in members],
                                           [[m for _, m, _ in loaded[j] if m is not None] for j in members],
                                           gen_kwargs)
                    for j, text in zip(members, texts):
                        responses[chunk[j]] = cut_at_stop(text, until).strip()
                        self.cache_hook.add_partial("generate_until", (requests[chunk[j]].args[0], gen_kwargs),
                                                    responses[chunk[j]])
                bar.update(len(chunk))
        bar.close()
        return responses
