"""Train the tiny open_clip model that scores relevance for prompt-guided pooling (``synth-clip``).

    python -P -m vlmcompress.training.clip --out runs/clip --steps 1200
    python -P -m vlmcompress.training.clip --export runs/clip          # into vlmcompress/models/synth-clip

Frames of the synthetic benchmark's train split are paired with their captions (CLIP's symmetric
contrastive loss on the average-pooled image embedding) and, because pooling reads relevance per
*patch*, with a grounding term: each question of the benchmark and each element phrase ("the digit 7")
must put its softmax over the frame's patches on the element it is about (the known box of the object,
digit or marker). Relevance at inference is exactly that softmax (``ClipRelevanceScorer.score``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..synthetic import QUESTIONS, make_scene, scene_seed

__all__ = ["CLIP_CONFIG", "build_clip", "train_clip", "load_scorer", "main"]

FRAME = 64
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": FRAME, "patch_size": 8, "width": 96, "layers": 3, "head_width": 24, "pool_type": "avg"},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
_KINDS = ("object", "count", "needle", "order")


def build_clip(seed: int = 0):
    """A fresh open_clip ``CLIP`` of :data:`CLIP_CONFIG` with its preprocess config set."""
    import copy

    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(CLIP_CONFIG))
    open_clip.model.set_model_preprocess_cfg(model, {
        "size": (FRAME, FRAME), "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    return model


def _box_map(boxes, grid: int = FRAME // 8) -> np.ndarray:
    """``[grid*grid]`` distribution over patches, proportional to each patch's pixels inside `boxes`."""
    cover = np.zeros((FRAME, FRAME), dtype=np.float64)
    for y, x, h, w in boxes:
        cover[y:y + h, x:x + w] = 1.0
    cells = cover.reshape(grid, FRAME // grid, grid, FRAME // grid).mean(axis=(1, 3)).reshape(-1)
    return cells / cells.sum()


def _frame_example(rng: random.Random, index: int):
    """One frame: ``(uint8 [H, W, 3], caption, [(text, target map)])``."""
    kind = rng.choice(_KINDS)
    scene = make_scene(kind, scene_seed("train", kind, index), frames=8)
    f = scene.facts
    if kind == "object":
        t = rng.randrange(8)
        obj = [f["object_boxes"][t]]
        grounded = [(QUESTIONS[q], _box_map(obj)) for q in ("colour", "shape", "direction")]
        grounded += [(QUESTIONS["digit"], _box_map([f["digit_box"]])), (f"the digit {f['digit']}", _box_map([f["digit_box"]])),
                     (f"a {f['colour']} {f['shape']}", _box_map(obj))]
        caption = scene.caption
    elif kind == "count":
        t = rng.randrange(8)
        grounded = [(QUESTIONS["count"], _box_map(f["object_boxes"]))]
        caption = scene.caption
    elif kind == "needle":
        t = f["needle_frame"]
        grounded = [(QUESTIONS["needle"], _box_map([f["marker_box"]])), (f"a {f['needle']} flash", _box_map([f["marker_box"]]))]
        caption = scene.caption
    else:
        # The order scene's markers: find the box by colour (both frames hold one marker each).
        which = rng.randrange(2)
        t = f["order_frames"][which]
        colour = f["order_colours"][which]
        frame = scene.frames[t].astype(np.int32)
        from ..synthetic import COLOURS

        hit = (np.abs(frame - np.array(COLOURS[colour])).sum(-1) < 60)
        ys, xs = np.nonzero(hit)
        box = (ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        grounded = [(QUESTIONS["order"], _box_map([box])), (f"a {colour} flash", _box_map([box]))]
        caption = f"a {colour} flash"
    return scene.frames[t], caption, grounded


def _encode_patches(model, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, P, D]`` per-patch embeddings in CLIP space, as ``ClipRelevanceScorer.encode_frames`` computes them."""
    visual = model.visual
    visual.output_tokens = True
    pooled, tokens = visual(pixels)
    visual.output_tokens = False
    if visual.final_ln_after_pool:
        tokens = visual.ln_post(tokens)
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    return pooled, tokens


def train_clip(out: str | Path, *, steps: int = 1200, batch: int = 64, lr: float = 1e-3, seed: int = 0,
               threads: int = 1, log_every: int = 50) -> Path:
    """Train and save to ``out/checkpoint`` (open_clip local-dir layout); returns that folder."""
    import open_clip

    from ..relevance import save_local_clip, simple_tokenizer

    torch.set_num_threads(threads)
    model = build_clip(seed).train()
    tokenizer = simple_tokenizer(77)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warm = max(1, steps // 12)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    log, t0 = [], time.time()
    for step in range(steps):
        rng = random.Random(seed * 1_000_003 + step)
        examples = [_frame_example(rng, step * batch + i) for i in range(batch)]
        pixels = torch.from_numpy(np.stack([e[0] for e in examples])).permute(0, 3, 1, 2).float() / 255.0
        pixels = (pixels - mean) / std
        pooled, patches = _encode_patches(model, pixels)
        captions = model.encode_text(tokenizer([e[1] for e in examples]))
        img = F.normalize(pooled, dim=-1)
        txt = F.normalize(captions, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0)
        logits = scale * img @ txt.T
        # Frames of one batch can share a caption: every frame with the same caption is a positive.
        same = torch.tensor([[a[1] == b[1] for b in examples] for a in examples], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        contrastive = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
        # Grounding: one text per frame, drawn from its grounded list.
        picks = [rng.choice(e[2]) for e in examples]
        q = F.normalize(model.encode_text(tokenizer([p[0] for p in picks])), dim=-1)
        rel = scale * torch.einsum("bd,bpd->bp", q, F.normalize(patches, dim=-1))
        goal = torch.from_numpy(np.stack([p[1] for p in picks])).float()
        grounding = -(goal * rel.log_softmax(-1)).sum(-1).mean()
        loss = contrastive + grounding
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "contrastive": round(contrastive.item(), 4),
                 "grounding": round(grounding.item(), 4), "elapsed_s": round(time.time() - t0, 1)}
        log.append(entry)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(json.dumps(entry), flush=True)
    ckpt = Path(out) / "checkpoint"
    if ckpt.exists():
        shutil.rmtree(ckpt)
    save_local_clip(model.eval(), ckpt, CLIP_CONFIG)
    (ckpt / "train_log.json").write_text(json.dumps(log))
    return ckpt


def load_scorer(folder: str | Path, **kwargs):
    """A :class:`vlmcompress.ClipRelevanceScorer` on the CLIP saved in `folder` (offline)."""
    from ..relevance import ClipRelevanceScorer

    return ClipRelevanceScorer.from_pretrained(str(folder), **kwargs)


def export(run: str | Path, command: str | None = None, *, root: Path | None = None) -> Path:
    """Copy ``run/checkpoint`` into ``vlmcompress/models/synth-clip`` with ``training.json``."""
    src = Path(run) / "checkpoint"
    dest = (root or Path(__file__).resolve().parents[1] / "models") / "synth-clip"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("open_clip_config.json", "open_clip_pytorch_model.bin"):
        shutil.copy2(src / name, dest / name)
    log = json.loads((src / "train_log.json").read_text())
    (dest / "training.json").write_text(json.dumps({"steps": log[-1]["step"], "wall_minutes": round(log[-1]["elapsed_s"] / 60, 1),
                                                    "final": log[-1], "command": command}, indent=2))
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlmcompress.training.clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="run folder")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export", metavar="RUN", help="copy RUN's checkpoint into the package as synth-clip")
    args = p.parse_args(argv)
    if args.export:
        cmd = Path(args.export) / "command.txt"
        print(export(args.export, cmd.read_text().strip() if cmd.is_file() else None))
        return 0
    if not args.out:
        p.error("--out is required to train")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "command.txt").write_text("python -P -m vlmcompress.training.clip " + " ".join(sys.argv[1:] if argv is None else argv))
    train_clip(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, threads=args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
