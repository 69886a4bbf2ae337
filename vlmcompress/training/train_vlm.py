"""Train a tiny VLM from scratch on the synthetic benchmark's train split (CPU, fixed seeds).

    python -P -m vlmcompress.training.train_vlm --family llava_onevision --out runs/ov --steps 2200
    python -P -m vlmcompress.training.train_vlm --family qwen2_vl --out runs/qwen --steps 2200
    python -P -m vlmcompress.training.train_vlm --export runs/ov --name synth-onevision   # into the package

No compression is in the loop (users' models never saw any), with one exception, as the V2PE paper
trains it: with ``--v2pe-mix`` each sample's visual tokens advance the position by a δ drawn from
{1, 1/2, 1/4, 1/8, 1/16}, so the model has seen fractional positions before it is asked to use them.

One step = one batch of scenes sharing a frame count. An "object" scene is asked all four of its
questions (colour, shape, direction, digit) as a multi-turn chat in random order, so one pass of the
vision tower supervises four answers; any scene may add "Describe the video." → its caption. The loss
is cross-entropy on the assistant turns only (answer + end of turn), plus, with ``--aux-weight`` > 0, an
auxiliary per-patch loss that trains the vision tower directly (deep supervision, :mod:`.aux_labels`):
a linear head on the projected patch features predicts what is drawn in each patch (shape, colour,
digit or nothing). The head is thrown away; the shipped model is the plain HF model. Without it the
answer loss alone taught the tower colour in 200 steps but not shapes or digits in 1,400 (a linear
probe on its features found shape 49 %, digit 21 %). The head also predicts each patch's row and column
(``--position-weight``), and with ``--scene-weight`` > 0 a second head on the LLM's middle layer predicts
direction, count and shape at the visual tokens (:mod:`.aux_scene`). ``--init RUN`` fine-tunes from a
finished run's weights with a new optimiser and schedule. Checkpoints (model, processor,
optimiser, step, RNG) are written every ``--ckpt-every`` steps and ``--resume`` continues from the last.
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

import torch

from ..synthetic import TASKS, make_sample, make_scene, scene_seed
from .build import DESCRIBE, FAMILIES, seeing_model, seeing_processor

__all__ = ["train", "export", "main", "answer_accuracy", "v2pe_positions"]

V2PE_DELTAS = (1.0, 0.5, 0.25, 0.125, 0.0625)
# Two kinds of batch. Spatial scenes (an object scene carries four questions; counting) need few frames,
# so their batches are short and cheap and most steps go to the slow-to-learn tasks (shape, direction,
# digit, count); temporal scenes (needle, order) need long videos.
_GROUPS = {
    "spatial": dict(p=0.7, kinds={"object": 0.65, "count": 0.35}),   # frames: --spatial-frames
    "temporal": dict(p=0.3, kinds={"needle": 0.5, "order": 0.5}),    # frames: 8 .. --max-frames
}


def _frames_choices(group: str, max_frames: int, spatial=(4, 6, 8)) -> list[int]:
    """Even frame counts (Qwen pairs frames in its temporal patch; the same for OneVision)."""
    if group == "spatial":
        return [f for f in spatial if f <= max_frames]
    return list(range(8, max_frames + 1, 2))


def _conversation(scene, rng: random.Random, describe_p: float) -> list[dict]:
    qa = [(q, a) for _, q, a in scene.qa()]
    rng.shuffle(qa)
    if rng.random() < describe_p:
        qa.append((DESCRIBE, scene.caption))
    chat = []
    for k, (q, a) in enumerate(qa):
        content = [{"type": "text", "text": q}]
        if k == 0:
            content.insert(0, {"type": "video", "video": scene.frames})
        chat += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    return chat


def _metadata(frames: int, fps: float, batch: int) -> list[dict]:
    return [dict(total_num_frames=frames, fps=fps, duration=frames / fps, frames_indices=list(range(frames)))
            for _ in range(batch)]


def _labels(input_ids: torch.Tensor, header: list[int], end_id: int) -> torch.Tensor:
    """-100 everywhere but the assistant turns' tokens (answer and ``<|im_end|>``)."""
    labels = torch.full_like(input_ids, -100)
    h = len(header)
    for b, row in enumerate(input_ids.tolist()):
        i = 0
        while i <= len(row) - h:
            if row[i:i + h] == header:
                j = i + h
                while j < len(row) and row[j] != end_id:
                    j += 1
                labels[b, i + h:j + 1] = input_ids[b, i + h:j + 1]
                i = j
            i += 1
    return labels


