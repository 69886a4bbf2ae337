"""Patching mechanics, independent of the family: reversible, configurable, clear errors."""
import pytest
import torch

import vlmcompress as vc
from vlmcompress.testing.tiny_models import tiny_inputs, tiny_model_and_processor


@pytest.fixture(scope="module")
def llava():
    model, processor = tiny_model_and_processor("llava")
    return model, processor, tiny_inputs("llava", processor, kind="image", batch=2)


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_patch_returns_model_and_unpatch_leaves_nothing(llava):
    model, _, inputs = llava
    before = dict(model.__dict__)
    assert vc.patch(model, vc.CompressionConfig(keep_ratio=0.5)) is model
    assert vc.is_patched(model)
    assert vc.unpatch(model) is model
    assert not vc.is_patched(model)
    assert set(model.__dict__) == set(before)
    assert type(model).forward is model.forward.__func__


def test_identity_config_gives_identical_logits_and_report(llava):
    model, _, inputs = llava
    ref = _logits(model, inputs)
    with vc.compressed(model, vc.CompressionConfig()):
        out = _logits(model, inputs)
        report = model.vlmcompress.report
    assert torch.equal(ref, out)
    assert report.visual_before == report.visual_after == int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert not vc.is_patched(model)


def test_config_changes_without_repatching(llava):
    model, _, inputs = llava
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
        _logits(model, inputs)
        half = model.vlmcompress.report.visual_after
        vc.patch(model, vc.CompressionConfig(keep_ratio=0.25))       # patching again changes the config
        _logits(model, inputs)
        quarter = model.vlmcompress.report.visual_after
        model.vlmcompress.config = vc.CompressionConfig()
        _logits(model, inputs)
        full = model.vlmcompress.report.visual_after
    assert quarter < half < full


def test_context_manager_restores_after_an_error(llava):
    model, _, _ = llava
    with pytest.raises(RuntimeError, match="boom"):
        with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
            raise RuntimeError("boom")
    assert not vc.is_patched(model)


def test_text_only_calls_pass_through(llava):
    model, processor, inputs = llava
    text = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"][:, :5]}
    ref = _logits(model, text)
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.25)):
        assert torch.equal(_logits(model, text), ref)


def test_errors_are_clear(llava):
    model, _, inputs = llava
    with pytest.raises(TypeError, match="CompressionConfig"):
        vc.patch(model, {"keep_ratio": 0.5})
    with pytest.raises(ValueError, match="not patched"):
        vc.unpatch(model)
    text_model = torch.nn.Linear(2, 2)
    text_model.config = type("Cfg", (), {"model_type": "bert"})()
    with pytest.raises(ValueError, match="supported families: .*llava"):
        vc.patch(text_model, vc.CompressionConfig())
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
        bad = dict(inputs)
        bad["input_ids"] = bad["input_ids"].clone()
        bad["input_ids"][bad["input_ids"] == model.config.image_token_id] = 1
        with pytest.raises(ValueError, match="placeholder"):
            _logits(model, bad)
        with pytest.raises(ValueError, match="labels"):
            model(**inputs, labels=inputs["input_ids"])


def test_supported_model_types_lists_llava():
    assert "llava" in vc.supported_model_types()


def test_positional_arguments_keep_every_value(llava):
    """model(ids, pixels, mask) and generate(ids, generation_config, ...) name their positional arguments
    after the model's own signature: nothing is dropped on the way into the pipeline."""
    from transformers import GenerationConfig

    model, _, inputs = llava
    ids, pixels, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
        by_name = _logits(model, inputs)
        with torch.no_grad():
            positional = model(ids, pixels, mask).logits
        assert torch.equal(positional, by_name)
        expected = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        config = GenerationConfig(max_new_tokens=2, do_sample=False)
        assert torch.equal(model.generate(ids, config, pixel_values=pixels, attention_mask=mask), expected)
        assert torch.equal(model.generate(inputs=ids, pixel_values=pixels, attention_mask=mask,
                                          max_new_tokens=2, do_sample=False), expected)
        assert model.vlmcompress.report.visual_after < model.vlmcompress.report.visual_before
        with pytest.raises(TypeError, match="multiple values for input_ids"):
            model(ids, input_ids=ids, pixel_values=pixels)
        with pytest.raises(TypeError, match="positional arguments"):
            model(*([ids] * 100))


