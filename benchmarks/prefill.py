"""LLM prefill benchmark: a random LLaVA-OneVision-0.5B reading a video, per compression setting.

Usage:
    python -P benchmarks/prefill.py                 # 8 frames (1,569 video tokens): ~5 min on 2 quiet CPU cores
    python -P benchmarks/prefill.py --frames 16 --vision-repeats 0   # 3,137 video tokens
    python -P benchmarks/prefill.py --quick         # 2-layer towers: checks the plumbing in ~1 min, numbers meaningless

The model is ``LlavaOnevisionForConditionalGeneration`` with the dimensions of llava-onevision-qwen2-0.5b
and random weights (no download): SigLIP-so400m at 384 px, patch 14 (hidden 1152, 16 heads, MLP 4304,
26 layers: the HF checkpoint stores the 26 layers up to the one LLaVA-OV reads, which is also
``LlavaOnevisionConfig``'s default; ``--vision-layers 27`` for the full SigLIP) and Qwen2-0.5B (hidden
896, 24 layers, 14 heads, 2 KV heads, MLP 4864, rope theta 1e6, tied embeddings). The vocabulary is
cut from 151,936 to ``--vocab`` (8,192): prefill computes logits for the last token only
(``logits_to_keep=1``, as ``generate()`` does), so the LM head costs the same in every setting and
only the embedding table's memory changes (``--vocab 151936`` for the real one). fp32, SDPA: this
CPU (no AVX512-BF16/AMX) runs bf16 matmuls ~4x slower than fp32. The tokenizer is the tiny offline
BPE of ``vlmcompress.testing`` with the real processor classes set to 384 px: a video of T frames is
T x 14 x 14 pooled tokens + 1 newline token, inside a ChatML prompt.

Stage A on LLaVA-OV is tower-only (``adapters.vision_merge.TowerOnlyMerge``): the SigLIP layers run on
merged tokens and the output is spread back to all 27x27 patches for the family's own 2x2 pooling, so
it saves vision time (the "vision s" column) and leaves the LLM's token count to stage B.

What is timed (wall clock, ``time.perf_counter``; CPU time too, in the CSV):
    vision s      the tower + projector + 2x2 pooling (``adapter.encode``): once per stage-A setting
                  (``vision_keep``), shared by the stage-B settings (they do not change it); a cold
                  run plus ``--vision-repeats`` warm runs.
    compression   ``vlmcompress.adapters.pipeline.prepare_inputs`` (what a patched ``generate()``
                  runs before the model) with the encoder's output cached, so it is everything
                  vlmcompress adds: finding placeholders, operators (``compress_item``), V2PE/centroid
                  positions, shrinking and packing the sequence. ``--compress-repeats`` per round.
                  The CSV splits it into operators / position map / new positions / rest.
    LLM prefill   one forward of the LLM with the compressed inputs (``mm_encoder_outputs`` +
                  shorter ``input_ids`` + ``position_ids``; ``use_cache=True``, ``logits_to_keep=1``):
                  exactly the first step of ``generate()``. After a cold run of each setting, the
                  warm runs are taken in ``--repeats`` rounds over all settings (alternating
                  direction; short prefills 1-4 times per round, ``--round-seconds``), so a change in
                  the load of a shared machine hits every setting alike.
    estimator     The table uses the BEST (minimum) time of each step; the CSV also has the medians
                  (and CPU times). On this shared 2-core box other processes only ever add time, in
                  bursts of seconds: a burst doubles a 1-s prefill but barely moves a 10-s one, so
                  medians understate the speedup of short prefills (one run at load ~4 gave 3.2x by
                  medians at 10 % tokens where quiet runs give ~9x). The "per round" column gives the
                  spread: each round's speedup (the baseline's median that round over the setting's),
                  median [min-max] over the rounds; when it is narrow and near the best, the run was quiet.
    ideal         FLOPs(L_before) / FLOPs(L_after) of the Qwen2 prefill with the real dimensions:
                  per layer 2·L·(q,k,v,o + 3 MLP matrices) + causal attention 4·L(L+1)/2·(heads·head_dim),
                  plus the LM head on one token. Measured speedup / ideal is the efficiency.

How memory is measured (as in ``benchmarks/ops.py``): before a cold, untimed run of each step, the
kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``) and glibc's mmap threshold is
pinned to 128 KiB (so freed buffers go back to the OS and none is silently reused from the heap);
the step's peak is ``VmHWM - VmRSS`` from ``/proc/self/status``: the peak resident memory the step
added on top of what was live (weights, inputs, cached features). Accurate to about a megabyte. The
timed runs then use glibc's usual 32 MiB threshold. The weights' size is printed with the table.

The CPU is shared: ratios are only compared within one run (DESIGN.md §5); the load average at the
start and end is printed and stored so a noisy run can be recognised.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from vlmcompress.testing.bench import append_csv, csv_row, load_average, log, measure_memory
from vlmcompress.testing.bench import machine as _machine

RESULTS = Path(__file__).resolve().parent / "results" / "prefill.csv"
FIELDS = ["date", "machine", "cpus", "threads", "torch", "transformers", "load_start", "load_end", "dtype",
          "frames", "vision_layers", "llm_layers", "vocab", "setting", "config", "visual_tokens", "visual_after",
          "prefill_before", "prefill_after", "vision_s", "vision_median_s", "vision_runs",
          "llm_prefill_s", "llm_prefill_median_s", "llm_prefill_cpu_s", "llm_runs",
          "speedup", "median_speedup", "cpu_speedup", "ideal", "efficiency",
          "compression_ms", "compression_median_ms", "operators_ms", "position_map_ms", "new_positions_ms",
          "compression_pct", "ttft_s", "ttft_speedup", "vision_peak_mb", "compression_peak_mb", "llm_peak_mb",
          "weights_mb", "note"]

# Real dimensions of llava-onevision-qwen2-0.5b (transformers' LlavaOnevisionConfig / Qwen2-0.5B config).
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384, patch_size=14,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False)
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
PROMPT = "What happens in this video? Describe the man on the left and the red car next to the tree."


@dataclass
class Setting:
    name: str
    config: dict
    note: str = ""


def settings(args) -> list[Setting]:
    """The rows: baseline, each stage alone, then the stages combined at about 10 % of the visual tokens."""
    rows = [Setting("none (ratio 1)", {})]
    rows += [Setting(f"pool {r:g}", {"keep_ratio": r}) for r in (0.5, 0.25, 0.1)]
    rows.append(Setting("temporal keep 0.5", {"temporal_keep": 0.5}))
    # LLaVA-OV's stage A is tower-only (TowerOnlyMerge): the tower runs on fewer tokens, its output is
    # spread back to every patch for the family's 2x2 pooling, so the LLM reads the usual count.
    rows.append(Setting("ToMe in tower 0.5 (stage A)", {"vision_keep": 0.5}, "LLM reads all tokens"))
    ten = {"temporal_keep": 0.5, "keep_ratio": 0.16}        # 149 of 1568 at 8 frames, 274 of 3136 at 16
    rows.append(Setting("temporal 0.5 + pool 0.16", dict(ten)))
    rows.append(Setting("temporal 0.5 + pool 0.16 + V2PE 1/4", dict(ten, v2pe_delta=0.25)))
    rows.append(Setting("A 0.5 + temporal 0.5 + pool 0.16 + V2PE 1/4", dict(ten, vision_keep=0.5, v2pe_delta=0.25)))
    if args.only:
        rows = [r for r in rows if r.name == rows[0].name or any(o in r.name for o in args.only)]
    return rows


# --- model, processor, inputs -----------------------------------------------------------------------

def build(args):
    """The random real-size model (eval, fp32, SDPA) and a 384-px processor with the tiny tokenizer."""
    import transformers as tf

    from vlmcompress.testing.tiny_models import tiny_config, tiny_processor

    tiny = tiny_config("llava_onevision")
    text_ids = tiny.get_text_config()
    tok = tiny_processor("llava_onevision").tokenizer
    if len(tok) > args.vocab:
        raise SystemExit(f"--vocab must be >= the tokenizer's {len(tok)} tokens")
    vision = dict(SIGLIP, model_type="siglip_vision_model", num_hidden_layers=args.vision_layers)
    text = dict(QWEN2_05B, model_type="qwen2", num_hidden_layers=args.llm_layers, vocab_size=args.vocab,
                pad_token_id=text_ids.pad_token_id, bos_token_id=text_ids.bos_token_id,
                eos_token_id=text_ids.eos_token_id)
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text,
                                     image_token_index=tiny.image_token_id, video_token_index=tiny.video_token_id,
                                     vision_feature_select_strategy="full", vision_feature_layer=-1,
                                     vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(0)
    model = tf.AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    model = model.to(getattr(torch, args.dtype)).eval()
    side = SIGLIP["image_size"]
    size = {"height": side, "width": side}
    processor = tf.LlavaOnevisionProcessor(
        image_processor=tf.LlavaOnevisionImageProcessor(size=size), tokenizer=tok,
        video_processor=tf.LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(side // SIGLIP["patch_size"]) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=tok.chat_template)
    return model, processor


def video_inputs(processor, frames: int, dtype: torch.dtype, seed: int = 0):
    """One ChatML turn with a ``[T, 384, 384, 3]`` uint8 clip: a random background with a bright square
    moving right, so consecutive frames are similar but not equal."""
    side = SIGLIP["image_size"]
    rng = np.random.default_rng(seed)
    clip = np.repeat(rng.integers(0, 256, size=(1, side, side, 3), dtype=np.uint8), frames, axis=0)
    box = side // 4
    for t in range(frames):
        x0 = (t * box // 2) % (side - box)
        clip[t, side // 3: side // 3 + box, x0: x0 + box] = 255
    conv = [[{"role": "user", "content": [{"type": "video", "video": clip}, {"type": "text", "text": PROMPT}]}]]
    meta = [dict(total_num_frames=frames, fps=2.0, duration=frames / 2.0, frames_indices=list(range(frames)))]
    inputs = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"video_metadata": meta})
    inputs = dict(inputs)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
    return inputs


def prefill_flops(length: int, text, vocab: int) -> float:
    """FLOPs of a Qwen2 prefill over ``length`` tokens (multiply-add = 2), logits for the last token only."""
    d, heads, kv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    proj = d * heads * head_dim * 2 + d * kv * head_dim * 2          # q, o; k, v
    mlp = 3 * d * text.intermediate_size
    attention = 4 * (length * (length + 1) / 2) * heads * head_dim   # QK^T and AV over causal pairs
    per_layer = 2 * length * (proj + mlp) + attention
    return text.num_hidden_layers * per_layer + 2 * d * vocab


# --- the compression step, with a breakdown --------------------------------------------------------

_PARTS = ("compress_item", "_position_map", "_new_positions")


class CompressionStep:
    """``prepare_inputs`` for one setting with the encoder's output cached, timed with a breakdown of
    the named pipeline functions (operators, V2PE/centroid position map, new positions)."""

    def __init__(self, adapter, config, inputs, encoded):
        self.adapter, self.config, self.inputs, self.encoded = adapter, config, inputs, encoded
        self.walls, self.parts = [], {n: [] for n in _PARTS}

    def __call__(self, record: bool = True):
        from vlmcompress.adapters import pipeline

        times: dict[str, float] = {}
        originals = {n: getattr(pipeline, n) for n in _PARTS}

        def timer(name, fn):
            def call(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            return call

        encoded = self.encoded
        self.adapter.encode = lambda modality, kwargs: encoded[modality]   # instance attribute: no encoder run
        for n, fn in originals.items():
            setattr(pipeline, n, timer(n, fn))
        try:
            t0 = time.perf_counter()
            out = pipeline.prepare_inputs(self.adapter, self.config, dict(self.inputs))
            wall = time.perf_counter() - t0
        finally:
            for n, fn in originals.items():
                setattr(pipeline, n, fn)
            del self.adapter.encode
        if record:
            self.walls.append(wall)
            for n in _PARTS:
                self.parts[n].append(times.get(n, 0.0))
        return out

    def best_ms(self) -> tuple[float, dict]:
        """The fastest call and its breakdown (ms)."""
        i = min(range(len(self.walls)), key=self.walls.__getitem__)
        return self.walls[i] * 1e3, {n: v[i] * 1e3 for n, v in self.parts.items()}

    def median_ms(self) -> float:
        return statistics.median(self.walls) * 1e3


# --- main ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=8, help="video frames (LLaVA-OV samples 8-32)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds over all settings (after one cold run each)")
    p.add_argument("--round-seconds", type=float, default=3.0,
                   help="per round, a setting's prefill runs about this long (1-4 runs; short prefills are noisiest)")
    p.add_argument("--vision-repeats", type=int, default=1, help="warm vision-tower runs after the cold one")
    p.add_argument("--compress-repeats", type=int, default=3, help="timed compression steps per setting and round")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vocab", type=int, default=8192, help="LM vocabulary (real: 151936)")
    p.add_argument("--vision-layers", type=int, default=26)
    p.add_argument("--llm-layers", type=int, default=24)
    p.add_argument("--quick", action="store_true", help="2-layer towers, 1 repeat: plumbing check only")
    p.add_argument("--only", nargs="+", help="run only settings whose name contains one of these (plus the baseline)")
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.vision_layers, args.llm_layers, args.repeats, args.round_seconds = 2, 2, 2, 0.3
    load_start = load_average()

    import transformers

    import vlmcompress as vc
    from vlmcompress.adapters.registry import adapter_for

    t0 = time.perf_counter()
    model, processor = build(args)
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
    inputs = video_inputs(processor, args.frames, getattr(torch, args.dtype))
    text_cfg = model.config.get_text_config()
    log(f"model built in {time.perf_counter() - t0:.0f} s ({weights_mb:.0f} MB of weights); "
         f"prefill {inputs['input_ids'].shape[1]} tokens; load {load_start}")

    adapter = adapter_for(model)
    visions: dict[float, dict] = {}      # by vision_keep: encoded features, peak MB, run times

    def vision(config):
        """The encoder output for ``config``'s stage A (cached: it does not depend on stage B)."""
        key = config.vision_keep
        if key not in visions:
            def encode():
                with torch.inference_mode():
                    return {"video": adapter.encode("video", dict(inputs))}
            adapter.install(config)
            try:
                encoded, peak, cold = measure_memory(encode)
            finally:
                adapter.uninstall()
            visions[key] = dict(encoded=encoded, peak=peak, times=[cold], encode=encode, config=config)
            log(f"vision tower + projector (vision_keep={key}): {cold:.1f} s, +{peak:.0f} MB")
        return visions[key]

    # Pass 1, per setting: the encoder output, the compressed inputs, a cold prefill (memory, warm-up).
    rows, cases = [], []
    for s in settings(args):
        config = vc.CompressionConfig(**s.config)
        row = dict(setting=s.name, config=" ".join(f"{k}={v}" for k, v in s.config.items()) or "-", note=s.note)
        rows.append(row)
        try:
            vis = vision(config)
            step = CompressionStep(adapter, config, inputs, vis["encoded"])
            (new_kwargs, report), row["compression_peak_mb"], _ = measure_memory(lambda: step(record=False))
        except Exception as e:                          # e.g. stage A not wired for this family (yet)
            row["note"] = f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"{s.name}: {row['note']}")
            continue

        def prefill(kw=new_kwargs):
            with torch.inference_mode():
                return model(**kw, use_cache=True, logits_to_keep=1)

        out, row["llm_peak_mb"], cold = measure_memory(prefill)
        if not torch.isfinite(out.logits).all():
            raise RuntimeError(f"{s.name}: non-finite logits")
        del out
        row.update(visual_tokens=report.visual_before, visual_after=report.visual_after,
                   prefill_before=report.prefill_before[0], prefill_after=report.prefill_after[0],
                   vision_peak_mb=vis["peak"])
        # Short prefills run several times per round: noise (other processes) hurts them most.
        per_round = min(4, max(1, round(args.round_seconds / max(cold, 1e-3))))
        cases.append(dict(row=row, step=step, prefill=prefill, vision=vis, per_round=per_round, walls=[], cpus=[],
                          round_medians=[]))
        log(f"{s.name}: {row['prefill_after']} prefill tokens, cold prefill {cold:.1f} s")

    # Pass 2: timed rounds over all settings (alternating direction), so a change in the load of this
    # shared machine hits every setting alike instead of whichever setting happened to run then.
    for i in range(args.repeats):
        if i < args.vision_repeats:
            for vis in visions.values():
                adapter.install(vis["config"])          # a no-op without stage A
                try:
                    t0 = time.perf_counter()
                    vis["encode"]()
                    vis["times"].append(time.perf_counter() - t0)
                finally:
                    adapter.uninstall()
        for case in (cases if i % 2 == 0 else cases[::-1]):
            for _ in range(args.compress_repeats):
                case["step"]()
            for _ in range(case["per_round"]):
                w0, c0 = time.perf_counter(), time.process_time()
                case["prefill"]()
                case["walls"].append(time.perf_counter() - w0)
                case["cpus"].append(time.process_time() - c0)
            case["round_medians"].append(statistics.median(case["walls"][-case["per_round"]:]))
        log(f"round {i + 1}/{args.repeats} done, load {load_average()}")

    baseline = None
    for case in cases:
        row, walls, cpus = case["row"], case["walls"], case["cpus"]
        comp_ms, parts = case["step"].best_ms()
        wall, cpu = min(walls), min(cpus)
        vision_s = min(case["vision"]["times"])
        row.update(llm_prefill_s=wall, llm_prefill_median_s=statistics.median(walls), llm_prefill_cpu_s=cpu,
                   llm_runs=len(walls), vision_s=vision_s, vision_median_s=statistics.median(case["vision"]["times"]),
                   vision_runs=len(case["vision"]["times"]), compression_ms=comp_ms,
                   compression_median_ms=case["step"].median_ms(), operators_ms=parts["compress_item"],
                   position_map_ms=parts["_position_map"], new_positions_ms=parts["_new_positions"],
                   compression_pct=100 * comp_ms / 1e3 / wall, ttft_s=vision_s + comp_ms / 1e3 + wall)
        baseline = baseline or row
        row["speedup"] = baseline["llm_prefill_s"] / wall
        row["median_speedup"] = baseline["llm_prefill_median_s"] / row["llm_prefill_median_s"]
        # Spread: the speedup of each interleaved round (the baseline's median that round over this
        # setting's), min / median / max over the rounds.
        per_round = [b / c for b, c in zip(cases[0]["round_medians"], case["round_medians"])]
        row.update(speedup_round_min=min(per_round), speedup_round_median=statistics.median(per_round),
                   speedup_round_max=max(per_round))
        row["cpu_speedup"] = baseline["llm_prefill_cpu_s"] / cpu
        row["ttft_speedup"] = baseline["ttft_s"] / row["ttft_s"]
        row["ideal"] = (prefill_flops(baseline["prefill_after"], text_cfg, args.vocab)
                        / prefill_flops(row["prefill_after"], text_cfg, args.vocab))
        row["efficiency"] = row["speedup"] / row["ideal"]

    load_end = load_average()
    common = dict(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), machine=_machine(),
                  cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                  transformers=transformers.__version__, load_start=load_start, load_end=load_end,
                  dtype=args.dtype, frames=args.frames, vision_layers=args.vision_layers,
                  llm_layers=args.llm_layers, vocab=args.vocab, weights_mb=round(weights_mb))
    rows = [{**common, **r} for r in rows]
    print_table(rows, args)
    if not args.no_csv and not args.quick:
        written = append_csv(RESULTS, FIELDS, (csv_row(r, FIELDS) for r in rows))
        print(f"\nappended {written} rows to {RESULTS}")
    return 0


