"""End-to-end benchmark: vision tower, prefill and 32 decoded tokens of a whole ``generate()`` request.

Usage:
    python -P benchmarks/e2e.py                                   # both families, 8/32/64 frames, real layer counts
    python -P benchmarks/e2e.py --frames 8 32 --vision-layers 4 --llm-layers 4 --rounds 3
    python -P benchmarks/e2e.py --quick                           # 2-layer towers, 4 frames: plumbing check

Models (random weights, no download), at the real widths of
- ``onevision``: llava-onevision-qwen2-0.5b: SigLIP-so400m 384 px patch 14 (1152 wide, 16 heads, MLP 4304,
  26 layers) + Qwen2-0.5B (896 wide, 14 heads, 2 KV heads, MLP 4864, 24 layers); a frame is 729 patches,
  196 LLM tokens after the family's 2×2 pooling;
- ``qwen2_vl``: Qwen2-VL-2B: ViT 1280 wide, 16 heads, MLP ×4, 32 layers, patch 14, 2×2 merger + Qwen2-1.5B
  (1536 wide, 12 heads, 2 KV heads, MLP 8960, 28 layers); frames at 336×336 px (``--qwen-side``), so a
  temporal patch (2 frames) is 576 patches, 144 LLM tokens.
``--vision-layers`` / ``--llm-layers`` cut the depths (same widths) so a run fits a 2-core CPU; the table
says which. The vocabulary is cut to 8,192 (the LM head runs on one token per step either way). fp32, SDPA.

The video: a random background with a bright square that jumps every 4 frames (a slide-show-like clip,
so consecutive frames repeat and frame skipping has something to skip; with 2-frame temporal patches,
every other Qwen temporal patch repeats its predecessor).

Settings (per family): unpatched; each stage alone: A (``vision_keep=0.5``), frame skipping
(``FrameSkip(threshold=0.05)``, before the tower: per frame on LLaVA-OV, per temporal patch on Qwen), B
(pooling to 10 % of the tokens); and the
combinations. ``T 0.9``: temporal merging (``TemporalMerge(threshold=0.9)``, after skipping; on Qwen after
stage A too, on the blocks of merged units each temporal patch keeps). ``LLM PA``: proportional attention
for merged visual tokens inside the LLM (``llm_proportional_attention=True``: ``+log(size)`` on the logits
towards a merged token, prefill and decoding). Every run is one ``model.generate(max_new_tokens=32, min_new_tokens=32, greedy)``:

    vision s    the encoder (``adapter.encode`` patched / ``get_video_features`` unpatched), timed inside the call
    prefill s   time to the first token minus vision: vlmcompress's input preparation + the LLM prefill
    decode s    the 31 decoding steps after the first token (a LogitsProcessor timestamps every step)
    e2e s       the whole call; median over ``--rounds`` interleaved rounds (alternating order), [min–max]
    peak MB     peak RSS the call added (VmHWM after a reset, cold run, as benchmarks/prefill.py)
    KV MB       the bytes of the returned cache (keys + values, all layers) after the 32 tokens
    accuracy    exact-match accuracy of the task-trained tiny model of the family (``vlmcompress.models``)
                on ``vlmcompress.synthetic`` with the same config; "n/a" when that model is not installed

Tower alone: the vision time at ``vision_keep=0.5`` against the unpatched one, and the FLOP-ideal ratio of
the token counts (FLOPs of the transformer blocks with the per-layer counts of the merge schedule; the
attention of a layer at its input count, its MLP at the merged count).
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlmcompress.testing.bench import append_csv, csv_row, load_average, log, measure_memory
from vlmcompress.testing.bench import machine as _machine

RESULTS = Path(__file__).resolve().parent / "results" / "e2e.csv"
FIELDS = ["date", "machine", "cpus", "threads", "torch", "transformers", "load_start", "load_end", "family",
          "frames", "vision_layers", "llm_layers", "setting", "visual_before", "visual_after", "prefill_tokens",
          "frames_encoded", "vision_s", "prefill_s", "decode_s", "e2e_s", "e2e_min_s", "e2e_max_s", "rounds",
          "speedup", "speedup_min", "speedup_max", "vision_speedup", "vision_ideal", "decode_tok_s",
          "peak_mb", "kv_mb", "accuracy", "accuracy_retained", "note"]
NEW_TOKENS = 32
PROMPT = "What happens in this video? Describe the square and where it moves."

SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384, patch_size=14,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False, num_hidden_layers=26)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, num_hidden_layers=24,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
QWEN2VL_VIT = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2)
QWEN2_15B = dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, num_hidden_layers=28,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]})


@dataclass
class Setting:
    name: str
    make: object           # () -> CompressionConfig, or None for the unpatched model
    tower_ideal: bool = False   # print the tower's FLOP-ideal beside its speed-up (stage A alone)


def settings(family: str) -> list[Setting]:
    from vlmcompress.config import CompressionConfig as C
    from vlmcompress.frame_skip import FrameSkip
    from vlmcompress.steps import PromptGuidedPool, TemporalMerge

    skip = FrameSkip(threshold=0.05)
    pool = PromptGuidedPool(keep_ratio=0.1)
    pool25 = PromptGuidedPool(keep_ratio=0.25)
    temporal = TemporalMerge(threshold=0.9)
    pa = dict(llm_proportional_attention=True)
    return [
        Setting("unpatched", None),
        Setting("A: vision_keep 0.5", lambda: C(vision_keep=0.5), tower_ideal=True),
        Setting("skip: FrameSkip 0.05", lambda: C.from_steps(skip)),
        Setting("B: pool 0.1", lambda: C.from_steps(pool)),
        Setting("skip + B 0.1", lambda: C.from_steps(skip, pool)),
        Setting("A 0.5 + skip", lambda: C.from_steps(skip, vision_keep=0.5)),
        Setting("A 0.75 + skip", lambda: C.from_steps(skip, vision_keep=0.75)),
        Setting("A 0.9 + skip", lambda: C.from_steps(skip, vision_keep=0.9)),
        Setting("A 0.5 + skip + B 0.1", lambda: C.from_steps(skip, pool, vision_keep=0.5)),
        Setting("A 0.5 + skip + B 0.25", lambda: C.from_steps(skip, pool25, vision_keep=0.5)),
        Setting("skip + B 0.25", lambda: C.from_steps(skip, pool25)),
        Setting("skip + T 0.9, LLM PA", lambda: C.from_steps(skip, temporal, **pa)),
        Setting("A 0.6 + skip, LLM PA", lambda: C.from_steps(skip, vision_keep=0.6, **pa)),
        Setting("A 0.6 + skip + T 0.9, LLM PA", lambda: C.from_steps(skip, temporal, vision_keep=0.6, **pa)),
        Setting("A 0.5 + skip + T 0.9, LLM PA", lambda: C.from_steps(skip, temporal, vision_keep=0.5, **pa)),
    ]


# --- models ------------------------------------------------------------------------------------------

def build(family: str, args):
    """``(model, processor)``: real widths, ``args`` depths, random weights, fp32, SDPA."""
    import transformers as tf

    from vlmcompress.testing.tiny_models import tiny_config, tiny_processor

    fam = "llava_onevision" if family == "onevision" else "qwen2_vl"
    tiny = tiny_config(fam)
    ids = tiny.get_text_config()
    tok = tiny_processor(fam).tokenizer
    special = dict(vocab_size=8192, pad_token_id=ids.pad_token_id, bos_token_id=ids.bos_token_id,
                   eos_token_id=ids.eos_token_id, model_type="qwen2")
    torch.manual_seed(0)
    if family == "onevision":
        vision = dict(SIGLIP, model_type="siglip_vision_model", num_hidden_layers=args.vision_layers or 26)
        text = dict(QWEN2_05B, **special, num_hidden_layers=args.llm_layers or 24)
        config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                         image_token_index=tiny.image_token_id, video_token_index=tiny.video_token_id,
                                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                                         vision_aspect_ratio="anyres_max_9")
        side = SIGLIP["image_size"]
        size = {"height": side, "width": side}
        processor = tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(size=size), tokenizer=tok,
            video_processor=tf.LlavaOnevisionVideoProcessor(size=size),
            num_image_tokens=(side // 14) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template)
    else:
        vision = dict(QWEN2VL_VIT, depth=args.vision_layers or 32, hidden_size=QWEN2_15B["hidden_size"])
        text = dict(QWEN2_15B, **special, num_hidden_layers=args.llm_layers or 28)
        config = tf.Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=tiny.image_token_id,
                                  video_token_id=tiny.video_token_id, vision_start_token_id=tiny.vision_start_token_id,
                                  vision_end_token_id=tiny.vision_end_token_id)
        pixels = args.qwen_side ** 2
        kw = dict(patch_size=14, temporal_patch_size=2, merge_size=2,
                  size={"shortest_edge": pixels, "longest_edge": pixels})
        processor = tf.Qwen2VLProcessor(image_processor=tf.Qwen2VLImageProcessor(**kw), tokenizer=tok,
                                        video_processor=tf.Qwen2VLVideoProcessor(**kw, cap_pixels_per_frame=True),
                                        chat_template=tok.chat_template)
    model = tf.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    return model, processor


def video(frames: int, side: int, seed: int = 0) -> np.ndarray:
    """``[T, side, side, 3]`` uint8: random background, a bright square that jumps every 4 frames."""
    rng = np.random.default_rng(seed)
    clip = np.repeat(rng.integers(0, 256, size=(1, side, side, 3), dtype=np.uint8), frames, axis=0)
    box = side // 4
    for t in range(frames):
        x0 = ((t // 4) * box // 2) % (side - box)
        clip[t, side // 3: side // 3 + box, x0: x0 + box] = 255
    return clip


def inputs_for(processor, clip: np.ndarray) -> dict:
    from vlmcompress.testing.adapter_checks import chat_inputs

    return chat_inputs(processor, [([("video", clip)], PROMPT)])


# --- FLOPs of the tower blocks ------------------------------------------------------------------------

def block_flops(n_in: int, n_out: int, segments_in: list[int], d: int, mlp: int, mlp_matrices: int = 2) -> float:
    """One ToMe block: q,k,v,o and attention at ``n_in`` tokens (per segment), the MLP at ``n_out``
    (``mlp_matrices`` of ``d × mlp``: 3 for a gated MLP such as Qwen2.5-VL's)."""
    attention = sum(4 * s * s * d for s in segments_in)
    return 2 * n_in * 4 * d * d + attention + 2 * n_out * mlp_matrices * d * mlp


def tower_ideal(family: str, model, grid_or_frames, config) -> float:
    """FLOPs(blocks, unmerged) / FLOPs(blocks, merged at ``config``), from the closed-form schedule."""
    if family == "onevision":
        from vlmcompress.adapters.vision_merge import tower_schedule

        v = model.config.vision_config
        frames, n = grid_or_frames, (v.image_size // v.patch_size) ** 2
        layers, d, mlp = v.num_hidden_layers, v.hidden_size, v.intermediate_size
        sched, per = tower_schedule(n, layers, config), 1
        segs = [(n, sched)] * frames
    else:
        from vlmcompress.adapters.qwen_vision_merge import _segment_schedule, qwen_segments

        v = model.config.vision_config
        layers, d, mlp, per = v.depth, v.embed_dim, int(v.embed_dim * v.mlp_ratio), 4
        segs = [(n, _segment_schedule(n, layers, config.vision_keep, config.vision_ramp))
                for item in qwen_segments(grid_or_frames, v) for _, n in item]
    full = merged = 0.0
    counts = [n for n, _ in segs]
    for layer in range(layers):
        full += block_flops(sum(counts) * per, sum(counts) * per, [c * per for c, _ in segs], d, mlp)
    counts = [n for n, _ in segs]
    for layer in range(layers):
        after = [c - s[layer] for c, (_, s) in zip(counts, segs)]
        merged += block_flops(sum(counts) * per, sum(after) * per, [c * per for c in counts], d, mlp)
        counts = after
    return full / merged


# --- one timed request ----------------------------------------------------------------------------------

class _Stamps:
    """A LogitsProcessor that records the time of every generation step (the first one ends the prefill)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _vision_ends(model):
    """``(first module, last module)`` of the vision encoder: the patch embedding and the projector (LLaVA-OV)
    / merger (Qwen2-VL). Both run in the model's own encoder and in the Qwen stage-A run, so forward hooks
    on them time the same span patched and unpatched."""
    base = model.model
    if hasattr(base, "visual"):
        return base.visual.patch_embed, base.visual.merger
    tower = base.vision_tower
    tower = getattr(tower, "vision_model", tower)
    return tower.embeddings.patch_embedding, base.multi_modal_projector


def request(model, inputs, config, processor=None):
    """One ``generate`` of 32 tokens, patched with ``config`` (``None``: unpatched). Returns a dict of times."""
    import vlmcompress as vc
    from transformers import LogitsProcessorList

    stamps, spans = _Stamps(), []
    first, last = _vision_ends(model)
    hooks = [first.register_forward_pre_hook(lambda m, a: spans.append([time.perf_counter(), None])),
             last.register_forward_hook(lambda m, a, o: spans[-1].__setitem__(1, time.perf_counter()))]
    if config is not None:
        vc.patch(model, config, processor=processor)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 logits_processor=LogitsProcessorList([stamps]), return_dict_in_generate=True)
        total = time.perf_counter() - t0
        report = model.vlmcompress.report if config is not None else None
        skips = getattr(model.vlmcompress.adapter, "frame_skips", None) if config is not None else None
    finally:
        for h in hooks:
            h.remove()
        if config is not None:
            vc.unpatch(model)
    if len(stamps.times) != NEW_TOKENS:
        raise RuntimeError(f"generate made {len(stamps.times)} steps, expected {NEW_TOKENS}")
    ttft = stamps.times[0] - t0
    v = sum(b - a for a, b in spans if b is not None)
    return dict(vision_s=v, prefill_s=ttft - v, decode_s=total - ttft, e2e_s=total,
                kv_mb=_cache_bytes(out.past_key_values) / 2 ** 20, report=report, skips=skips)


# --- accuracy on the task-trained tiny models -------------------------------------------------------------

def accuracy(family: str, setting: Setting, args) -> float | None:
    """Exact-match accuracy of the trained tiny model of ``family`` under ``setting`` on the synthetic test
    split (``--accuracy-per-task`` samples per task, ``--accuracy-frames`` frames); ``None`` when the
    model is not installed."""
    from vlmcompress import models

    name = TRAINED[family]
    if name not in models.available():
        return None
    key = (name, setting.name)
    if key not in _ACC_DONE:      # the same for every --frames value (it uses --accuracy-frames)
        per_task = per_task_accuracy(family, setting, args)
        _ACC_DONE[key] = sum(per_task.values()) / len(per_task)
    return _ACC_DONE[key]


def per_task_accuracy(family: str, setting, args) -> dict[str, float]:
    """Per task, the exact-match accuracy of the trained tiny model of ``family`` under ``setting.make()``
    (``None``: unpatched) on ``args.accuracy_per_task`` test items from ``args.accuracy_start``."""
    import vlmcompress as vc
    from vlmcompress import models, synthetic

    name = TRAINED[family]
    model, processor = _ACC_MODELS.setdefault(name, models.load(name))
    samples = list(synthetic.benchmark(per_task=args.accuracy_per_task, frames=args.accuracy_frames,
                                       start=args.accuracy_start))
    config = setting.make() if setting.make is not None else None
    right: dict[str, list[int]] = {}
    for s in samples:
        inputs = inputs_for_question(processor, s)
        with torch.inference_mode():
            if config is None:
                out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
            else:
                with vc.compressed(model, config, processor=processor):
                    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        tally = right.setdefault(s.task, [0, 0])
        tally[0] += answer.strip().lower().split(" ")[0].strip(".") == s.answer.lower()
        tally[1] += 1
    return {task: ok / n for task, (ok, n) in right.items()}


TRAINED = {"onevision": "synth-onevision", "qwen2_vl": "synth-qwen2-vl"}   # family -> shipped tiny model
_ACC_MODELS: dict = {}
_ACC_DONE: dict = {}


def inputs_for_question(processor, sample) -> dict:
    from vlmcompress.testing.adapter_checks import chat_inputs

    return chat_inputs(processor, [([("video", sample.frames)], sample.question)])


# --- main ---------------------------------------------------------------------------------------------------

def run_family(family: str, args, common: dict) -> list[dict]:
    import vlmcompress as vc  # noqa: F401  (registers nothing; imported for the adapters)

    t0 = time.perf_counter()
    model, processor = build(family, args)
    log(f"{family}: model built in {time.perf_counter() - t0:.0f} s")
    side = SIGLIP["image_size"] if family == "onevision" else args.qwen_side
    rows = []
    for frames in args.frames:
        inputs = inputs_for(processor, video(frames, side))
        cases = []
        for s in settings(family):
            if args.only and s.name != "unpatched" and not any(o in s.name for o in args.only):
                continue
            config = s.make() if s.make is not None else None
            try:
                first, peak, _ = measure_memory(functools.partial(request, model, inputs, config, processor))
            except Exception as e:     # a setting this family does not take: say so in the table
                log(f"{family} {frames} frames {s.name}: not measured: {type(e).__name__}: {e}")
                rows.append(dict(common, family=family, frames=frames, setting=s.name,
                                 note=f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
                continue
            cases.append(dict(setting=s, config=config, runs=[], peak=peak, first=first))
            log(f"{family} {frames} frames {s.name}: cold {first['e2e_s']:.1f} s (vision {first['vision_s']:.1f})")
        for i in range(args.rounds):
            for case in (cases if i % 2 == 0 else cases[::-1]):
                case["runs"].append(request(model, inputs, case["config"], processor))
            log(f"{family} {frames} frames: round {i + 1}/{args.rounds}, load {load_average()}")
        base = None
        grid = inputs.get("video_grid_thw")
        for case in cases:
            runs = case["runs"] or [case["first"]]
            med = {k: statistics.median(r[k] for r in runs) for k in ("vision_s", "prefill_s", "decode_s", "e2e_s")}
            e2e = [r["e2e_s"] for r in runs]
            report, skips = case["first"]["report"], case["first"]["skips"]
            visual_before = report.visual_before if report else int((inputs["input_ids"] == model.config.video_token_id).sum())
            row = dict(common, family=family, frames=frames, setting=case["setting"].name, rounds=len(runs),
                       vision_layers=args.vision_layers or "real", llm_layers=args.llm_layers or "real",
                       visual_before=visual_before, visual_after=report.visual_after if report else visual_before,
                       prefill_tokens=report.prefill_after[0] if report else int(inputs["attention_mask"].sum()),
                       frames_encoded=(f"{sum(len(s.kept) for s in skips)}/{sum(s.num_units for s in skips)} "
                                       f"{'tp' if family == 'qwen2_vl' else 'frames'}"
                                       if skips else ""),
                       **med, e2e_min_s=min(e2e), e2e_max_s=max(e2e), peak_mb=case["peak"],
                       kv_mb=case["first"]["kv_mb"], decode_tok_s=(NEW_TOKENS - 1) / med["decode_s"], note="")
            vision = [r["vision_s"] for r in runs]
            if base is None:
                base = row
                base["_e2e"], base["_vision"] = e2e, vision
            # spread of the speedups: pairwise by round (same round, same load)
            ratios = [b / r for b, r in zip(base["_e2e"], e2e)]
            tower = [b / r for b, r in zip(base["_vision"], vision)]
            row.update(speedup=base["e2e_s"] / row["e2e_s"], speedup_min=min(ratios), speedup_max=max(ratios),
                       vision_speedup=base["vision_s"] / row["vision_s"], vision_speedup_min=min(tower),
                       vision_speedup_max=max(tower))
            if case["setting"].tower_ideal:
                row["vision_ideal"] = tower_ideal(family, model, grid if grid is not None else frames, case["config"])
            if args.accuracy_per_task:
                acc = accuracy(family, case["setting"], args)
                row["accuracy"] = "n/a" if acc is None else acc
            rows.append(row)
        accs = [r for r in rows if r.get("family") == family and r.get("frames") == frames and
                isinstance(r.get("accuracy"), float)]
        if accs:
            ref = accs[0]["accuracy"]
            for r in accs:
                r["accuracy_retained"] = r["accuracy"] / ref if ref else None
    del model
    return rows


def print_table(rows, args) -> None:
    r0 = rows[0]
    print(f"\n{r0['family']}: {r0['machine']}, {r0['threads']} threads, torch {r0['torch']}, transformers {r0['transformers']}, fp32; "
          f"load {r0['load_start']} -> {r0['load_end']}; depths: vision {args.vision_layers or 'real'}, "
          f"LLM {args.llm_layers or 'real'} layers; {args.rounds} interleaved rounds (median [min-max])\n")
    print("| family | frames | setting | LLM visual tokens | encoded | vision s | prefill s | decode s (31 tok) "
          "| e2e s | e2e speedup | tower speedup (ideal) | decode tok/s | peak MB | KV MB | accuracy |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "e2e_s" not in r:
            print(f"| {r['family']} | {r['frames']} | {r['setting']} | {r['note']} |" + " |" * 11)
            continue
        ideal = f" ({r['vision_ideal']:.2f}x)" if r.get("vision_ideal") else ""
        acc = r.get("accuracy", "")
        acc = f"{acc:.2f}" if isinstance(acc, float) else (acc or "-")
        print(f"| {r['family']} | {r['frames']} | {r['setting']} | {r['visual_after']} / {r['visual_before']} | "
              f"{r['frames_encoded'] or 'all'} | {r['vision_s']:.2f} | {r['prefill_s']:.2f} | {r['decode_s']:.2f} | "
              f"{r['e2e_s']:.2f} [{r['e2e_min_s']:.2f}-{r['e2e_max_s']:.2f}] | {r['speedup']:.2f}x "
              f"[{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] | {r['vision_speedup']:.2f}x "
              f"[{r['vision_speedup_min']:.2f}-{r['vision_speedup_max']:.2f}]{ideal} | "
              f"{r['decode_tok_s']:.1f} | {r['peak_mb']:.0f} | {r['kv_mb']:.1f} | {acc} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", nargs="+", default=["onevision", "qwen2_vl"], choices=["onevision", "qwen2_vl"])
    p.add_argument("--frames", nargs="+", type=int, default=[8, 32, 64])
    p.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds after one cold run per setting")
    p.add_argument("--vision-layers", type=int, default=0, help="tower depth (0: the real one)")
    p.add_argument("--llm-layers", type=int, default=0, help="LLM depth (0: the real one)")
    p.add_argument("--qwen-side", type=int, default=336, help="Qwen2-VL frame side in px (multiple of 28)")
    p.add_argument("--only", nargs="+", help="only settings whose name contains one of these (plus unpatched)")
    p.add_argument("--accuracy-per-task", type=int, default=10, help="synthetic samples per task (0: no accuracy)")
    p.add_argument("--accuracy-frames", type=int, default=16)
    p.add_argument("--accuracy-start", type=int, default=0,
                   help="first test item of every task (items not used to choose the settings)")
    p.add_argument("--quick", action="store_true", help="2-layer models, 4 frames, 1 round: plumbing check only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a shared, "
                   "overloaded machine avoids OpenMP threads waiting for each other")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.vision_layers, args.llm_layers, args.rounds, args.frames = 2, 2, 1, [4]
        args.accuracy_per_task = min(args.accuracy_per_task, 1)
    import transformers

    common = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=_machine(),
                  cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                  transformers=transformers.__version__, load_start=load_average(), load_end="")
    # Each family's rows are printed and stored as soon as it is done: a run cut short keeps what it measured.
    for family in args.family:
        rows = run_family(family, args, common)
        for r in rows:
            r["load_end"] = load_average()
            r.pop("_e2e", None)
            r.pop("_vision", None)
        print_table(rows, args)
        if not args.no_csv and not args.quick:
            written = append_csv(RESULTS, FIELDS, (csv_row(r, FIELDS) for r in rows))
            print(f"\nappended {written} rows to {RESULTS}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