def test_unpatch_puts_back_an_instance_forward_it_found(llava):
    """accelerate's device_map hooks live in an instance ``forward``: patch wraps it and unpatch restores it."""
    model, _, inputs = llava
    calls = []
    class_forward = model.forward

    def hooked(*args, **kwargs):
        calls.append(kwargs.get("input_ids").shape[1])
        return class_forward(*args, **kwargs)

    model.forward = hooked
    try:
        with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
            with torch.no_grad():
                model(**inputs)
            packed = max(model.vlmcompress.report.prefill_after)
        assert calls == [packed] and packed < inputs["input_ids"].shape[1]   # the hook saw the shrunk prompt
        assert model.__dict__["forward"] is hooked
    finally:
        del model.forward
    assert "forward" not in model.__dict__


def test_compressed_on_a_patched_model_restores_the_outer_patch(llava):
    model, processor, inputs = llava
    outer = vc.CompressionConfig(keep_ratio=0.5)
    vc.patch(model, outer, processor=processor)
    try:
        with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.25)):
            _logits(model, inputs)
            quarter = model.vlmcompress.report.visual_after
        assert vc.is_patched(model)
        assert model.vlmcompress.config is outer and model.vlmcompress.processor is processor
        _logits(model, inputs)
        assert model.vlmcompress.report.visual_after > quarter
    finally:
        vc.unpatch(model)


@pytest.mark.parametrize("change, error, message", [
    (lambda i: {"attention_mask": i["attention_mask"][:, 1:]}, ValueError, "attention_mask must be a tensor of the shape"),
    (lambda i: {"input_ids": i["input_ids"][0], "attention_mask": None}, TypeError, r"input_ids must be an integer tensor \[batch"),
    (lambda i: {"input_ids": i["input_ids"].float()}, TypeError, "input_ids must be an integer tensor"),
    (lambda i: {"input_ids": i["input_ids"].tolist()}, TypeError, "input_ids must be an integer tensor"),
    (lambda i: {"question": 3}, TypeError, "question must be a str or a list of 2 str"),
    (lambda i: {"question": ["only one"]}, TypeError, "question must be a str or a list of 2 str"),
    (lambda i: {"inputs_embeds": torch.zeros(2, i["input_ids"].shape[1], 64)}, ValueError, "inputs_embeds"),
], ids=["mask-shape", "ids-1d", "ids-float", "ids-list", "question-int", "question-count", "inputs-embeds"])
def test_bad_inputs_name_what_was_wrong(llava, change, error, message):
    model, _, inputs = llava
    with vc.compressed(model, vc.CompressionConfig(keep_ratio=0.5)):
        with pytest.raises(error, match=message):
            model(**{**inputs, **change(inputs)})


def test_a_refused_config_change_keeps_the_previous_one_working(llava, monkeypatch):
    from vlmcompress.adapters import vision_merge

    model, _, inputs = llava
    install = vision_merge.install_vision_merge

    def refuse_quarter(tower, config, **kw):
        if config.vision_keep == 0.25:
            raise ValueError("refused for the test")
        return install(tower, config, **kw)

    monkeypatch.setattr(vision_merge, "install_vision_merge", refuse_quarter)
    half = vc.CompressionConfig(vision_keep=0.5)
    with vc.compressed(model, half):
        _logits(model, inputs)
        merged = [it.after_vision for it in model.vlmcompress.report.items]
        with pytest.raises(ValueError, match="refused"):
            model.vlmcompress.config = vc.CompressionConfig(vision_keep=0.25)
        assert model.vlmcompress.config is half
        _logits(model, inputs)
        assert [it.after_vision for it in model.vlmcompress.report.items] == merged
        assert all(m < it.placeholders for m, it in zip(merged, model.vlmcompress.report.items))


def test_unpatch_after_a_failed_generate_restores_the_model(llava):
    model, _, inputs = llava
    ref = _logits(model, inputs)
    ref_tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    vc.patch(model, vc.CompressionConfig(keep_ratio=0.5, vision_keep=0.5, llm_proportional_attention=True))
    with pytest.raises(ValueError, match="placeholder"):
        model.generate(**{**inputs, "pixel_values": inputs["pixel_values"][:1]}, max_new_tokens=2)
    assert model.vlmcompress.llm_attention.bias is None
    vc.unpatch(model)
    assert torch.equal(_logits(model, inputs), ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=2, do_sample=False), ref_tokens)
