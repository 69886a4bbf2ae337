"""Stage A: ToMe merging inside CLIP, SigLIP and InternVL vision towers (adapters/vision_merge.py)."""
import math
import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    InternVLVisionConfig,
    InternVLVisionModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import vlmcompress as vc  # noqa: E402
from vlmcompress.adapters.vision_merge import (  # noqa: E402
    install_vision_merge,
    merging_layers,
    tower_schedule,
    tower_tokens_after,
)
from vlmcompress.config import CompressionConfig  # noqa: E402
from vlmcompress.state import grid_positions  # noqa: E402

IMAGE, PATCH, LAYERS = 32, 4, 3
PATCHES = (IMAGE // PATCH) ** 2            # 64
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
             image_size=IMAGE, patch_size=PATCH)
# kind -> (model class, config class, protected prefix)
KINDS = {
    "clip": (CLIPVisionModel, CLIPVisionConfig, 1),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, 0),
    "internvl": (InternVLVisionModel, InternVLVisionConfig, 1),
}


def tower(kind, attn="sdpa", seed=0, zero_pos=False):
    model_cls, config_cls, protected = KINDS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SIZES, attn_implementation=attn)).eval()
    if zero_pos:
        with torch.no_grad():
            emb = model.embeddings
            table = getattr(emb, "position_embedding", None)
            (table.weight if table is not None else emb.position_embeddings).zero_()
    return model, protected


def run(model, pixels):
    with torch.no_grad():
        return model(pixels, output_hidden_states=True)


def snapshot(model):
    """Everything patching could leave behind: hooks and instance attributes of every module."""
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks), tuple(sorted(m.__dict__)))
            for name, m in model.named_modules()}


