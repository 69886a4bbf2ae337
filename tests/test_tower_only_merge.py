"""Stage A for families whose code needs the full patch grid after the tower (LLaVA-NeXT, OneVision,
InternVL): the tower merges and runs on fewer tokens, its output is spread back to every patch."""
import pytest
import torch

import vlmcompress as vc
from vlmcompress.testing.tiny_models import tiny_inputs, tiny_model_and_processor

FAMILIES = ["llava_next", "llava_onevision", "internvl"]


def _encoder_layers(model):
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    return tower.encoder.layer if hasattr(tower.encoder, "layer") else tower.encoder.layers


def _hooks(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__)
            for name, m in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_runs_on_fewer_tokens_llm_reads_the_usual_count(family):
    model, processor = tiny_model_and_processor(family)
    inputs = tiny_inputs(family, processor, kind="image", batch=1)
    with torch.no_grad():
        ref = model(**inputs).logits
    before = _hooks(model)      # after a first forward: transformers adds its output-recording hooks lazily
    seen = []
    # The first layer merges between its attention and its MLP, so its MLP reads the merged tokens.
    mlp = _encoder_layers(model)[0].mlp
    grab = mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    try:
        with vc.compressed(model, vc.CompressionConfig(vision_keep=1.0)):
            with torch.no_grad():
                same = model(**inputs).logits
        full = seen[-1]
        with vc.compressed(model, vc.CompressionConfig(vision_keep=0.5)):
            with torch.no_grad():
                merged = model(**inputs).logits
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            report = model.vlmcompress.report
    finally:
        grab.remove()
    assert torch.equal(same, ref)                       # vision_keep = 1 is the identity
    assert min(seen) < full                              # the tower ran on merged tokens
    assert merged.shape == ref.shape                     # the LLM read the usual count
    assert report.prefill_after == report.prefill_before
    assert not torch.equal(merged, ref)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)
    assert _hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