def v2pe_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, visual_token_id: int,
                   deltas: list[float]) -> torch.Tensor:
    """``[B, L]`` float32 positions with row b's visual tokens advancing by ``deltas[b]`` (V2PE)."""
    from ..positions import v2pe_position_ids

    visual = input_ids == visual_token_id
    rows = [v2pe_position_ids(visual[b:b + 1], d, attention_mask=attention_mask[b:b + 1], dtype=torch.float32)
            for b, d in enumerate(deltas)]
    return torch.cat(rows, 0)


def _batch(processor, group: str, rng: random.Random, step_seed: int, batch: int, frames: int, describe_p: float,
           count_share: float | None = None):
    weights = _GROUPS[group]["kinds"]
    if group == "spatial" and count_share is not None:
        weights = {"object": 1.0 - count_share, "count": count_share}
    kinds = list(weights)
    chats, scenes = [], []
    for i in range(batch):
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        scene = make_scene(kind, scene_seed("train", kind, step_seed * batch + i), frames=frames)
        scenes.append(scene)
        chats.append(_conversation(scene, rng, describe_p))
    processor.tokenizer.padding_side = "right"
    inputs = processor.apply_chat_template(
        chats, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, "video_metadata": _metadata(frames, 4.0, batch)})
    return inputs, scenes


def _visual_token_id(model) -> int:
    return int(model.config.video_token_id if hasattr(model.config, "video_token_id") and
               model.config.video_token_id is not None else model.config.video_token_index)


@torch.no_grad()
def answer_accuracy(model, processor, *, per_task: int = 16, frames: int = 16, tasks=TASKS, delta: float = 1.0,
                    start: int = 0, batch: int = 16) -> dict[str, float]:
    """Held-out accuracy per task from the first answer token (argmax), unpatched, V2PE δ optional.

    A quick monitor for training: the answers are single tokens, so this equals exact-match accuracy
    of greedy decoding's first token (the evaluation command decodes fully).
    """
    model.eval()
    tok = processor.tokenizer
    tok.padding_side = "left"
    out: dict[str, float] = {}
    for task in tasks:
        samples = [make_sample(task, start + i, frames=frames) for i in range(per_task)]
        hits = 0
        for k in range(0, len(samples), batch):
            chunk = samples[k:k + batch]
            chats = [[{"role": "user", "content": [{"type": "video", "video": s.frames},
                                                   {"type": "text", "text": s.question}]}] for s in chunk]
            inputs = processor.apply_chat_template(
                chats, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                processor_kwargs={"padding": True, "video_metadata": _metadata(frames, 4.0, len(chunk))})
            kwargs = dict(inputs)
            if delta != 1.0:
                kwargs["position_ids"] = v2pe_positions(inputs["input_ids"], inputs["attention_mask"],
                                                        _visual_token_id(model), [delta] * len(chunk))
            logits = model(**kwargs).logits[:, -1]
            pred = logits.argmax(-1).tolist()
            for s, p in zip(chunk, pred):
                hits += int(tok.decode([p]).strip() == s.answer)
        out[task] = hits / len(samples)
    return out


