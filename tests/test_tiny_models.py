"""Tiny random VLMs of all 8 families: they build, run, generate, round-trip offline, and keep the
placeholder-token / feature-count contract the adapters rely on."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")

from vlmcompress.testing.tiny_models import (  # noqa: E402
    FAMILIES,
    save_tiny_checkpoint,
    supports_video,
    tiny_config,
    tiny_inputs,
    tiny_model,
    tiny_model_and_processor,
    tiny_processor,
    visual_feature_counts,
)

CASES = [(f, k) for f in FAMILIES for k in ("image", "video") if k == "image" or supports_video(f)]
CASE_IDS = [f"{f}-{k}" for f, k in CASES]

# Placeholder tokens per sample for tiny_inputs' default sizes (2 samples) and 4-frame videos; the
# module docstring explains each number. InternVL counts <IMG_CONTEXT> (video frames are images there).
EXPECTED_TOKENS = {
    ("llava", "image"): [36, 36],
    ("llava_next", "image"): [78, 114],
    ("llava_next_video", "image"): [78, 114],
    ("llava_next_video", "video"): [36, 36],
    ("llava_onevision", "image"): [78, 114],
    ("llava_onevision", "video"): [37, 37],
    ("qwen2_vl", "image"): [16, 15],
    ("qwen2_vl", "video"): [18, 18],
    ("qwen2_5_vl", "image"): [16, 15],
    ("qwen2_5_vl", "video"): [18, 18],
    ("qwen3_vl", "image"): [16, 15],
    ("qwen3_vl", "video"): [18, 18],
    ("internvl", "image"): [16, 48],
    ("internvl", "video"): [64, 64],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core box OpenMP spinning made this
    file 6× slower (88 s vs 13 s measured under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.lru_cache(maxsize=None)
def _pair(family):
    return tiny_model_and_processor(family)


def _placeholder_id(model, family, kind):
    return model.config.image_token_id if kind == "image" or family == "internvl" else model.config.video_token_id


def test_families_and_video_support():
    assert FAMILIES == (
        "llava", "llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl",
    )  # fmt: skip
    assert [f for f in FAMILIES if not supports_video(f)] == ["llava", "llava_next"]


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_match_processor(family):
    config = tiny_config(family)
    processor = tiny_processor(family)
    tok = processor.tokenizer
    assert config.model_type == family
    assert config.image_token_id == processor.image_token_id
    assert tok.convert_ids_to_tokens(config.image_token_id) == processor.image_token
    if supports_video(family) and family != "internvl":
        assert config.video_token_id == processor.video_token_id
    if family.startswith("qwen"):
        assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
        assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
        rope = config.text_config.rope_parameters
        head_dim = getattr(config.text_config, "head_dim", None) or (
            config.text_config.hidden_size // config.text_config.num_attention_heads
        )
        assert sum(rope["mrope_section"]) == head_dim // 2
    text = config.get_text_config()
    assert text.vocab_size >= len(tok)
    assert (text.eos_token_id, text.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)


@pytest.mark.parametrize("batch", [1, 2], ids=["B1", "B2"])
@pytest.mark.parametrize(("family", "kind"), CASES, ids=CASE_IDS)
def test_forward_generate_and_feature_contract(family, kind, batch):
    model, processor = _pair(family)
    inputs = tiny_inputs(family, processor, kind=kind, batch=batch)
    ids = inputs["input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (batch, ids.shape[1], model.config.get_text_config().vocab_size)
    assert torch.isfinite(logits).all()

    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape == (batch, ids.shape[1] + 3)
    assert torch.equal(gen[:, : ids.shape[1]], ids)

    # The adapters' contract: placeholders in input_ids == rows the model's own encoder returns.
    counts = visual_feature_counts(model, inputs)
    n_tokens, n_features = counts["image" if family == "internvl" else kind]
    per_sample = (ids == _placeholder_id(model, family, kind)).sum(1).tolist()
    assert n_tokens == n_features == sum(per_sample)
    assert per_sample == EXPECTED_TOKENS[(family, kind)][:batch]

    if batch == 2:  # different prompt lengths, padded on the left
        mask = inputs["attention_mask"]
        assert mask[:, -1].all() and not mask[:, 0].all()


@pytest.mark.parametrize(("family", "kind"), CASES, ids=CASE_IDS)
def test_batch_equals_singles(family, kind):
    """Left padding and per-sample visual inputs are handled: each row of a batch of 2 gives the same
    next-token logits as that sample alone."""
    model, processor = _pair(family)
    prompts = ["Describe it.", "What is the man on the left doing, and what color is the car next to the tree?"]
    sizes = {"qwen2_vl": [(64, 64), (48, 80)], "internvl": [(64, 64), (64, 128)]}.get(family, [(48, 48), (48, 96)])
    sizes = sizes if kind == "image" else [(48, 48), (48, 48)]
    batched = tiny_inputs(family, processor, kind=kind, batch=2, prompts=prompts, image_sizes=sizes, seed=5)
    with torch.no_grad():
        last = model(**batched).logits[:, -1]
        for i in range(2):
            single = tiny_inputs(
                family, processor, kind=kind, batch=1, prompts=[prompts[i]], image_sizes=[sizes[i]], seed=5 + i
            )
            torch.testing.assert_close(last[i], model(**single).logits[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_offline(family, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = save_tiny_checkpoint(family, tmp_path / family)
    reloaded = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True).eval()
    reprocessor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model, processor = _pair(family)
    assert type(reloaded) is type(model) and type(reprocessor) is type(processor)
    for kind in ("image", "video") if supports_video(family) else ("image",):
        a = tiny_inputs(family, processor, kind=kind, batch=2)
        b = tiny_inputs(family, reprocessor, kind=kind, batch=2)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key
        with torch.no_grad():
            assert torch.equal(model(**a).logits, reloaded(**b).logits)


def test_seed_gives_same_weights_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model("qwen2_vl", seed=0)
    assert torch.equal(torch.rand(3), expected)
    b = tiny_model("qwen2_vl", seed=0)
    c = tiny_model("qwen2_vl", seed=1)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert not a.training


def test_dtype_and_attention_implementation():
    model = tiny_model("llava", dtype=torch.bfloat16, attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    inputs = tiny_inputs("llava", tiny_processor("llava"))
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits.float()).all()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_mm_token_type_ids_and_video_layout(family):
    model, processor = _pair(family)
    for kind, type_id in (("image", 1), ("video", 2)):
        inputs = tiny_inputs(family, processor, kind=kind, frames=4)
        ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
        pad_id = model.config.image_token_id if kind == "image" else model.config.video_token_id
        assert torch.equal(types == type_id, ids == pad_id)
        assert not ((types != 0) & (types != type_id)).any()
    # Qwen3-VL writes each temporal group (2 frames) in its own vision_start/vision_end, inside the
    # template's outer pair; Qwen2/2.5-VL write one run per video.
    n_start = int((ids == model.config.vision_start_token_id).sum())
    assert n_start == (1 + 4 // 2 if family == "qwen3_vl" else 1)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_chat_template_renders_placeholders(family):
    processor = tiny_processor(family)
    image_text = {"llava": "<image>", "qwen2_vl": "<|image_pad|>", "internvl": "<IMG_CONTEXT>"}[family]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.count(image_text) == 1 and "What is this?" in prompt
    if supports_video(family):
        video_text = {"qwen2_vl": "<|video_pad|>", "internvl": "<video>"}[family]
        video_msg = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Why?"}]}]
        assert processor.apply_chat_template(video_msg).count(video_text) == 1
    tok = processor.tokenizer
    assert tok.decode(tok("Describe the picture.").input_ids) == "Describe the picture."


def test_bad_arguments_raise_clear_errors():
    processor = tiny_processor("llava")
    with pytest.raises(ValueError, match="family"):
        tiny_model("gpt2")
    with pytest.raises(ValueError, match="family"):
        tiny_processor("llava2")
    with pytest.raises(ValueError, match="video"):
        tiny_inputs("llava", processor, kind="video")
    with pytest.raises(ValueError, match="kind"):
        tiny_inputs("llava", processor, kind="audio")
    with pytest.raises(ValueError, match="prompts"):
        tiny_inputs("llava", processor, batch=2, prompts=["only one"])
    with pytest.raises(ValueError, match="batch"):
        tiny_inputs("llava", processor, batch=0)
    with pytest.raises(TypeError, match="dtype"):
        tiny_model("llava", dtype="float16")
