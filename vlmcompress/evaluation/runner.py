"""`evaluate`: every setting on the same items, compared with the unpatched model in the same process."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .dataset import EvalItem, normalise_answer
from .measure import cache_bytes, measured
from .methods import Setting, parse_setting
from .report import EvalResult

__all__ = ["evaluate"]


def _inputs(processor, batch: Sequence[EvalItem], device):
    chats, meta = [], []
    for it in batch:
        block = ({"type": "video", "video": it.frames} if it.kind == "video"
                 else {"type": "image", "image": _pil(it.image)})
        chats.append([{"role": "user", "content": [block, {"type": "text", "text": it.question}]}])
        if it.kind == "video":
            t = it.frames.shape[0]
            meta.append(dict(total_num_frames=t, fps=float(it.fps), duration=t / it.fps, frames_indices=list(range(t))))
    processor.tokenizer.padding_side = "left"
    kwargs = {"padding": True}
    if meta:
        kwargs["video_metadata"] = meta
    inputs = processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs=kwargs)
    return inputs.to(device)


def _pil(array):
    from PIL import Image

    return Image.fromarray(np.asarray(array))


def _visual_counts(model, input_ids: torch.Tensor) -> list[int]:
    cfg = model.config
    ids = [getattr(cfg, k, None) for k in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")]
    ids = [i for i in ids if isinstance(i, int)]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i in set(ids):
        mask |= input_ids == i
    return mask.sum(1).tolist()


def _batches(items: Sequence[EvalItem], size: int) -> list[list[EvalItem]]:
    """Consecutive items of one kind and frame count, at most `size` per batch."""
    out: list[list[EvalItem]] = []
    for it in items:
        key = (it.kind, None if it.frames is None else it.frames.shape)
        if out and len(out[-1]) < size and (out[-1][0].kind, None if out[-1][0].frames is None else out[-1][0].frames.shape) == key:
            out[-1].append(it)
        else:
            out.append([it])
    return out


@torch.no_grad()
def _run_setting(model, processor, setting: Setting, batches, cached_inputs, *, max_new_tokens: int,
                 progress: Callable | None) -> list[dict]:
    import vlmcompress as vc

    if setting.config is None:
        if vc.is_patched(model):
            vc.unpatch(model)
    else:
        vc.patch(model, setting.config, processor=processor)
    records = []
    device = model.device
    for b, batch in enumerate(batches):
        inputs = cached_inputs[b]
        with measured(model, device) as (times, first):
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 return_dict_in_generate=True, output_logits=True, logits_processor=[first])
        prompt = inputs["input_ids"].shape[1]
        texts = processor.batch_decode(out.sequences[:, prompt:], skip_special_tokens=True)
        first_logp = torch.log_softmax(out.logits[0].double(), -1).cpu()
        before = _visual_counts(model, inputs["input_ids"])
        real = inputs["attention_mask"].sum(1).tolist()
        if setting.config is not None:
            report = model.vlmcompress.report
            after = [0] * len(batch)
            for item in report.items:
                after[item.row] += item.after_compress
            prefill_after = list(report.prefill_after)
        else:
            after, prefill_after = before, real
        kv = cache_bytes(getattr(out, "past_key_values", None))
        n = len(batch)
        for i, it in enumerate(batch):
            answer = normalise_answer(texts[i])
            records.append(dict(
                setting=setting.label, method=setting.method, keep=setting.keep, item=it.id, task=it.task,
                answer=answer, correct=answer in {normalise_answer(a) for a in it.answers},
                visual_before=before[i], visual_after=after[i], prefill_before=real[i], prefill_after=prefill_after[i],
                vision_s=times.vision_s / n, prefill_s=times.prefill_s / n, ttft_s=times.ttft_s / n,
                decode_s=times.decode_s / n, total_s=times.total_s / n, peak_mb=times.peak_mb, kv_bytes=kv / n,
                _logp=first_logp[i],
            ))
        if progress is not None:
            progress(n)
    if vc.is_patched(model):
        vc.unpatch(model)
    return records


def evaluate(model, processor, dataset: Iterable[EvalItem], settings: Sequence, *, scorer=None,
             max_new_tokens: int = 4, batch_size: int = 8, seed: int = 0, progress: bool | Callable = False) -> EvalResult:
    """Evaluate compression settings against the unpatched model on the same items and frames.

    Args:
        model, processor: a loaded HF VLM of a supported family and its processor.
        dataset: :class:`EvalItem` s (:func:`synthetic_items`, :func:`jsonl_items`).
        settings: ``"method@keep"`` strings (:mod:`.methods`), ``"preset:<name>"``, ``CompressionConfig`` s
            or ``(label, CompressionConfig)`` pairs. ``"none"`` (the unpatched reference) is added first
            when missing: accuracy retained, agreement, KL and time ratios are relative to it.
        scorer: relevance scorer for the ``prompt-pool`` methods (e.g. ``vlmcompress.models.relevance_scorer()``).
        max_new_tokens: greedy decoding length (the synthetic answers are one word).
        batch_size: items per ``generate()`` call (left padding); times are per item.
        seed: seed of the random-drop baseline.
        progress: show a tqdm bar (or a callable taking the number of items done).

    Returns:
        :class:`EvalResult` (``.summary`` rows, ``.table()``, ``.write(folder)``). The model is left
        unpatched.
    """
    import vlmcompress as vc

    items = list(dataset)
    if not items:
        raise ValueError("dataset holds no items")
    if not all(isinstance(i, EvalItem) for i in items):
        raise TypeError("dataset must yield EvalItem objects (see synthetic_items / jsonl_items)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    parsed = [parse_setting(s, scorer=scorer, seed=seed) for s in settings]
    labels = [s.label for s in parsed]
    dupes = sorted({l for l in labels if labels.count(l) > 1})
    if dupes:
        raise ValueError(f"settings must be distinct; repeated: {dupes}")
    if "none" not in labels:
        parsed.insert(0, parse_setting("none"))
    else:  # the reference runs first
        parsed.sort(key=lambda s: s.label != "none")
    batches = _batches(items, batch_size)
    cached = [_inputs(processor, b, model.device) for b in batches]
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items) * len(parsed), unit="item", desc="evaluate")
        tick = bar.update
    elif callable(progress):
        tick = progress
    else:
        tick = None
    records: list[dict] = []
    try:
        for setting in parsed:
            if bar is not None:
                bar.set_postfix_str(setting.label)
            records += _run_setting(model, processor, setting, batches, cached, max_new_tokens=max_new_tokens,
                                    progress=tick)
    finally:
        if bar is not None:
            bar.close()
        if vc.is_patched(model):  # an error mid-setting must not leave the caller's model patched
            vc.unpatch(model)
    reference = {r["item"]: r for r in records if r["setting"] == "none"}
    for r in records:
        ref = reference[r["item"]]
        r["agree"] = r["answer"] == ref["answer"]
        p, q = ref["_logp"], r["_logp"]
        r["kl"] = float((p.exp() * (p - q)).sum()) if r is not ref else 0.0
    for r in records:
        r.pop("_logp")
    return EvalResult(records, model_name=getattr(model.config, "_name_or_path", "") or model.config.model_type)