def print_table(rows, args) -> None:
    r0 = rows[0]
    print(f"\n{r0['machine']}, {r0['threads']} threads, torch {r0['torch']}, transformers {r0['transformers']}, "
          f"{args.dtype}; load {r0['load_start']} -> {r0['load_end']}")
    print(f"LLaVA-OV-0.5B dims, random weights ({r0['weights_mb']} MB, vocab {args.vocab}), {args.frames} frames, "
          f"SigLIP {args.vision_layers} layers, Qwen2 {args.llm_layers} layers. Times: best of "
          f"{r0.get('llm_runs', '?')}-{max(r.get('llm_runs', 0) for r in rows)} LLM runs, "
          f"{r0.get('vision_runs', '?')} vision runs; peak MB: added RSS\n")
    print("| setting | visual tokens | prefill tokens | LLM prefill s | speedup (best) | per round: median [min-max] | ideal "
          "| measured/ideal | compression ms | % of prefill | LLM peak MB | vision s | vision + LLM s | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "llm_prefill_s" not in r:
            print(f"| {r['setting']} | {r['note']} | | | | | | | | | | | | |")
            continue
        name = f"{r['setting']} ({r['note']})" if r.get("note") else r["setting"]
        print(f"| {name} | {r['visual_after']} / {r['visual_tokens']} | {r['prefill_after']} | "
              f"{r['llm_prefill_s']:.2f} | {r['speedup']:.2f}x | {r['speedup_round_median']:.2f}x "
              f"[{r['speedup_round_min']:.2f}-{r['speedup_round_max']:.2f}] | {r['ideal']:.2f}x | "
              f"{100 * r['efficiency']:.0f} % | {r['compression_ms']:.1f} | {r['compression_pct']:.2f} % | "
              f"{r['llm_peak_mb']:.0f} | {r['vision_s']:.1f} | {r['ttft_s']:.1f} | {r['ttft_speedup']:.2f}x |")
    print("\ncompression breakdown (ms): operators (compress_item) / position map / new positions / rest; peak MB")
    for r in rows:
        if "compression_ms" in r:
            rest = r["compression_ms"] - r["operators_ms"] - r["position_map_ms"] - r["new_positions_ms"]
            print(f"  {r['setting']:44s} {r['operators_ms']:7.1f} / {r['position_map_ms']:6.1f} / "
                  f"{r['new_positions_ms']:5.1f} / {rest:6.1f}   {r['compression_peak_mb']:.1f} MB")
    target = [r for r in rows if r.get("visual_after") and r["visual_after"] <= 0.1 * r["visual_tokens"] + 1
              and "llm_prefill_s" in r]
    for r in target:
        ok_speed = r["efficiency"] >= 0.8
        ok_comp = r["compression_pct"] <= 5
        print(f"target at <=10 % tokens [{r['setting']}]: measured/ideal {100 * r['efficiency']:.0f} % "
              f"(>= 80 %: {'met' if ok_speed else 'NOT met'}), compression {r['compression_pct']:.2f} % of the "
              f"compressed prefill (<= 5 %: {'met' if ok_comp else 'NOT met'})")


if __name__ == "__main__":
    raise SystemExit(main())
