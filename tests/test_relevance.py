"""Relevance maps: the softmax over tokens, resizing between grids, and the open_clip scorer end to end."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmcompress.relevance import relevance_from_embeddings, resize_relevance


# --- relevance_from_embeddings ------------------------------------------------------------------------

def test_relevance_is_a_softmax_per_sample():
    g = torch.Generator().manual_seed(0)
    text, vis = torch.randn(3, 16, generator=g), torch.randn(3, 40, 16, generator=g)
    rel = relevance_from_embeddings(text, vis)
    assert rel.shape == (3, 40) and rel.dtype == torch.float32
    torch.testing.assert_close(rel.sum(1), torch.ones(3))
    assert (rel > 0).all()
    cos = F.cosine_similarity(text[:, None], vis, dim=-1)
    torch.testing.assert_close(rel, torch.softmax(100 * cos, -1), rtol=1e-5, atol=1e-7)
    # The most relevant token is the one most aligned with the text.
    assert torch.equal(rel.argmax(1), cos.argmax(1))


def test_relevance_scale_and_bias():
    g = torch.Generator().manual_seed(1)
    text, vis = torch.randn(2, 8, generator=g), torch.randn(2, 30, 8, generator=g)
    base = relevance_from_embeddings(text, vis, logit_scale=10.0)
    torch.testing.assert_close(relevance_from_embeddings(text, vis, logit_scale=10.0, logit_bias=-7.5), base)
    sharp = relevance_from_embeddings(text, vis, logit_scale=100.0)
    assert (sharp.max(1).values > base.max(1).values).all()
    # Scale-invariant in the embeddings (cosine), and batch rows independent.
    torch.testing.assert_close(relevance_from_embeddings(3 * text, vis * 0.5, logit_scale=10.0), base)
    torch.testing.assert_close(relevance_from_embeddings(text[1:], vis[1:], logit_scale=10.0), base[1:])


def test_relevance_bad_inputs():
    t, v = torch.randn(2, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="visual_emb"):
        relevance_from_embeddings(t, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="visual_emb"):
        relevance_from_embeddings(t, torch.randn(3, 5, 8))
    with pytest.raises(ValueError, match="text_emb"):
        relevance_from_embeddings(torch.randn(8), v)
    with pytest.raises(ValueError, match="logit_scale"):
        relevance_from_embeddings(t, v, logit_scale=0.0)
    with pytest.raises(ValueError, match="logit_bias"):
        relevance_from_embeddings(t, v, logit_bias=float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        relevance_from_embeddings(t, torch.full((2, 5, 8), float("nan")))


# --- resize_relevance ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "src,dst",
    [((1, 4, 4), (1, 4, 4)), ((1, 4, 4), (1, 8, 6)), ((3, 9, 9), (1, 3, 3)), ((4, 6, 10), (8, 3, 5)), ((2, 5, 7), (3, 7, 4))],
    ids=lambda g: "x".join(map(str, g)),
)
def test_resize_shape_and_normalisation(src, dst):
    rel = torch.softmax(torch.randn(2, math.prod(src)), -1)
    out = resize_relevance(rel, src, dst)
    assert out.shape == (2, math.prod(dst))
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    assert (out >= 0).all()


def test_resize_identity_and_uniform():
    rel = torch.softmax(torch.randn(2, 48), -1)
    torch.testing.assert_close(resize_relevance(rel, (3, 4, 4), (3, 4, 4)), rel)
    uniform = torch.full((1, 16), 1 / 16)
    torch.testing.assert_close(resize_relevance(uniform, (1, 4, 4), (2, 7, 5)), torch.full((1, 70), 1 / 70))


def test_resize_down_keeps_mass_of_small_objects():
    # One hot token at (t=1, h=5, w=2) of a 2×8×8 map; shrinking by 4× per spatial axis must keep all the
    # mass in the output cell that contains it (trilinear sampling alone would miss it).
    rel = torch.zeros(1, 2, 8, 8)
    rel[0, 1, 5, 2] = 1.0
    out = resize_relevance(rel.reshape(1, -1), (2, 8, 8), (1, 2, 2)).reshape(1, 2, 2)
    assert float(out[0, 1, 0]) == pytest.approx(1.0)


def test_resize_up_puts_mass_near_the_source():
    rel = torch.zeros(1, 1, 4, 4)
    rel[0, 0, 0, 3] = 1.0
    out = resize_relevance(rel.reshape(1, -1), (1, 4, 4), (1, 8, 8)).reshape(8, 8)
    assert out[:4, 4:].sum() > 0.9  # the top-right quadrant


def test_resize_bad_inputs():
    rel = torch.softmax(torch.randn(1, 16), -1)
    with pytest.raises(ValueError, match="from_grid"):
        resize_relevance(rel, (1, 4, 5), (1, 2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        resize_relevance(-rel, (1, 4, 4), (1, 2, 2))
    with pytest.raises(TypeError, match="to_grid"):
        resize_relevance(rel, (1, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="to_grid"):
        resize_relevance(rel, (1, 4, 4), (0, 2, 2))
    with pytest.raises(ValueError, match="positive sum"):
        resize_relevance(torch.zeros(1, 16), (1, 4, 4), (1, 2, 2))


# --- ClipRelevanceScorer on a tiny random open_clip model ----------------------------------------------

open_clip = pytest.importorskip("open_clip")

from vlmcompress.relevance import (  # noqa: E402
    TINY_CLIP_CONFIG,
    TINY_CLIP_NAME,
    ClipRelevanceScorer,
    save_local_clip,
    simple_tokenizer,
    tiny_clip_model,
    tiny_clip_scorer,
)


@pytest.fixture(scope="module")
def scorer():
    return tiny_clip_scorer(0)


@pytest.fixture(scope="module")
def frames():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 40, 52, 3), dtype=torch.uint8, generator=g)


def test_scorer_shapes(scorer, frames):
    assert scorer.context_length == 248 and scorer.tokenizer.context_length == 248
    q = scorer.encode_question("what is the dog doing?")
    assert q.shape == (1, 32) and q.dtype == torch.float32
    assert scorer.encode_question(["a", "b c"]).shape == (2, 32)
    emb, grid = scorer.encode_frames(frames)
    assert grid == (3, 4, 4) and emb.shape == (3, 16, 32)
    one, g1 = scorer.encode_frames(frames[0])  # a single [H, W, 3] image
    assert g1 == (1, 4, 4)
    torch.testing.assert_close(one, emb[:1], rtol=1e-5, atol=1e-5)


def test_scorer_float_frames_equal_uint8(scorer, frames):
    a, _ = scorer.encode_frames(frames)
    b, _ = scorer.encode_frames(frames.float() / 255)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c, _ = scorer.encode_frames(frames.numpy())  # decord's asnumpy() layout
    torch.testing.assert_close(a, c)
    d, _ = tiny_clip_scorer(0, frame_batch=2).encode_frames(frames)  # chunked: 2 + 1 frames
    torch.testing.assert_close(a, d, rtol=1e-5, atol=1e-5)


def test_scorer_patch_embeddings_are_projected_tokens(scorer, frames):
    """Each patch goes through the same ln_post + proj head as the CLS token (checked by hand)."""
    visual = scorer.model.visual
    pix = scorer._prepare(frames)
    with torch.no_grad():
        x = visual.transformer(visual._embeds(pix))
        x = visual.ln_post(x)
        cls_ref = x[:, 0] @ visual.proj
        patch_ref = x[:, 1:] @ visual.proj
        cls = visual(pix)
    emb, _ = scorer.encode_frames(frames)
    torch.testing.assert_close(emb, patch_ref)
    torch.testing.assert_close(cls, cls_ref)  # the forward switch was restored
    assert visual.output_tokens is False


def test_scorer_score_map(scorer, frames):
    rel = scorer.score("a dog catching a frisbee", frames)
    assert rel.shape == (1, 48)
    torch.testing.assert_close(rel.sum(1), torch.ones(1))
    assert (rel.max() - rel.min()) > 1e-3  # the question makes the map non-uniform
    other = scorer.score("a bowl of soup on a table", frames)
    assert not torch.allclose(rel, other)  # and it depends on the question
    resized = scorer.score("a dog catching a frisbee", frames, target_grid=(2, 6, 6))
    assert resized.shape == (1, 72)
    torch.testing.assert_close(resized, resize_relevance(rel, (3, 4, 4), (2, 6, 6)))
    # Same as composing the public pieces.
    emb, _ = scorer.encode_frames(frames)
    ref = relevance_from_embeddings(scorer.encode_question("a dog catching a frisbee"), emb.reshape(1, 48, 32),
                                    logit_scale=scorer.logit_scale)
    torch.testing.assert_close(rel, ref)


def test_scorer_default_scale_is_models(scorer):
    assert scorer.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init; trained CLIPs give 100
    assert scorer.logit_bias is None


def test_scorer_without_long_context_keeps_77(frames):
    s = tiny_clip_scorer(0, long_context=False)
    assert s.context_length == 77 and s.model.positional_embedding.shape[0] == 77
    # A short question gives the same embedding either way.
    torch.testing.assert_close(s.encode_question("a red dog"), tiny_clip_scorer(0).encode_question("a red dog"), rtol=0, atol=0)


def test_local_directory_round_trip(tmp_path, scorer, frames):
    save_local_clip(tiny_clip_model(0), tmp_path / "tiny", TINY_CLIP_CONFIG)
    assert (tmp_path / "tiny" / "open_clip_config.json").is_file()
    loaded = ClipRelevanceScorer.from_pretrained(str(tmp_path / "tiny"))
    assert loaded.context_length == 248
    torch.testing.assert_close(loaded.score("a red dog", frames), scorer.score("a red dog", frames))


def test_local_weights_file_round_trip(tmp_path, frames):
    path = tmp_path / "tiny_seed1.pt"
    torch.save(tiny_clip_model(seed=1).state_dict(), path)
    loaded = ClipRelevanceScorer.from_pretrained(TINY_CLIP_NAME, pretrained=str(path))
    want = tiny_clip_scorer(seed=1).score("a red dog", frames)
    torch.testing.assert_close(loaded.score("a red dog", frames), want)
    assert not torch.allclose(tiny_clip_scorer(seed=0).score("a red dog", frames), want)  # the weights were loaded


def test_from_pretrained_errors(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({}, path)
    with pytest.raises(ValueError, match="architecture"):
        ClipRelevanceScorer.from_pretrained(str(path))
    with pytest.raises(FileNotFoundError):
        ClipRelevanceScorer.from_pretrained(TINY_CLIP_NAME, pretrained=str(tmp_path / "missing.pt"))
    # Unknown architecture names go through open_clip's own lookup (no network needed to fail).
    with pytest.raises(RuntimeError, match="not found"):
        ClipRelevanceScorer.from_pretrained("no-such-architecture-xyz")
    stretched = tiny_clip_model(0)
    from vlmcompress.long_clip import apply_long_context

    apply_long_context(stretched)
    with pytest.raises(ValueError, match="apply_long_context"):
        save_local_clip(stretched, tmp_path / "x", TINY_CLIP_CONFIG)


def test_scorer_bad_inputs(scorer, frames):
    with pytest.raises(ValueError, match="frames"):
        scorer.encode_frames(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))  # channels first
    with pytest.raises(TypeError, match="uint8"):
        scorer.encode_frames(torch.zeros(1, 8, 8, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        scorer.encode_frames(torch.full((1, 8, 8, 3), float("nan")))
    with pytest.raises(TypeError, match="question"):
        scorer.score(["a", "b"], frames)
    with pytest.raises(TypeError, match="text"):
        scorer.encode_question([])
    with pytest.raises(TypeError, match="VisionTransformer"):
        ClipRelevanceScorer(torch.nn.Linear(2, 2), simple_tokenizer())
