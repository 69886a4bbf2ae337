"""Regression tests for issue 9's defects 3–6 and 8 (1, 2 in test_steps.py, 7 in test_merge.py), each
written to fail on the code before its fix."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import vlmcompress as vc
from vlmcompress.adapters.patching import _read_question
from vlmcompress.adapters.registry import adapter_for
from vlmcompress.testing.adapter_checks import cached_model, cached_processor, chat_inputs, generate_tokens

QUESTION = "Is the square white?"


def _media(kind, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    if kind == "image":
        return Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    return rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)


def _chat(family, kind, question_first, seed=0, question=QUESTION):
    block = [(kind, _media(kind, seed))]
    proc = cached_processor(family)
    if not question_first:
        return chat_inputs(proc, [(block, question)])
    # chat_inputs writes media first; build the [text, media] turn by hand.
    conv = [[{"role": "user", "content": [{"type": "text", "text": question}, {"type": kind, kind: block[0][1]}]}]]
    kw = {"padding": True}
    if kind == "video":
        kw["video_metadata"] = [{"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "frames_indices": [0, 1, 2, 3]}]
    proc.tokenizer.padding_side = "left"
    return dict(proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", processor_kwargs=kw))


# --- defect 6: the question before the image ---------------------------------------------------------------
@pytest.mark.parametrize("family,kind", [("llava", "image"), ("llava_onevision", "video"), ("qwen2_vl", "video"),
                                         ("qwen3_vl", "video"), ("internvl", "image")])
@pytest.mark.parametrize("question_first", [False, True], ids=["media-then-text", "text-then-media"])
def test_question_is_read_wherever_the_image_sits(family, kind, question_first):
    model = cached_model(family)
    inputs = _chat(family, kind, question_first)
    assert _read_question(cached_processor(family), adapter_for(model), inputs) == [QUESTION]


def test_relevance_with_the_question_first_pools_as_with_it_given():
    model, proc = cached_model("llava"), cached_processor("llava")
    inputs = _chat("llava", "image", question_first=True)
    cfg = vc.CompressionConfig(keep_ratio=0.25, relevance=vc.tiny_clip_scorer(0))
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["inputs_embeds"].detach().clone()), with_kwargs=True)
    try:
        with vc.compressed(model, cfg, processor=proc):
            generate_tokens(model, inputs, max_new_tokens=1, min_new_tokens=1)
            generate_tokens(model, inputs, max_new_tokens=1, min_new_tokens=1, question=QUESTION)
    finally:
        hook.remove()
    assert torch.equal(seen[0], seen[1])


# --- defect 8: silent fallbacks -----------------------------------------------------------------------------
def test_chat_template_failure_warns_instead_of_passing_silently():
    from vlmcompress.adapters import patching

    class NoTemplate:
        tokenizer = cached_processor("llava").tokenizer

        def apply_chat_template(self, *a, **k):
            raise ValueError("no chat template")

    class Broken(NoTemplate):
        def apply_chat_template(self, *a, **k):
            raise RuntimeError("a real bug")

    patching._TEMPLATE_WARNED.discard("NoTemplate")
    with pytest.warns(UserWarning, match="apply_chat_template failed"):
        assert patching._chat_markers(NoTemplate(), NoTemplate.tokenizer) == ([], [])
    with pytest.raises(RuntimeError, match="a real bug"):
        patching._chat_markers(Broken(), Broken.tokenizer)


def test_qwen_rope_index_with_a_renamed_argument_fails_loudly(monkeypatch):
    model = cached_model("qwen2_vl")
    inputs = chat_inputs(cached_processor("qwen2_vl"), [([("video", _media("video"))], QUESTION)])
    original = model.model.get_rope_index

    def renamed(input_ids, mm_token_type_ids=None, image_grid_thw=None, video_grid_thw=None, attn_mask=None):
        return original(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw)

    monkeypatch.setattr(model.model, "get_rope_index", renamed)
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
        with pytest.raises(RuntimeError, match=r"get_rope_index takes .*attention_mask"):
            model(**inputs)


def test_internvl_temporal_merge_without_processor_warns():
    model = cached_model("internvl")
    video = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    inputs = chat_inputs(cached_processor("internvl"), [([("video", video)], QUESTION)])
    with vc.compressed(model, vc.CompressionConfig(temporal_threshold=0.5)):
        with pytest.warns(UserWarning, match="patched without processor="):
            with torch.no_grad():
                model(**inputs)
    with vc.compressed(model, vc.CompressionConfig(temporal_threshold=0.5), processor=cached_processor("internvl")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            with torch.no_grad():
                model(**inputs)


# --- defect 5: deepcopy of a patched model -----------------------------------------------------------------
@pytest.mark.parametrize("family,config", [
    ("llava", vc.CompressionConfig(keep_ratio=0.5, vision_keep=0.5, llm_proportional_attention=True)),
    ("qwen2_vl", vc.CompressionConfig(keep_ratio=0.5))], ids=["llava-stageA-llmbias", "qwen2_vl"])
def test_deepcopy_of_a_patched_model_runs_its_own_weights(family, config):
    from vlmcompress.testing.tiny_models import tiny_model

    model = tiny_model(family, attn_implementation="sdpa" if family == "qwen2_vl" else "eager")
    kind = "image" if family == "llava" else "video"
    inputs = chat_inputs(cached_processor(family), [([(kind, _media(kind))], QUESTION)])
    vc.patch(model, config)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        mine, theirs = model(**inputs).logits, twin(**inputs).logits
    assert not torch.allclose(mine, theirs, atol=1e-3)          # before the fix: the copy ran the original
    reference = copy.deepcopy(twin)
    vc.unpatch(reference)
    vc.patch(reference, config)
    with torch.no_grad():
        torch.testing.assert_close(theirs, reference(**inputs).logits, rtol=0, atol=1e-5)
    # Each copy owns its patch: unpatching the copy leaves the original patched and working, and vice versa.
    vc.unpatch(twin)
    assert vc.is_patched(model) and not vc.is_patched(twin)
    assert "forward" not in twin.__dict__ and "generate" not in twin.__dict__
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, mine, rtol=0, atol=0)
    vc.unpatch(model)
    # (transformers adds output-recording hooks of its own on the first forward; only ours must be gone)
    assert not [fn for m in model.modules() for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
                if _ours(fn)]
    assert not any("forward" in m.__dict__ for m in model.modules())


def _ours(fn) -> bool:
    """Whether a hook function comes from vlmcompress (a function, a bound method or a partial of one)."""
    fn = getattr(fn, "func", fn)
    owner = getattr(fn, "__self__", None)
    module = type(owner).__module__ if owner is not None else getattr(fn, "__module__", "")
    return module.startswith("vlmcompress")


# --- defects 3 and 4: decoding without a cache, and manual decoding, on the 1-D families ------------------
ONE_D = [("llava", "image"), ("llava_onevision", "video"), ("internvl", "image")]


def _one_d_inputs(family, kind):
    media = _media(kind) if family != "internvl" else _media_internvl(kind)
    return chat_inputs(cached_processor(family), [([(kind, media)], QUESTION)])


def _media_internvl(kind):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize("family,kind", ONE_D, ids=[f for f, _ in ONE_D])
@pytest.mark.parametrize("bias", [False, True], ids=["plain", "llm-size-bias"])
def test_generate_without_cache_equals_with_cache(family, kind, bias):
    """Defect 3: with no mask and no cache, transformers read the gaps in centroid positions as packed-sequence
    boundaries (first-token logits off by 0.17-0.46), and the LLM size bias was dropped after the first step."""
    model = cached_model(family, "eager") if bias else cached_model(family)
    inputs = _one_d_inputs(family, kind)
    cfg = vc.CompressionConfig(keep_ratio=0.25, budget_method="merge", llm_proportional_attention=bias)
    with vc.compressed(model, cfg):
        kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            cached = model.generate(**inputs, use_cache=True, **kw)
            fresh = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize("family,kind", ONE_D, ids=[f for f, _ in ONE_D])
def test_manual_decoding_with_the_cache_continues_after_the_prompt(family, kind):
    """Defect 4: a manual loop (no position_ids) continued at the compressed length (positions 64 -> 38)."""
    model = cached_model(family)
    inputs = _one_d_inputs(family, kind)
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.25)):
        expected = generate_tokens(model, inputs)[:, inputs["input_ids"].shape[1]:]
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, k: seen.append(k.get("position_ids")), with_kwargs=True)
        tokens = []
        try:
            with torch.no_grad():
                out = model(**inputs, use_cache=True)
                for _ in range(expected.shape[1]):
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                    tokens.append(nxt)
                    out = model(input_ids=nxt, cache=out.cache, use_cache=True)
        finally:
            hook.remove()
    assert torch.equal(torch.cat(tokens, 1), expected)
    last_prompt = float(seen[0][0, -1])
    assert float(seen[1][0, 0]) == last_prompt + 1
