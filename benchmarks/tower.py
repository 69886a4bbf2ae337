"""The vision tower alone at ``vision_keep=0.5`` against the unpatched tower, and the FLOP-ideal speed-up of
its token counts, for every vision tower that supports stage A (merging inside the tower).

Usage:
    python -P benchmarks/tower.py                                   # every tower, real depths, 8 frames, 3 rounds
    python -P benchmarks/tower.py --vision-layers 4 --frames 8 --rounds 3 --threads 2
    python -P benchmarks/tower.py --towers qwen2_5_vl qwen3_vl --vision-layers 8
    python -P benchmarks/tower.py --quick                           # 2 layers, 2 frames, 1 round: plumbing check

Towers (random weights, no download, real widths; fp32, SDPA), each through the adapter of a family that uses it:

    clip        CLIP ViT-L/14-336 (LLaVA-1.5): 1024 wide, 16 heads, MLP 4096, 24 layers; 336 px, 576 patches + CLS;
                merges up to the layer LLaVA reads (-2); the unread last layer does not run under stage A
    siglip      SigLIP-so400m (LLaVA-OneVision): 1152 wide, 16 heads, MLP 4304, 26 layers; 384 px, 729 patches
    internvit   InternViT-300M (InternVL3, HF format): 1024 wide, 16 heads, MLP 4096, 24 layers; 448 px, 1024
                patches + CLS
    qwen2_vl    Qwen2-VL ViT: 1280 wide, 16 heads, MLP 5120, 32 layers, patch 14; 336 px frames, 576 patches per
                temporal patch (2 frames), merged as 2x2 merger units
    qwen2_5_vl  Qwen2.5-VL ViT: 1280 wide, 16 heads, gated MLP 3420, 32 layers, patch 14, 112 px windows (16
                units), full attention in layers 7/15/23/31; 336 px frames
    qwen3_vl    Qwen3-VL-2B/4B ViT: 1024 wide, 16 heads, MLP 4096, 24 layers, patch 16, DeepStack taps after
                layers 5/11/17; 384 px frames

LLaVA-1.5 takes images only: its input is the ``--frames`` frames of the clip as separate images; every other
tower gets the same clip as one video (``benchmarks/e2e.py``'s ``video``: a bright square that jumps every 4
frames) through its family's processor. The LLM of every model is the family's tiny one
(``vlmcompress.testing.tiny_models``): it never runs. ``--vision-layers N`` cuts the depth (same widths); the
layer lists scale with it: Qwen2.5-VL keeps full attention in every 8th layer (at least the last), Qwen3-VL's
taps sit at ``i * N // 24`` for i in 5/11/17.

What is timed: one encode of the whole input as the pipeline runs it, ``adapter.encode`` of the patched model
(``vlmcompress.compressed(model, CompressionConfig(vision_keep=0.5))``) against ``adapter.encode`` of the
unpatched model (the model's own ``get_*_features``), from the patch embedding to the end of the tower
(CLIP/SigLIP/InternViT: the tower module, not the projector; Qwen: the merger and the DeepStack mergers), by
forward hooks, so both sides time the same span. After one cold run of each, ``--rounds`` interleaved rounds
(alternating order); the speed-up is per round (same round, same load), median [min-max].

The FLOP-ideal speed-up: FLOPs(span, unpatched) / FLOPs(span, merged), from the closed-form schedules the
adapters use (``tower_schedule``; Qwen's per-segment ``_segment_schedule``), checked against the counts the
run produced. A block costs its q/k/v/o projections and attention at its input count (attention per segment:
image/frame, or Qwen2.5-VL window in its windowed layers), its MLP at the count after its merge (2 or 3
matrices); the patch embedding and the Qwen mergers count too. Not counted: norms, rotary, the matching
itself, the size bias, unmerging: that is the overhead the measured/ideal ratio shows.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmcompress.testing.bench import append_csv, csv_row, load_average, load_script, log, machine

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "tower.csv"
FIELDS = ["date", "machine", "cpus", "threads", "torch", "transformers", "load_start", "load_end", "tower", "family",
          "input", "vision_layers", "widths", "rounds", "tokens_in", "tokens_out", "unpatched_s", "patched_s",
          "speedup", "speedup_min", "speedup_max", "ideal", "measured_over_ideal", "note"]
KEEP = 0.5


e2e = load_script(HERE / "e2e.py", "_benchmarks_e2e")


@dataclass(frozen=True)
class Tower:
    key: str
    label: str
    family: str                 # model_type of the VLM whose adapter runs it
    vision: dict                # the real vision config
    tiny: dict                  # width override of --tiny (tests only)
    side: int                   # frame side in px
    depth_key: str = "num_hidden_layers"
    video: bool = True          # False: the frames go in as separate images
    extra: dict = field(default_factory=dict)   # top-level config fields


_TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)
_TINY_QWEN = dict(hidden_size=64, intermediate_size=128, num_heads=4)
TOWERS = (
    Tower("clip", "CLIP ViT-L/14-336 (LLaVA-1.5)", "llava",
          dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, image_size=336,
               patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768),
          _TINY, 336, video=False, extra=dict(image_seq_length=576)),
    Tower("siglip", "SigLIP-so400m (LLaVA-OneVision)", "llava_onevision", dict(e2e.SIGLIP), _TINY, 384),
    Tower("internvit", "InternViT-300M (InternVL3)", "internvl",
          dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
               image_size=[448, 448], patch_size=[14, 14], hidden_act="gelu", layer_norm_eps=1e-6,
               use_qk_norm=False, layer_scale_init_value=0.1, norm_type="layer_norm"),
          _TINY, 448, extra=dict(image_seq_length=256)),
    Tower("qwen2_vl", "Qwen2-VL ViT", "qwen2_vl", dict(e2e.QWEN2VL_VIT, hidden_size=1536),
          dict(embed_dim=64, num_heads=4, hidden_size=64), 336, depth_key="depth"),
    Tower("qwen2_5_vl", "Qwen2.5-VL ViT", "qwen2_5_vl",
          dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=2048,
               hidden_act="silu"),
          dict(_TINY_QWEN, out_hidden_size=64), 336, depth_key="depth"),
    Tower("qwen3_vl", "Qwen3-VL-2B ViT", "qwen3_vl",
          dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
               temporal_patch_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
               out_hidden_size=2048, hidden_act="gelu_pytorch_tanh"),
          dict(_TINY_QWEN, out_hidden_size=64), 384, depth_key="depth"),
)
BY_KEY = {t.key: t for t in TOWERS}


# --- models and inputs ----------------------------------------------------------------------------------

def vision_config(tower: Tower, layers: int, tiny: bool) -> dict:
    """The tower's vision config at ``layers`` depth (0: the real one), the layer lists scaled to it."""
    v = dict(tower.vision, **(tower.tiny if tiny else {}))
    real = v[tower.depth_key]
    depth = layers or real
    v[tower.depth_key] = depth
    if "fullatt_block_indexes" in v:      # full attention in every 8th layer; at least the last one
        v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < depth] or [depth - 1]
    if "deepstack_visual_indexes" in v:
        v["deepstack_visual_indexes"] = sorted({i * depth // real for i in v["deepstack_visual_indexes"]})
    return v


def build(tower: Tower, layers: int, tiny: bool):
    """``(model, processor)``: the family's tiny VLM with this tower (random weights, fp32, SDPA)."""
    import transformers as tf

    from vlmcompress.testing.tiny_models import tiny_config

    config = tiny_config(tower.family)
    config.vision_config = type(config.vision_config)(**vision_config(tower, layers, tiny))
    for name, value in tower.extra.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    return model, processor(tower)


def processor(tower: Tower):
    """The family's real processor at the tower's frame side, with the tiny tokenizer (its placeholders)."""
    import transformers as tf

    from vlmcompress.testing.tiny_models import tiny_processor

    tok = tiny_processor(tower.family).tokenizer
    s = tower.side
    patch = tower.vision["patch_size"]
    patch = patch[0] if isinstance(patch, list) else patch
    square = {"height": s, "width": s}
    if tower.family == "llava":
        return tf.LlavaProcessor(
            image_processor=tf.LlavaImageProcessor(size={"shortest_edge": s}, crop_size=square), tokenizer=tok,
            chat_template=tok.chat_template, patch_size=patch, vision_feature_select_strategy="default",
            num_additional_image_tokens=1)
    if tower.family == "llava_onevision":
        return tf.LlavaOnevisionProcessor(
            image_processor=tf.LlavaOnevisionImageProcessor(size=square), tokenizer=tok,
            video_processor=tf.LlavaOnevisionVideoProcessor(size=square), num_image_tokens=(s // patch) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template)
    if tower.family == "internvl":
        return tf.InternVLProcessor(
            image_processor=tf.GotOcr2ImageProcessor(size=square, crop_to_patches=False), tokenizer=tok,
            video_processor=tf.InternVLVideoProcessor(size=square), image_seq_length=(s // patch // 2) ** 2,
            chat_template=tok.chat_template)
    kw = dict(patch_size=patch, temporal_patch_size=2, merge_size=2, size={"shortest_edge": s * s, "longest_edge": s * s})
    if tower.family == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        video, cls = Qwen3VLVideoProcessor(**kw, do_sample_frames=False, cap_pixels_per_frame=True), tf.Qwen3VLProcessor
    else:
        video = tf.Qwen2VLVideoProcessor(**kw, cap_pixels_per_frame=True)
        cls = tf.Qwen2VLProcessor if tower.family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
    return cls(image_processor=tf.Qwen2VLImageProcessor(**kw), tokenizer=tok, video_processor=video,
               chat_template=tok.chat_template)


def inputs_for(tower: Tower, proc, frames: int) -> tuple[str, dict]:
    """``(modality, processor outputs)`` for ``frames`` frames of ``e2e.video``: one video, or separate images."""
    from PIL import Image

    from vlmcompress.testing.adapter_checks import chat_inputs

    clip = e2e.video(frames, tower.side)
    if tower.video:
        return "video", chat_inputs(proc, [([("video", clip)], e2e.PROMPT)])
    return "image", chat_inputs(proc, [([("image", Image.fromarray(f)) for f in clip], e2e.PROMPT)])


def encoder_modality(model, modality: str) -> str:
    """InternVL reads video frames as images (no video token in the model)."""
    return "image" if model.config.model_type == "internvl" else modality


# --- FLOPs of the timed span, in closed form ------------------------------------------------------------

def _linear_flops(module: torch.nn.Module, rows: int) -> float:
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


@dataclass
class Counts:
    """Token counts of one encode: per layer ``(attention segments at the input, tokens after the merge)``,
    and the tokens the span starts and ends with (patches; a CLS token is not counted)."""

    layers: list[tuple[list[int], int]]
    tokens_in: int
    tokens_out: int
    units_out: int = 0          # Qwen: merger units after the last layer (the mergers' rows)


def vit_counts(model, inputs: dict, config) -> Counts:
    """CLIP / SigLIP / InternViT under :mod:`adapters.vision_merge`: every image/frame is one attention segment
    of ``patches + protected`` tokens; layers up to the selected hidden state merge (``tower_schedule``);
    the layers after it (LLaVA reads -2) do not run when anything merges."""
    from vlmcompress.adapters.registry import adapter_for
    from vlmcompress.adapters.vision_merge import merging_layers, tower_schedule

    adapter = adapter_for(model)
    layers = _blocks(model)[0]
    pixels = inputs["pixel_values" if "pixel_values" in inputs else "pixel_values_videos"]
    images = pixels.shape[0] * (pixels.shape[1] if pixels.ndim == 5 else 1)
    v = model.config.vision_config
    side = (v.image_size[0] if isinstance(v.image_size, list) else v.image_size)
    patch = v.patch_size[0] if isinstance(v.patch_size, list) else v.patch_size
    patches = (side // patch) ** 2
    protected = getattr(adapter, "vision_protected", 1)
    n = patches + protected
    stop = merging_layers(len(layers), getattr(model.config, "vision_feature_layer", -1))
    schedule = tower_schedule(n, stop, config, protected=protected) if config is not None else []
    out, count = [], n
    for index in range(len(layers)):
        if index >= stop and any(schedule):
            out.append(([0] * images, 0))      # unread: not run (adapters.vision_merge.VisionMerge.unread)
            continue
        after = count - (schedule[index] if index < len(schedule) else 0)
        out.append(([count] * images, after * images))
        count = after
    selected = n - sum(schedule)
    return Counts(out, patches * images, (selected - protected) * images)


def qwen_counts(model, grid_thw, config) -> Counts:
    """Qwen-VL towers under :mod:`adapters.qwen_vision_merge`: merger units merge per segment (a temporal patch;
    a window in Qwen2.5-VL's windowed layers) with ``_segment_schedule`` over all layers; full-attention
    layers attend per temporal patch."""
    from vlmcompress.adapters.qwen_vision_merge import _segment_schedule, _window_units, qwen_segments

    v = model.config.vision_config
    unit = int(v.spatial_merge_size) ** 2
    depth = int(v.depth)
    windowed = _window_units(v) is not None
    full = set(getattr(v, "fullatt_block_indexes", None) or [])
    segments = [(i, f, n) for i, item in enumerate(qwen_segments(grid_thw, v)) for f, n in item]
    counts = [n for _, _, n in segments]
    schedules = [_segment_schedule(n, depth, float(config.vision_keep), float(config.vision_ramp))
                 if config is not None else (0,) * depth for n in counts]
    out = []
    for index in range(depth):
        if windowed and index not in full:
            attention = [c * unit for c in counts]
        else:
            frames: dict[tuple[int, int], int] = {}
            for (i, f, _), c in zip(segments, counts):
                frames[i, f] = frames.get((i, f), 0) + c
            attention = [c * unit for c in frames.values()]
        counts = [c - s[index] for c, s in zip(counts, schedules)]
        out.append((attention, sum(counts) * unit))
    units = sum(n for _, _, n in segments)
    return Counts(out, units * unit, sum(counts) * unit, units_out=sum(counts))


def counts_for(model, modality: str, inputs: dict, config) -> Counts:
    grid = inputs.get("video_grid_thw" if modality == "video" else "image_grid_thw")
    return qwen_counts(model, grid, config) if grid is not None else vit_counts(model, inputs, config)


def span_flops(model, counts: Counts) -> float:
    """FLOPs of the timed span: patch embedding, blocks, and (Qwen) the merger and every DeepStack merger that
    runs, on the final units."""
    blocks, qwen = _blocks(model)
    mlp = [m for m in blocks[0].mlp.modules() if isinstance(m, torch.nn.Linear)]
    d, width = mlp[0].in_features, mlp[0].out_features
    conv = _patch_conv(model)
    total = 2 * counts.tokens_in * conv.weight[0].numel() * conv.out_channels
    total += sum(e2e.block_flops(sum(segs), n_out, segs, d, width, len(mlp)) for segs, n_out in counts.layers)
    if qwen is not None:
        taps = [i for i in (getattr(qwen, "deepstack_visual_indexes", None) or []) if i < len(blocks)]
        mergers = [qwen.merger, *list(getattr(qwen, "deepstack_merger_list", []))[:len(taps)]]
        total += sum(_linear_flops(m, counts.units_out) for m in mergers)
    return total


def _blocks(model):
    """``(encoder layers, the Qwen tower or None)``."""
    base = model.model
    if hasattr(base, "visual"):
        return list(base.visual.blocks), base.visual
    from vlmcompress.adapters.vision_layers import _find_layers

    return list(_find_layers(base.vision_tower)[1]), None


def _patch_conv(model):
    base = model.model
    if hasattr(base, "visual"):
        return base.visual.patch_embed.proj
    from vlmcompress.adapters.vision_layers import _find_layers

    root, _, kind = _find_layers(base.vision_tower)
    return kind.patch_conv(root)


# --- one timed encode -------------------------------------------------------------------------------------

def span_modules(model) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """``(first module, last modules)`` of the span: the patch embedding; the tower module (CLIP/SigLIP/
    InternViT: the projector is left out) or the Qwen merger and DeepStack mergers (the patched run calls
    them after the blocks, not through the tower's forward; the unpatched one inside it)."""
    base = model.model
    if hasattr(base, "visual"):
        return base.visual.patch_embed, [base.visual.merger, *getattr(base.visual, "deepstack_merger_list", [])]
    return _patch_conv(model), [base.vision_tower]


def encode(model, modality: str, inputs: dict, config, proc) -> tuple[float, int | None]:
    """One encode (``config`` ``None``: unpatched) through the adapter. Returns ``(span s, tokens out)``; the
    tokens out are what the run produced (patches at the selected hidden state), ``None`` unpatched."""
    import vlmcompress as vc
    from vlmcompress.adapters.registry import adapter_for
    from vlmcompress.schedule import tokens_after

    marks: list[float] = []
    first, last = span_modules(model)
    hooks = [first.register_forward_pre_hook(lambda m, a: marks.append(time.perf_counter()) if not marks else None)]
    hooks += [m.register_forward_hook(lambda m, a, o: marks.append(time.perf_counter())) for m in last]
    modality = encoder_modality(model, modality)
    produced = None
    try:
        with torch.inference_mode():
            if config is None:
                adapter_for(model).encode(modality, dict(inputs))
            else:
                with vc.compressed(model, config, processor=proc):
                    adapter = model.vlmcompress.adapter
                    enc = adapter.encode(modality, dict(inputs))
                    handle = adapter._vision
                    if hasattr(handle, "schedule"):        # VisionMerge: the schedule of this forward
                        n = handle.grid[1] * handle.grid[2] + handle.protected
                        images = handle.state.batch
                        produced = (tokens_after(n, handle.schedule, handle.protected) - handle.protected) * images
                    else:                                  # QwenVisionMerge: merger units, m² patches each
                        produced = sum(f.shape[0] for f in enc.features) * handle.unit
    finally:
        for h in hooks:
            h.remove()
    if len(marks) < 2:
        raise RuntimeError("the span hooks did not fire: this transformers version runs the tower differently")
    return marks[-1] - marks[0], produced


# --- main ---------------------------------------------------------------------------------------------------

def run_tower(tower: Tower, args, common: dict) -> dict:
    from vlmcompress.adapters.registry import adapter_for
    from vlmcompress.config import CompressionConfig

    t0 = time.perf_counter()
    model, proc = build(tower, args.vision_layers, args.tiny)
    modality, inputs = inputs_for(tower, proc, args.frames)
    log(f"{tower.key}: model and inputs in {time.perf_counter() - t0:.0f} s")
    what = f"{args.frames} {'frames (video)' if tower.video else 'images'} {tower.side} px"
    row = dict(common, tower=tower.key, family=tower.family, input=what, widths="tiny" if args.tiny else "real",
               vision_layers=args.vision_layers or "real", _label=tower.label, note="")
    adapter = adapter_for(model)
    if not adapter.supports_vision_merge:
        return dict(row, note=f"not supported: {type(adapter).__name__} has no stage A (supports_vision_merge=False)")
    config = CompressionConfig(vision_keep=KEEP)
    full, merged = counts_for(model, modality, inputs, None), counts_for(model, modality, inputs, config)
    try:
        cold_base, _ = encode(model, modality, inputs, None, proc)
        cold, produced = encode(model, modality, inputs, config, proc)
    except Exception as e:      # a tower the adapter refuses at this setting: say so in the table
        return dict(row, note=f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    if produced != merged.tokens_out:
        raise RuntimeError(f"{tower.key}: the run left {produced} tokens, the closed-form schedule {merged.tokens_out}; "
                           "the FLOP-ideal would not describe what ran")
    log(f"{tower.key}: cold {cold_base:.2f} s unpatched, {cold:.2f} s at vision_keep {KEEP}")
    base, patched = [], []
    for i in range(args.rounds):
        order = [(None, base), (config, patched)]
        for cfg, into in (order if i % 2 == 0 else order[::-1]):
            into.append(encode(model, modality, inputs, cfg, proc)[0])
        log(f"{tower.key}: round {i + 1}/{args.rounds}, load {load_average()}")
    base, patched = base or [cold_base], patched or [cold]
    ratios = [b / p for b, p in zip(base, patched)]
    ideal = span_flops(model, full) / span_flops(model, merged)
    speedup = statistics.median(ratios)
    return dict(row, rounds=len(ratios), tokens_in=merged.tokens_in, tokens_out=merged.tokens_out,
                unpatched_s=statistics.median(base), patched_s=statistics.median(patched), speedup=speedup,
                speedup_min=min(ratios), speedup_max=max(ratios), ideal=ideal, measured_over_ideal=speedup / ideal)


def print_table(rows: list[dict], args) -> None:
    r0 = rows[0]
    print(f"\nvision towers alone: {r0['machine']}, {r0['threads']} threads, torch {r0['torch']}, transformers "
          f"{r0['transformers']}, fp32, SDPA; load {r0['load_start']} -> {r0['load_end']}; depth: "
          f"{args.vision_layers or 'real'} layers, {'tiny' if args.tiny else 'real'} widths; {args.rounds} "
          f"interleaved rounds (median [min-max])\n")
    print(f"| tower | input | tokens in -> out | unpatched s | vision_keep {KEEP} s | speed-up | FLOP-ideal "
          "| measured/ideal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = f"{r['tower']}: {r['_label']}"
        if "speedup" not in r:
            print(f"| {name} | {r['input']} | {r['note']} | | | | | |")
            continue
        print(f"| {name} | {r['input']} | {r['tokens_in']} -> {r['tokens_out']} | {r['unpatched_s']:.3f} | "
              f"{r['patched_s']:.3f} | {r['speedup']:.2f}x [{r['speedup_min']:.2f}-{r['speedup_max']:.2f}] | "
              f"{r['ideal']:.2f}x | {r['measured_over_ideal']:.0%} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--towers", nargs="+", default=[t.key for t in TOWERS], choices=list(BY_KEY))
    p.add_argument("--vision-layers", type=int, default=0, help="tower depth (0: the real one)")
    p.add_argument("--frames", type=int, default=8, help="video frames (LLaVA-1.5: images); even, for the Qwen "
                   "towers' 2-frame temporal patches")
    p.add_argument("--rounds", type=int, default=3, help="timed interleaved rounds after one cold run of each side")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a shared, "
                   "overloaded machine avoids OpenMP threads waiting for each other")
    p.add_argument("--quick", action="store_true", help="2 layers, 2 frames, 1 round: plumbing check only")
    p.add_argument("--tiny", action="store_true", help="64-wide towers (real token counts): for the tests")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.vision_layers, args.frames, args.rounds = 2, 2, 1
    if args.frames < 2 or args.frames % 2:
        p.error(f"--frames must be even and >= 2 (Qwen temporal patches hold 2 frames), got {args.frames}")
    import transformers

    common = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=machine(),
                  cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                  transformers=transformers.__version__, load_start=load_average(), load_end="")
    rows = []
    for key in args.towers:
        row = run_tower(BY_KEY[key], args, common)
        row["load_end"] = load_average()
        rows.append(row)
        if "speedup" not in row:
            log(f"{key}: {row['note']}")
        # Stored tower by tower: a run cut short keeps what it measured.
        if not (args.no_csv or args.quick or args.tiny):
            append_csv(RESULTS, FIELDS, [csv_row(row, FIELDS)])
    print_table(rows, args)
    if not (args.no_csv or args.quick or args.tiny):
        print(f"\nappended {len(rows)} rows to {RESULTS}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