def _save(folder: Path, model, processor, opt, sched, step: int, log: list, aux=None, scene=None) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    extra = dict(aux.state_dict()) if aux is not None else {}
    if scene is not None:
        extra.update(scene.state_dict())
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                "torch_rng": torch.get_rng_state(), **extra}, tmp / "train_state.pt")
    (tmp / "train_log.json").write_text(json.dumps(log))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def train(args) -> Path:
    """Run (or resume) training as `args` say; returns the checkpoint folder."""
    from transformers import AutoModelForImageTextToText

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = out / "checkpoint"
    out.mkdir(parents=True, exist_ok=True)
    processor = seeing_processor(args.family)
    start, log, init_state = 0, [], {}
    if args.resume and (ckpt / "train_state.pt").is_file():
        model = AutoModelForImageTextToText.from_pretrained(ckpt, local_files_only=True)
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        start, log = state["step"], json.loads((ckpt / "train_log.json").read_text())
    elif args.init:  # weights (and auxiliary heads) only: a fresh optimiser and schedule
        model = AutoModelForImageTextToText.from_pretrained(_checkpoint(args.init), local_files_only=True)
        init_state = _init_state(_checkpoint(args.init))
        state = None
    else:
        model = seeing_model(args.family, seed=args.seed)
        state = None
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5 %
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    from .aux_labels import AuxHead

    aux = AuxHead(model, position_weight=args.position_weight) if args.aux_weight > 0 else None
    if aux is not None:
        aux.load_state_dict(state or init_state)
        opt.add_param_group({"params": aux.parameters(), "weight_decay": 0.0})
    from .aux_scene import SceneHead

    scene = SceneHead(model, _visual_token_id(model), shape_weight=args.shape_weight) if args.scene_weight > 0 else None
    if scene is not None:
        scene.load_state_dict(state or init_state)
        opt.add_param_group({"params": scene.parameters(), "weight_decay": 0.0})
    heads = [h for h in (aux, scene) if h is not None]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if state is not None:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["torch_rng"])
    tok = processor.tokenizer
    header = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    visual_id = _visual_token_id(model)
    t0 = time.time() - (log[-1]["elapsed_s"] if log else 0.0)
    for step in range(start, args.steps):
        rng = random.Random(args.seed * 1_000_003 + step)  # per-step RNG: resuming reproduces the data
        group = "spatial" if rng.random() < _GROUPS["spatial"]["p"] else "temporal"
        frames = rng.choice(_frames_choices(group, args.max_frames, args.spatial_frames))
        inputs, scenes = _batch(processor, group, rng, step, args.batch, frames, args.describe_p, args.count_share)
        labels = _labels(inputs["input_ids"], header, end_id)
        kwargs = dict(inputs)
        if args.v2pe_mix:
            deltas = [rng.choice(V2PE_DELTAS) for _ in range(args.batch)]
            kwargs["position_ids"] = v2pe_positions(inputs["input_ids"], inputs["attention_mask"], visual_id, deltas)
        for head in heads:
            head.start()
        logits = model(**kwargs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        aux_loss = aux.loss(scenes) if aux is not None else None
        if aux_loss is not None:
            loss = loss + args.aux_weight * aux_loss
        scene_loss = scene.loss(scenes, inputs["input_ids"]) if scene is not None else None
        if scene_loss is not None:
            loss = loss + args.scene_weight * scene_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        entry = {"step": step + 1, "loss": round(loss.item(), 4), "group": group, "frames": frames,
                 "lr": round(sched.get_last_lr()[0], 7), "elapsed_s": round(time.time() - t0, 1)}
        if aux_loss is not None:
            entry["aux"] = round(aux_loss.item(), 4)
        if scene_loss is not None:
            entry["scene"] = round(scene_loss.item(), 4)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            entry["acc"] = answer_accuracy(model, processor, per_task=args.eval_per_task, frames=16)
            model.train()
        log.append(entry)
        if (step + 1) % 10 == 0 or "acc" in entry:
            print(json.dumps(entry), flush=True)
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            _save(ckpt, model, processor, opt, sched, step + 1, log, aux, scene)
    return ckpt


def _checkpoint(run: str | Path) -> Path:
    """`run`'s checkpoint folder (`run` may be the run folder or the checkpoint itself)."""
    run = Path(run)
    return run / "checkpoint" if (run / "checkpoint").is_dir() else run


HEADS_FILE = "training_heads.safetensors"


def _init_state(folder: Path) -> dict:
    """The auxiliary heads to start from: a run's ``train_state.pt`` or an exported model's heads file."""
    if (folder / "train_state.pt").is_file():
        return torch.load(folder / "train_state.pt", weights_only=False)
    from safetensors.torch import load_file

    flat = load_file(folder / HEADS_FILE)
    state: dict = {}
    for key, value in flat.items():
        head, name = key.split("/", 1)
        state.setdefault(head, {})[name] = value
    return state


def _can_init_from(folder: Path) -> bool:
    return (folder / "train_state.pt").is_file() or (folder / HEADS_FILE).is_file()


def _run_summary(run: str | Path) -> dict:
    """Command, steps and wall time of a finished run, and of the run it started from (``--init``)."""
    ckpt = _checkpoint(run)
    if not (ckpt / "train_log.json").is_file() and (ckpt / "training.json").is_file():   # an exported model
        info = json.loads((ckpt / "training.json").read_text())
        out = {"command": info.get("command"), "steps": info["steps"], "wall_minutes": info["wall_minutes"]}
        if info.get("init_from"):
            out["init_from"] = info["init_from"]
        return out
    log = json.loads((ckpt / "train_log.json").read_text())
    cmd = ckpt.parent / "command.txt"
    info = {"command": cmd.read_text().strip() if cmd.is_file() else None, "steps": log[-1]["step"],
            "wall_minutes": round(log[-1]["elapsed_s"] / 60, 1)}
    parent = ckpt.parent / "init_from.json"
    if parent.is_file():
        info["init_from"] = json.loads(parent.read_text())
    return info


def export(checkpoint: str | Path, name: str, command: str | None = None, *, root: Path | None = None) -> Path:
    """Copy a finished checkpoint's model + processor (no optimiser) into ``vlmcompress/models/<name>``,
    with ``training.json`` (the command, steps, wall time and the last held-out accuracies) and the
    auxiliary heads (``training_heads.safetensors``, so ``--init <that folder>`` can continue training)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    checkpoint = _checkpoint(checkpoint)
    dest = (root or Path(__file__).resolve().parents[1] / "models") / name
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, local_files_only=True)
    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    if dest.exists():
        shutil.rmtree(dest)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    state = torch.load(checkpoint / "train_state.pt", weights_only=False)
    from .aux_labels import AuxHead
    from .aux_scene import SceneHead

    heads = {f"{h}/{k}": v.contiguous() for h in AuxHead.names + SceneHead.names if h in state
             for k, v in state[h].items()}
    if heads:  # small; lets a later run continue from the shipped model (--init <model folder>)
        from safetensors.torch import save_file

        save_file(heads, dest / HEADS_FILE)
    log = json.loads((checkpoint / "train_log.json").read_text())
    evals = [e for e in log if "acc" in e]
    summary = _run_summary(checkpoint)
    total, run = 0.0, summary
    while run:
        total, run = total + run["wall_minutes"], run.get("init_from")
    info = {"name": name, "steps": log[-1]["step"], "wall_minutes": round(log[-1]["elapsed_s"] / 60, 1),
            "total_wall_minutes_with_init_runs": round(total, 1), "init_from": summary.get("init_from"),
            "final_loss": log[-1]["loss"], "heldout_first_token_accuracy_16_frames": evals[-1]["acc"] if evals else None,
            "command": command, "machine": "2-core AMD EPYC CPU, torch threads as in the command"}
    (dest / "training.json").write_text(json.dumps(info, indent=2))
    return dest


def _share(text: str) -> float:
    """A fraction in [0, 1] for argparse (a clear error otherwise)."""
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return v


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m vlmcompress.training.train_vlm")
    p.add_argument("--family", choices=FAMILIES)
    p.add_argument("--out", help="run folder (checkpoint/ inside)")
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--max-frames", type=int, default=16, help="longest temporal-scene video (8 .. this)")
    p.add_argument("--spatial-frames", type=int, nargs="+", default=[4, 6, 8],
                   help="frame counts of the spatial scenes' batches")
    p.add_argument("--describe-p", type=float, default=0.3, help="probability of a caption turn per sample")
    p.add_argument("--v2pe-mix", action="store_true", help="draw V2PE δ per sample (LLaVA-OneVision)")
    p.add_argument("--aux-weight", type=float, default=1.0, help="weight of the per-patch auxiliary loss (0 = off)")
    p.add_argument("--position-weight", type=float, default=1.0,
                   help="weight of the per-patch row/column target inside the auxiliary loss (0 = off)")
    p.add_argument("--scene-weight", type=float, default=1.0,
                   help="weight of the LLM-level direction/count auxiliary loss (0 = off; see aux_scene)")
    p.add_argument("--shape-weight", type=float, default=1.0,
                   help="weight of the object's shape at its visual tokens inside the scene loss (0 = off)")
    p.add_argument("--count-share", type=_share, default=_GROUPS["spatial"]["kinds"]["count"],
                   help="fraction of the spatial scenes that are counting scenes (the rest: object scenes)")
    p.add_argument("--init", metavar="RUN", help="start from RUN's weights (a new schedule and optimiser: fine-tuning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--eval-per-task", type=int, default=16)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", metavar="RUN", help="export RUN's checkpoint into the package (needs --name)")
    p.add_argument("--name", help="shipped model name for --export")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.export:
        if not args.name:
            _parser().error("--export needs --name")
        command = None
        cmd_file = Path(args.export) / "command.txt"
        if cmd_file.is_file():
            command = cmd_file.read_text().strip()
        print(export(args.export, args.name, command))
        return 0
    if not args.family or not args.out:
        _parser().error("--family and --out are required to train")
    if args.init and not _can_init_from(_checkpoint(args.init)):
        _parser().error(f"--init {args.init}: no finished run there (expected train_state.pt of a train_vlm run, "
                        f"or {HEADS_FILE} of an exported model)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "command.txt").write_text("python -P -m vlmcompress.training.train_vlm " + " ".join(
        sys.argv[1:] if argv is None else argv))
    if args.init and not (Path(args.out) / "init_from.json").exists():
        (Path(args.out) / "init_from.json").write_text(json.dumps(_run_summary(args.init), indent=2))
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
