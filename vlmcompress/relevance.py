"""How relevant each visual token is to the user's question, scored with a CLIP (DESIGN.md §3.2).

The score of a token is the cosine between the CLIP text embedding of the *question alone* (no chat
template: the template's words would pull every map towards the same tokens) and the token's
CLIP-space embedding, scaled by CLIP's logit scale (×100) and soft-maxed over all tokens of the sample.
:func:`vlmcompress.pool.prompt_guided_pool` turns the map into pooling weights.

The scorer's patch grid rarely equals the VLM's token grid (another resolution, a Qwen-VL tower);
:func:`resize_relevance` maps one onto the other, so any CLIP can guide any VLM.

``open_clip`` is imported only where a model is built or loaded, so the core imports fast.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ._checks import check_tensor
from .long_clip import apply_long_context
from .pool import _check_grid

__all__ = [
    "relevance_from_embeddings",
    "resize_relevance",
    "ClipRelevanceScorer",
    "TINY_CLIP_NAME",
    "TINY_CLIP_CONFIG",
    "tiny_clip_model",
    "tiny_clip_scorer",
    "save_local_clip",
    "simple_tokenizer",
]

#: Architecture of the tiny random CLIP used by tests and the demo's tiny-random mode (~1.6 M
#: parameters, 1.58 M of them the 49,408-token embedding table so the real BPE tokenizer works).
TINY_CLIP_NAME = "vlmcompress-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # optional dependency
        raise ImportError("CLIP relevance scoring needs open_clip: pip install open-clip-torch") from e
    return open_clip


def relevance_from_embeddings(
    text_emb: torch.Tensor,
    visual_emb: torch.Tensor,
    *,
    logit_scale: float = 100.0,
    logit_bias: float | None = None,
) -> torch.Tensor:
    """Relevance of every visual token to the text: one softmax over all tokens of each sample.

    Args:
        text_emb: ``[B, D]`` text embeddings (CLIP space; normalised here).
        visual_emb: ``[B, N, D]`` token embeddings in the same space (normalised here).
        logit_scale: multiplier of the cosine (CLIP: 100; SigLIP: its own learned scale).
        logit_bias: added to the logits (SigLIP). A constant shift cancels in the softmax; accepted so
            callers can pass a model's parameters as they are.

    Returns:
        ``[B, N]`` float32 (float64 for float64 inputs), ``softmax(logit_scale · cos + logit_bias)`` over
        ``N``; each row sums to 1.
    """
    check_tensor("text_emb", text_emb, ndim=2, floating=True, finite=True)
    check_tensor("visual_emb", visual_emb, ndim=3, floating=True, finite=True)
    b, d = text_emb.shape
    if visual_emb.shape[0] != b or visual_emb.shape[2] != d:
        raise ValueError(f"visual_emb must have shape [B={b}, N, D={d}] to match text_emb, got {tuple(visual_emb.shape)}")
    for name, v in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if v is None and name == "logit_bias":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    acc = torch.float64 if torch.float64 in (text_emb.dtype, visual_emb.dtype) else torch.float32
    t = F.normalize(text_emb.to(acc), dim=-1)
    v = F.normalize(visual_emb.to(acc), dim=-1)
    logits = torch.einsum("bd,bnd->bn", t, v) * logit_scale
    if logit_bias is not None:
        logits = logits + logit_bias
    return torch.softmax(logits, dim=-1)


def resize_relevance(rel: torch.Tensor, from_grid, to_grid) -> torch.Tensor:
    """Resample a relevance map from one ``(T, H, W)`` grid to another and renormalise it.

    Axes that shrink are area-averaged (``adaptive_avg_pool3d``) and axes that grow are interpolated
    trilinearly (``align_corners=False``). Area averaging when shrinking is deliberate: trilinear
    sampling at an 8× reduction reads only about 1/8 of the entries, so a small relevant object between
    samples would vanish from the map; averaging keeps its mass.

    Args:
        rel: ``[B, T*H*W]`` non-negative map in raster ``(t, h, w)`` order (e.g. a softmax).
        from_grid: ``(T, H, W)`` of ``rel``.
        to_grid: ``(T', H', W')`` wanted.

    Returns:
        ``[B, T'*H'*W']`` float32 (float64 for float64 input), each row summing to 1.
    """
    from_grid = _check_grid("from_grid", from_grid)
    to_grid = _check_grid("to_grid", to_grid)
    check_tensor("rel", rel, ndim=2, floating=True, finite=True)
    b, n = rel.shape
    if n != math.prod(from_grid):
        raise ValueError(f"rel has {n} entries per sample but from_grid {from_grid} holds {math.prod(from_grid)}")
    if (rel < 0).any():
        raise ValueError("rel must be non-negative (a relevance map such as a softmax)")
    acc = torch.float64 if rel.dtype == torch.float64 else torch.float32
    v = rel.to(acc).reshape(b, 1, *from_grid)
    mid = tuple(min(f, t) for f, t in zip(from_grid, to_grid))
    if mid != from_grid:
        v = F.adaptive_avg_pool3d(v, mid)
    if mid != to_grid:
        v = F.interpolate(v, size=to_grid, mode="trilinear", align_corners=False)
    v = v.reshape(b, -1)
    total = v.sum(-1, keepdim=True)
    if (total <= 0).any():
        raise ValueError("rel must have a positive sum in every sample")
    return v / total


class ClipRelevanceScorer:
    """Scores visual tokens against a question with an ``open_clip`` CLIP (ViT image tower).

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` whose ``visual`` is an open_clip
            ``VisionTransformer`` without attentional pooling (per-patch embeddings come from it).
            Put in eval mode.
        tokenizer: its open_clip tokenizer.
        device: where to run; default the model's device.
        long_context: stretch the text context 77 → 248 (Long-CLIP, :func:`apply_long_context`;
            modifies ``model`` in place and sets ``tokenizer.context_length``).
        logit_scale: cosine multiplier; default the model's own ``exp(logit_scale)`` capped at 100
            (CLIP's training clamp), i.e. 100 for trained CLIPs.
        logit_bias: default the model's ``logit_bias`` (SigLIP) or none.
        frame_batch: frames per forward pass of the image tower (bounds memory on long videos).
    """

    def __init__(self, model, tokenizer, *, device=None, long_context: bool = True,
                 logit_scale: float | None = None, logit_bias: float | None = None, frame_batch: int = 32):
        open_clip = _open_clip()
        from open_clip.transformer import VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"ClipRelevanceScorer needs an open_clip model whose visual tower is an open_clip VisionTransformer "
                f"(per-patch embeddings), got {type(visual).__name__}"
            )
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise TypeError("ClipRelevanceScorer needs a VisionTransformer with 'tok' or 'avg' pooling (no attentional pooler): its patch tokens are not per-patch otherwise")
        if isinstance(frame_batch, bool) or not isinstance(frame_batch, int) or frame_batch < 1:
            raise ValueError(f"frame_batch must be an int >= 1, got {frame_batch!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if long_context:
            apply_long_context(self.model)
        self.context_length = int(self.model.context_length)
        if hasattr(tokenizer, "context_length"):
            tokenizer.context_length = self.context_length
        if logit_scale is None:
            logit_scale = min(float(self.model.logit_scale.detach().exp().max()), 100.0)
        if logit_bias is None and getattr(self.model, "logit_bias", None) is not None:
            logit_bias = float(self.model.logit_bias.detach().flatten()[0])
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self.frame_batch = frame_batch
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        self.image_size = tuple(visual.image_size)
        self.grid_size = tuple(visual.grid_size)
        self.mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, pretrained: str | None = None, device="cpu",
                        long_context: bool = True, precision: str = "fp32", **kwargs) -> "ClipRelevanceScorer":
        """Load an open_clip model and its tokenizer.

        ``name_or_path`` may be:

        - a local directory in open_clip's layout (``open_clip_config.json`` with ``model_cfg``, plus a
          weights file, see :func:`save_local_clip`): loaded offline through ``create_model('local-dir:...')``;
        - :data:`TINY_CLIP_NAME` with ``pretrained`` a local weights file: the tiny test architecture;
        - an open_clip architecture name (``"ViT-B-16"``) with ``pretrained`` a tag
          (``"laion2b_s34b_b88k"``, downloaded through open_clip) or a local weights file (offline);
        - ``"hf-hub:org/repo"`` (downloaded through open_clip).

        Extra keyword arguments go to the constructor (``logit_scale``, ``frame_batch``, ...).
        """
        open_clip = _open_clip()
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
        name = os.fspath(name_or_path)
        if name == TINY_CLIP_NAME:
            model = tiny_clip_model()
            if pretrained is not None:
                if not os.path.isfile(pretrained):
                    raise FileNotFoundError(f"pretrained for {TINY_CLIP_NAME} must be a local weights file, got {pretrained!r}")
                open_clip.load_checkpoint(model, pretrained)
            model = model.to(device)
            tokenizer = simple_tokenizer(model.context_length)
        elif os.path.isdir(name):
            spec = "local-dir:" + name
            model = open_clip.create_model(spec, device=device, precision=precision)
            tokenizer = open_clip.get_tokenizer(spec)
        elif os.path.isfile(name):
            raise ValueError(
                f"{name!r} is a weights file without an architecture: pass the architecture name with "
                f"pretrained={name!r} (e.g. from_pretrained('ViT-B-16', pretrained=...)), or a directory holding "
                "open_clip_config.json and the weights"
            )
        else:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, precision=precision)
            tokenizer = open_clip.get_tokenizer(name)
        return cls(model, tokenizer, device=device, long_context=long_context, **kwargs)

    # --- text -----------------------------------------------------------------------------------
    def encode_question(self, text: str | list[str]) -> torch.Tensor:
        """``[B, D]`` float32 CLIP embeddings of the question(s) alone (not normalised).

        Texts longer than the context (248 tokens with ``long_context``, else 77) are truncated.
        """
        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a str or a non-empty list of str, got {text!r}")
        tokens = self.tokenizer(list(texts), context_length=self.context_length).to(self.device)
        with torch.inference_mode():
            return self.model.encode_text(tokens).float()

    # --- frames ---------------------------------------------------------------------------------
    def _check_frames(self, frames) -> torch.Tensor:
        """Validate frames; returns a ``[T, H, W, 3]`` tensor, unconverted (conversion happens per chunk,
        so a long uint8 video never exists as one float32 tensor)."""
        if not isinstance(frames, torch.Tensor):
            try:
                frames = torch.as_tensor(frames)
            except Exception as e:
                raise TypeError(f"frames must be a tensor or array of shape [T, H, W, 3], got {type(frames).__name__}") from e
        if frames.ndim == 3:
            frames = frames.unsqueeze(0)
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ValueError(f"frames must have shape [T, H, W, 3] (or [H, W, 3]), got {tuple(frames.shape)}")
        if frames.dtype != torch.uint8 and not frames.is_floating_point():
            raise TypeError(f"frames must be uint8 (0-255) or float (0-1), got {frames.dtype}")
        if frames.is_floating_point() and not torch.isfinite(frames).all():
            raise ValueError("frames contain NaN or Inf")
        return frames

    def _prepare(self, frames: torch.Tensor) -> torch.Tensor:
        """``[t, H, W, 3]`` uint8/float frames → ``[t, 3, S, S]`` normalised pixels in the tower's dtype."""
        pix = frames.to(self.device).permute(0, 3, 1, 2).float()
        if frames.dtype == torch.uint8:
            pix = pix / 255.0
        if tuple(pix.shape[-2:]) != self.image_size:
            # Squash, not crop: the patch grid must cover the whole frame so the map lines up with the
            # VLM's grid of the same frame.
            pix = F.interpolate(pix, size=self.image_size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        pix = (pix - self.mean.to(pix.device)) / self.std.to(pix.device)
        return pix.to(next(self.model.visual.parameters()).dtype)

    def encode_frames(self, frames) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Per-patch CLIP-space embeddings of video frames.

        Args:
            frames: ``[T, H, W, 3]`` (or one ``[H, W, 3]`` image), uint8 in 0-255 or float in 0-1; a
                tensor or an array (decord's ``asnumpy()``). Each frame is resized (not cropped) to the
                tower's resolution.

        Returns:
            ``(emb [T, h*w, D] float32, (T, h, w))``: the image tower's patch tokens after ``ln_post``
            and ``proj`` (the same head that maps its CLS token into CLIP space), raster order.
        """
        frames = self._check_frames(frames)
        visual = self.model.visual
        out = []
        with torch.inference_mode():
            for chunk in frames.split(self.frame_batch):
                x = self._prepare(chunk)
                prev = visual.output_tokens
                visual.output_tokens = True  # open_clip's own switch: forward returns (pooled, tokens)
                try:
                    _, tokens = visual(x)
                finally:
                    visual.output_tokens = prev
                if visual.final_ln_after_pool:  # then ln_post was applied to the pooled vector only
                    tokens = visual.ln_post(tokens)
                if visual.proj is not None:
                    tokens = tokens @ visual.proj
                out.append(tokens.float())
        emb = torch.cat(out, 0)
        gh, gw = self.grid_size
        return emb, (emb.shape[0], gh, gw)

    def score(self, question: str, frames, target_grid=None) -> torch.Tensor:
        """``[1, T'*H'*W']`` relevance of each token of ``target_grid`` (default: the scorer's own grid) to ``question``."""
        if not isinstance(question, str):
            raise TypeError(f"question must be a str, got {type(question).__name__}")
        text = self.encode_question(question)
        emb, grid = self.encode_frames(frames)
        rel = relevance_from_embeddings(text, emb.reshape(1, -1, emb.shape[-1]),
                                        logit_scale=self.logit_scale, logit_bias=self.logit_bias)
        if target_grid is None or tuple(target_grid) == grid:
            return rel
        return resize_relevance(rel, grid, tuple(target_grid))


# --- tiny random model (tests, demo) -----------------------------------------------------------------

def tiny_clip_model(seed: int = 0):
    """A tiny random open_clip ``CLIP`` of :data:`TINY_CLIP_CONFIG` (eval mode, fp32, CPU).

    Built under a forked RNG so the caller's random state is untouched. Images are 32×32, patches 8×8
    (a 4×4 grid), embeddings 32-d; the tokenizer is open_clip's ``SimpleTokenizer`` (offline).
    """
    open_clip = _open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CONFIG))
    size = TINY_CLIP_CONFIG["vision_cfg"]["image_size"]
    open_clip.model.set_model_preprocess_cfg(model, {
        "size": (size, size), "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
        "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0,
    })
    return model.eval()


@functools.lru_cache(maxsize=1)
def _shared_simple_tokenizer():
    # Building the BPE tables takes ~0.3 s; the tables are read-only, so instances can share them.
    return _open_clip().SimpleTokenizer()


def simple_tokenizer(context_length: int = 77):
    """open_clip's CLIP BPE tokenizer (offline), sharing one set of BPE tables between instances."""
    tok = copy.copy(_shared_simple_tokenizer())
    tok.context_length = context_length
    return tok


def tiny_clip_scorer(seed: int = 0, *, long_context: bool = True, device="cpu", **kwargs) -> ClipRelevanceScorer:
    """:class:`ClipRelevanceScorer` on :func:`tiny_clip_model` (random weights: for tests and the demo's tiny mode)."""
    model = tiny_clip_model(seed)
    tokenizer = simple_tokenizer(model.context_length)
    return ClipRelevanceScorer(model, tokenizer, device=device, long_context=long_context, **kwargs)


def save_local_clip(model, directory, model_cfg: dict) -> Path:
    """Write ``model`` in open_clip's local-directory layout, loadable offline by ``from_pretrained(directory)``.

    Writes ``open_clip_config.json`` (``{"model_cfg": model_cfg, "preprocess_cfg": ...}``) and
    ``open_clip_pytorch_model.bin`` (the state dict). Save before :func:`apply_long_context`: the
    stretched table would not fit ``model_cfg``'s context length.
    """
    from .long_clip import _text_tower

    if getattr(_text_tower(model), "_vlmcompress_long_context", None) is not None:
        raise ValueError("save_local_clip needs the model before apply_long_context (its text table was stretched)")
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError("model_cfg must be an open_clip model config dict with embed_dim, vision_cfg and text_cfg")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    config = {"model_cfg": model_cfg, "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}}
    (directory / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    torch.save(model.state_dict(), directory / "open_clip_pytorch_model.bin")
    return directory