def two_colour_image(batch=1):
    """Left half one colour, right half another: within a half every patch token is identical."""
    px = torch.empty(batch, 3, IMAGE, IMAGE)
    px[..., : IMAGE // 2] = torch.tensor([0.9, -0.3, 0.2])[:, None, None]
    px[..., IMAGE // 2:] = torch.tensor([-0.5, 0.7, 0.1])[:, None, None]
    return px


PIXELS = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", KINDS)
def test_keep_one_is_bit_exact_and_remove_restores(kind):
    model, protected = tower(kind)
    run(model, PIXELS)                      # transformers installs its output-capture hooks lazily
    before, ref = snapshot(model), run(model, PIXELS)
    handle = install_vision_merge(model, CompressionConfig(), protected=protected, feature_layer=-2)
    assert snapshot(model) != before        # the patch is really there
    out = run(model, PIXELS)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
    handle.remove()
    merging = install_vision_merge(model, CompressionConfig(vision_keep=0.5), protected=protected)
    assert run(model, PIXELS).last_hidden_state.shape[1] < ref.last_hidden_state.shape[1]
    merging.remove()
    merging.remove()                        # idempotent
    assert snapshot(model) == before
    assert torch.equal(run(model, PIXELS).last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("feature_layer", [-1, -2, [-3, -1]], ids=["layer-1", "layer-2", "layers-3-1"])
@pytest.mark.parametrize("keep,ramp", [(0.5, 0.0), (0.25, 0.0), (0.25, 0.5), (0.05, 0.9)],
                         ids=["keep0.5", "keep0.25", "keep0.25-ramp0.5", "keep0.05-ramp0.9"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_token_count_is_closed_form(kind, keep, ramp, feature_layer):
    model, protected = tower(kind)
    cfg = CompressionConfig(vision_keep=keep, vision_ramp=ramp)
    handle = install_vision_merge(model, cfg, protected=protected, feature_layer=feature_layer)
    out = run(model, PIXELS)
    expected = tower_tokens_after(PATCHES, LAYERS, cfg, protected=protected, feature_layer=feature_layer)
    stop = merging_layers(LAYERS, feature_layer)
    lengths = [h.shape[1] - protected for h in out.hidden_states]
    assert lengths[stop:] == [expected] * (LAYERS + 1 - stop)      # the selected state and every later one
    assert lengths[0] == PATCHES
    assert handle.state.num_tokens - protected == expected
    assert sum(handle.schedule) == PATCHES - expected
    if ramp:
        assert handle.schedule == sorted(handle.schedule, reverse=True)   # ToMe's ramp merges more early
    handle.remove()


def test_schedule_reaches_the_target_or_the_halving_floor():
    cfg = CompressionConfig(vision_keep=0.1)
    # LLaVA-1.5's CLIP-L/14-336: 577 tokens, 23 merging layers up to layer -2: exactly ceil(0.1 · 576) = 58 patches.
    assert tower_tokens_after(576, 24, cfg, protected=1, feature_layer=-2) == 58
    assert sum(tower_schedule(577, 23, cfg.replace(vision_ramp=0.5), protected=1)) == 576 - 58
    # One merging layer can at most halve the 64 patches: a lower target is raised to that floor.
    assert tower_tokens_after(64, 2, cfg, protected=1, feature_layer=1) == 32
    assert tower_tokens_after(64, 2, CompressionConfig(), feature_layer=-1) == 64
    assert tower_tokens_after(64, 3, cfg, feature_layer=0) == 64


@pytest.mark.parametrize("kind", KINDS)
def test_proportional_attention_makes_merging_duplicates_exact(kind):
    """DESIGN §3.1: merged tokens with the log-size key bias behave like their repeated sources."""
    model, protected = tower(kind, zero_pos=True)
    px = two_colour_image()
    ref = run(model, px).last_hidden_state
    for proportional in (True, False):
        cfg = CompressionConfig(vision_keep=0.25, proportional_attention=proportional)
        handle = install_vision_merge(model, cfg, protected=protected)
        merged = run(model, px).last_hidden_state
        state = handle.state
        handle.remove()
        assert merged.shape[1] - protected == tower_tokens_after(PATCHES, LAYERS, cfg, protected=protected)
        # every merge joined identical tokens of one half (else the test shows nothing)
        half = (grid_positions((1, 8, 8))[:, 2] >= 4).long()
        src = state.source[0, protected:] - protected
        assert all(half[src == t].unique().numel() == 1 for t in src.unique())
        unmerged = merged.gather(1, state.source.unsqueeze(-1).expand(-1, -1, merged.shape[-1]))
        if proportional:
            torch.testing.assert_close(unmerged, ref, rtol=1e-5, atol=1e-5)
        else:
            assert (unmerged - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_record_sizes_positions_and_protected_prefix(kind):
    model, protected = tower(kind)
    handle = install_vision_merge(model, CompressionConfig(vision_keep=0.3), protected=protected, feature_layer=-2)
    out = run(model, PIXELS)
    state, items = handle.state, handle.states
    handle.remove()
    assert torch.equal(state.x, out.hidden_states[-2])
    assert torch.equal(state.size.sum(1), torch.full((2,), float(PATCHES + protected)))
    if protected:
        assert torch.equal(state.size[:, 0], torch.ones(2)) and torch.equal(state.source[:, 0], torch.zeros(2, dtype=torch.long))
        assert ((state.source[:, 1:] == 0).sum() == 0)
        assert torch.equal(state.pos[:, 0], torch.tensor([[0.0, 0.0, -1.0]] * 2))
    grid = grid_positions((1, 8, 8))
    for b, item in enumerate(items):
        m = item.num_tokens
        assert item.source.shape == (1, PATCHES) and item.x.shape[1] == m == state.num_tokens - protected
        assert torch.equal(item.size[0], torch.bincount(item.source[0], minlength=m).float())
        centroid = torch.zeros(m, 3).index_add_(0, item.source[0], grid) / item.size[0, :, None]
        torch.testing.assert_close(item.pos[0], centroid)
        # tokens stay ordered by the first patch they hold (each maps to an increasing placeholder slot)
        first = torch.full((m,), PATCHES).scatter_reduce(0, item.source[0], torch.arange(PATCHES), reduce="amin")
        assert bool((first[1:] > first[:-1]).all())
        assert torch.equal(item.x[0], state.x[b, protected:])


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_and_eager_agree(kind):
    outs = []
    for attn in ("sdpa", "eager"):
        model, protected = tower(kind, attn=attn)
        handle = install_vision_merge(model, CompressionConfig(vision_keep=0.25), protected=protected)
        outs.append((run(model, PIXELS).last_hidden_state, handle.state.source))
        handle.remove()
    assert torch.equal(outs[0][1], outs[1][1])
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)


def test_batch_equals_singles():
    model, protected = tower("clip")
    handle = install_vision_merge(model, CompressionConfig(vision_keep=0.25, vision_ramp=0.3), protected=protected)
    batch = run(model, PIXELS).last_hidden_state
    for b in range(2):
        single = run(model, PIXELS[b:b + 1]).last_hidden_state
        torch.testing.assert_close(single[0], batch[b], rtol=1e-5, atol=1e-6)
    handle.remove()


def test_unmerge_output_keeps_the_length_for_grid_families():
    model, protected = tower("siglip")
    cfg = CompressionConfig(vision_keep=0.25)
    handle = install_vision_merge(model, cfg, protected=protected, feature_layer=-2, unmerge_output=True)
    out = run(model, PIXELS)
    state = handle.state
    handle.remove()
    lengths = [h.shape[1] for h in out.hidden_states]
    assert lengths[0] == PATCHES and lengths[1] < PATCHES          # layer 0 runs on fewer tokens
    assert lengths[2:] == [PATCHES, PATCHES]                       # the selected state (-2) and after: full length
    assert handle.schedule and sum(handle.schedule) == PATCHES - tower_tokens_after(PATCHES, LAYERS, cfg, feature_layer=-2)
    kept = PATCHES - sum(handle.schedule)
    for b in range(2):   # the selected state holds duplicates of the merged tokens, spread over their patches
        assert out.hidden_states[-2][b].unique(dim=0).shape[0] <= kept
    assert state.num_tokens == PATCHES and torch.equal(state.size, torch.ones(2, PATCHES))
    assert torch.equal(state.x, out.hidden_states[-2])


def test_accelerate_style_forward_is_wrapped_not_replaced():
    """With accelerate's device hooks the layer's real forward is `_old_forward`; wrap that one."""
    model, protected = tower("clip")
    calls = []
    for layer in model.encoder.layers:
        layer._hf_hook = object()
        layer._old_forward = layer.forward

        def device_forward(*args, _layer=layer, **kwargs):
            calls.append(1)
            return _layer._old_forward(*args, **kwargs)
        layer.forward = device_forward
    run(model, PIXELS)
    calls.clear()
    before = snapshot(model)
    handle = install_vision_merge(model, CompressionConfig(vision_keep=0.5), protected=protected)
    out = run(model, PIXELS)
    assert out.last_hidden_state.shape[1] == 1 + tower_tokens_after(PATCHES, LAYERS, CompressionConfig(vision_keep=0.5), protected=1)
    assert len(calls) == LAYERS
    handle.remove()
    assert snapshot(model) == before
    assert all(layer._old_forward.__func__ is type(layer).forward for layer in model.encoder.layers)


def test_errors_are_clear():
    model, protected = tower("clip")
    with pytest.raises(TypeError, match="CLIPEncoderLayer"):
        install_vision_merge(torch.nn.Linear(2, 2), CompressionConfig(vision_keep=0.5), protected=0)
    with pytest.raises(ValueError, match="out of range"):
        install_vision_merge(model, CompressionConfig(vision_keep=0.5), protected=1, feature_layer=-9)
    with pytest.raises(ValueError, match="protected"):
        install_vision_merge(model, CompressionConfig(vision_keep=0.5), protected=-1)
    model.config._attn_implementation = "flash_attention_2"
    before = snapshot(model)
    with pytest.raises(ValueError, match="additive attention mask"):
        install_vision_merge(model, CompressionConfig(vision_keep=0.5), protected=1)
    assert snapshot(model) == before
    handle = install_vision_merge(model, CompressionConfig(vision_keep=0.5, proportional_attention=False), protected=1)
    handle.remove()


# --- LLaVA 1.5 end to end ----------------------------------------------------------------------

def test_llava_generate_with_vision_merge():
    from vlmcompress.testing.tiny_models import tiny_inputs, tiny_model_and_processor

    model, processor = tiny_model_and_processor("llava")
    inputs = tiny_inputs("llava", processor, kind="image", batch=2)
    vision = model.model.vision_tower
    run(vision, inputs["pixel_values"])
    before, ref = snapshot(model), model(**inputs).logits.detach()
    ref_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    vcfg = model.config.vision_config
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    cfg = CompressionConfig(vision_keep=0.5)
    kept = tower_tokens_after(patches, vcfg.num_hidden_layers, cfg, protected=1,
                              feature_layer=model.config.vision_feature_layer)
    assert kept < patches
    with vc.compressed(model, cfg):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        report = model.vlmcompress.report
        sampled = model.generate(**inputs, max_new_tokens=3, do_sample=True, top_k=5)
    assert [i.after_vision for i in report.items] == [kept, kept]
    assert [i.placeholders for i in report.items] == [patches, patches]
    assert report.prefill_after == [n - (patches - kept) for n in report.prefill_before]
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3) and sampled.shape == out.shape
    with vc.compressed(model, cfg.replace(keep_ratio=0.25)):      # stage A, then stage B on the merged tokens
        both = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        report = model.vlmcompress.report
    assert [i.after_vision for i in report.items] == [kept, kept]
    # keep_ratio counts the tokens the LLM would read unpatched, with or without stage A
    assert all(i.after_compress == math.ceil(0.25 * patches) for i in report.items)
    assert both.shape[1] == inputs["input_ids"].shape[1] + 3
    assert snapshot(model) == before
    assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), ref_ids)


@pytest.mark.parametrize("unmerge", [False, True], ids=["merged", "unmerged"])
@pytest.mark.parametrize("kind", KINDS)
def test_layers_after_the_read_one_do_not_run(kind, unmerge):
    """LLaVA reads hidden state -2: under stage A the last layer is not run (it ran at full length
    under unmerge_output), and the state the VLM reads is the same as when it ran."""
    model, protected = tower(kind)
    calls = []
    handle_hook = model_layers(model)[-1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    cfg = CompressionConfig(vision_keep=0.5)
    merge = install_vision_merge(model, cfg, protected=protected, feature_layer=-2, unmerge_output=unmerge)
    out = run(model, PIXELS)
    merge.remove()
    assert calls == []
    assert torch.equal(out.hidden_states[-1], out.hidden_states[-2])   # the unread state repeats the read one
    # Reference: the same merge with the last layer run (read -1 merges one more layer, so compare the
    # read state with a tower whose last layer is cut off).
    del model_layers(model)[-1]
    merge = install_vision_merge(model, cfg, protected=protected, feature_layer=-1, unmerge_output=unmerge)
    ref = run(model, PIXELS)
    merge.remove()
    assert torch.equal(out.hidden_states[-2], ref.hidden_states[-1])
    handle_hook.remove()


def test_keep_one_runs_every_layer():
    model, protected = tower("clip")
    calls = []
    model_layers(model)[-1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    merge = install_vision_merge(model, CompressionConfig(), protected=protected, feature_layer=-2, unmerge_output=True)
    run(model, PIXELS)
    merge.remove()
    assert calls == [1]


def model_layers(model):
    from vlmcompress.adapters.vision_layers import _find_layers

    return _find_layers(model)[1]
