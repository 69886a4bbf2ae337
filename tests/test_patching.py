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
