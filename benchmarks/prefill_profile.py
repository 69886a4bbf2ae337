"""Where an LLM prefill's time goes, at the full and at the compressed length (issue 10).

    python -P benchmarks/prefill_profile.py                  # Qwen2-0.5B dims, 24 layers, 1616 vs 192 tokens
    python -P benchmarks/prefill_profile.py --tokens 1616 145 --layers 4

One warm prefill per length under ``torch.profiler`` (random weights, fp32, SDPA, logits of the last token
only), its self CPU time split into GEMM (``mm``/``addmm``/``bmm``/``linear``), attention (the SDPA
kernel) and the rest. The FLOP-ideal speedup assumes every FLOP costs the same at any length; this shows
which part does not shrink with the token count.
"""
from __future__ import annotations

import argparse
import collections

import torch


def profile_prefill(model, tokens: int) -> dict[str, float]:
    """Self CPU milliseconds per group of one prefill of ``tokens`` random embeddings."""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, tokens, model.config.hidden_size)
    with torch.inference_mode():
        model(inputs_embeds=x, logits_to_keep=1)                     # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(inputs_embeds=x, logits_to_keep=1)
    groups: dict[str, float] = collections.Counter()
    for e in prof.key_averages():
        if any(s in e.key for s in ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear")):
            group = "gemm"
        elif "attention" in e.key:
            group = "attention"
        else:
            group = "other"
        groups[group] += e.self_cpu_time_total / 1e3
    return dict(groups)


def main(argv=None) -> int:
    import sys
    from pathlib import Path

    import transformers as tf

    sys.path.insert(0, str(Path(__file__).resolve().parent))   # -P leaves the script's folder off the path
    from e2e import QWEN2_05B                                   # the real dims, defined once

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", type=int, default=[1616, 192], help="prefill lengths (first = reference)")
    p.add_argument("--layers", type=int, default=24)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = tf.Qwen2Config(**dict(QWEN2_05B, vocab_size=8192, num_hidden_layers=args.layers))
    model = tf.Qwen2ForCausalLM(config).eval()
    rows = [(n, profile_prefill(model, n)) for n in args.tokens]
    ref_n, ref = rows[0]
    print(f"Qwen2-0.5B dims, {args.layers} layers, fp32, {torch.get_num_threads()} threads\n")
    print("| tokens | total ms | GEMM ms (share) | attention ms (share) | other ms (share) | GEMM shrink | tokens shrink |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, g in rows:
        total = sum(g.values())
        cells = " | ".join(f"{g.get(k, 0):.0f} ({g.get(k, 0) / total:.0%})" for k in ("gemm", "attention", "other"))
        print(f"| {n} | {total:.0f} | {cells} | {ref['gemm'] / g['gemm']:.2f}x | {ref_n / n:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
