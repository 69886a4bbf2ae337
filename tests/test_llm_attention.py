"""Proportional attention inside the LLM (CompressionConfig.llm_proportional_attention).

The reference is built here by hand: the *unpatched* language model, called with the very inputs_embeds /
position_ids the patched model gave it, and an explicit 4-D float mask = causal + padding + log(size) of
every key (zero after the prompt). That the bias must sit on the key axis (a per-query bias cancels) is
tested on the operator in test_attention.py.
"""
import pytest
import torch

import vlmcompress as vc
from vlmcompress.adapters.llm_attention import attention_modules
from vlmcompress.adapters.pipeline import prepare_inputs
from vlmcompress.testing.adapter_checks import llm_calls
from vlmcompress.testing.tiny_models import tiny_inputs, tiny_model_and_processor

MERGE = dict(keep_ratio=0.5, budget_method="merge")      # bipartite merging: sizes differ from token to token
FAMILIES = ["llava", "qwen2_vl"]


@pytest.fixture(scope="module")
def tiny():
    cache = {}

    def get(family, attn="sdpa"):
        if (family, attn) not in cache:
            cache[family, attn] = tiny_model_and_processor(family, attn_implementation=attn)
        return cache[family, attn]
    return get


def _config(flag=True, **kw):
    return vc.CompressionConfig(llm_proportional_attention=flag, **kw)


def _record_llm_calls(model):
    """Record the keyword arguments of every call of the LLM (``model.model.language_model``)."""
    return llm_calls(model, record=lambda kwargs: {k: v for k, v in kwargs.items() if k != "cache"})


def _mask(mask2d, past, q_len, log_size, dtype):
    """Hand-built ``[B, 1, q, kv]`` float mask: causal (the queries are the last ``q_len`` of ``kv = past + q_len``
    keys), padding (``mask2d [B, kv]``, or none), and ``log_size [B, L']`` added to the first ``L'`` keys (0 for
    every key after the prompt)."""
    b, kv = log_size.shape[0], past + q_len
    if mask2d is None:
        mask2d = torch.ones(b, kv)
    assert mask2d.shape == (b, kv)
    q_pos = torch.arange(kv - q_len, kv)
    allowed = (torch.arange(kv)[None, :] <= q_pos[:, None])[None, None] & mask2d.bool()[:, None, None, :]
    bias = torch.zeros(b, kv)
    bias[:, :log_size.shape[1]] = log_size
    return torch.where(allowed, bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)


def _replay(model, calls, log_size):
    """Logits of each recorded LLM call, re-run through the unpatched LLM with explicit masks and one cache."""
    from transformers import DynamicCache

    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    out = []
    with torch.no_grad():
        for call in calls:
            kwargs = {k: v for k, v in call.items() if k != "use_cache"}
            x = kwargs["inputs_embeds"]
            past = cache.get_seq_length()
            kwargs["attention_mask"] = _mask(call["attention_mask"], past, x.shape[1], log_size, x.dtype)
            hidden = lm(**kwargs, cache=cache, use_cache=True).last_hidden_state
            out.append(model.lm_head(hidden))
    return out


def _real(inputs_mask, logits):
    """Logits at real (unpadded) positions only: padded query rows see no key at all."""
    return logits.flatten(0, 1) if inputs_mask is None else logits[inputs_mask.bool()]


def _hooks(model):
    return {name: (dict(m._forward_pre_hooks), dict(m._forward_pre_hooks_with_kwargs), dict(m._forward_hooks))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_flag_off_installs_nothing_and_matches_unbiased_reference(family, tiny):
    model, processor = tiny(family)
    inputs = tiny_inputs(family, processor, batch=2)
    before = _hooks(model)
    with vc.compressed(model, _config(False, **MERGE)):
        assert model.vlmcompress.llm_attention is None
        assert _hooks(model) == before
        with _record_llm_calls(model) as calls, torch.no_grad():
            logits = model(**inputs).logits
    zeros = torch.zeros(logits.shape[:2])
    ref = _replay(model, calls, zeros)[0]
    mask = calls[0]["attention_mask"]
    torch.testing.assert_close(_real(mask, logits), _real(mask, ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_merged_is_bit_identical_to_unpatched(family, tiny):
    model, processor = tiny(family)
    inputs = tiny_inputs(family, processor, batch=2)
    with torch.no_grad():
        ref = model(**inputs).logits
        with vc.compressed(model, _config()):
            out = model(**inputs).logits
            report = model.vlmcompress.report
            assert model.vlmcompress.llm_attention is not None
            assert model.vlmcompress.llm_attention.bias is None          # every size is 1: log 1 = 0
    assert torch.equal(report.token_size, torch.ones_like(report.token_size))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_size_puts_each_item_size_on_its_packed_tokens(family, tiny):
    model, processor = tiny(family)
    inputs = tiny_inputs(family, processor, batch=2)
    with vc.compressed(model, _config(**MERGE)):
        new, report = prepare_inputs(model.vlmcompress.adapter, _config(**MERGE), dict(inputs))
    visual = new["input_ids"] == model.config.image_token_id
    for row in range(2):
        sizes = torch.cat([i.size for i in report.items if i.row == row]).float()
        assert torch.equal(report.token_size[row][visual[row]], sizes)
        assert (report.token_size[row][~visual[row]] == 1).all()
        assert int(sizes.sum()) == int((inputs["input_ids"][row] == model.config.image_token_id).sum())
    assert (report.token_size > 1).any()


@pytest.mark.parametrize("family,batch", [("llava", 1), ("qwen2_vl", 2), ("llava", 2)],
                         ids=["llava-B1", "qwen2_vl-B2", "llava-B2"])
def test_prefill_matches_hand_built_reference(family, batch, tiny):
    model, processor = tiny(family)
    inputs = tiny_inputs(family, processor, batch=batch)
    with vc.compressed(model, _config(**MERGE)):
        with _record_llm_calls(model) as calls, torch.no_grad():
            logits = model(**inputs).logits
        log_size = model.vlmcompress.report.token_size.log()
    mask = calls[0]["attention_mask"]
    ref = _replay(model, calls, log_size)[0]
    unbiased = _replay(model, calls, torch.zeros_like(log_size))[0]
    torch.testing.assert_close(_real(mask, logits), _real(mask, ref), rtol=1e-5, atol=1e-5)
    # ...and the bias did something: without it the logits are measurably different.
    assert (_real(mask, logits) - _real(mask, unbiased)).abs().max() > 1e-3


@pytest.mark.parametrize("family,batch", [("llava", 2), ("qwen2_vl", 1)], ids=["llava-B2", "qwen2_vl-B1"])
def test_generate_with_cache_matches_manual_decoding_with_the_same_bias(family, batch, tiny):
    model, processor = tiny(family)
    inputs = tiny_inputs(family, processor, batch=batch)
    steps = 4
    with vc.compressed(model, _config(**MERGE)):
        with _record_llm_calls(model) as calls, torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        log_size = model.vlmcompress.report.token_size.log()
        assert model.vlmcompress.llm_attention.bias is not None
    assert len(calls) == steps and calls[1]["inputs_embeds"].shape[1] == 1       # one prefill, then one token a step
    ref = _replay(model, calls, log_size)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    for t in range(steps):
        torch.testing.assert_close(out.logits[t], ref[t][:, -1], rtol=1e-5, atol=1e-5)
        assert torch.equal(ref[t][:, -1].argmax(-1), new_tokens[:, t])


def test_sdpa_and_eager_agree(tiny):
    sdpa, processor = tiny("llava", "sdpa")
    eager, _ = tiny("llava", "eager")
    inputs = tiny_inputs("llava", processor, batch=2)
    out = {}
    for name, model in (("sdpa", sdpa), ("eager", eager)):
        with vc.compressed(model, _config(**MERGE)), torch.no_grad():
            logits = model(**inputs).logits
            seq = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        out[name] = (logits, seq)
    # Left padding: the last position is real in every row (padded query rows differ by design).
    torch.testing.assert_close(out["sdpa"][0][:, -1], out["eager"][0][:, -1], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["sdpa"][1], out["eager"][1])


def test_text_only_call_after_an_image_call_has_no_bias(tiny):
    model, processor = tiny("llava")
    inputs = tiny_inputs("llava", processor, batch=2)
    text = {"input_ids": inputs["input_ids"][:, -6:], "attention_mask": inputs["attention_mask"][:, -6:]}
    with torch.no_grad():
        ref = model(**text).logits
        with vc.compressed(model, _config(**MERGE)):
            model(**inputs)
            assert model.vlmcompress.llm_attention.bias is not None
            out = model(**text).logits
            assert model.vlmcompress.llm_attention.bias is None
    assert torch.equal(out, ref)


def test_generate_with_several_sequences_per_prompt_repeats_the_bias(tiny):
    model, processor = tiny("llava")
    inputs = tiny_inputs("llava", processor, batch=2)
    with vc.compressed(model, _config(**MERGE)), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=3)
        bias = model.vlmcompress.llm_attention.bias
        expected = model.vlmcompress.report.token_size.log().repeat_interleave(3, 0)
    assert out.shape[0] == 6
    assert torch.equal(bias, expected)


def test_unpatch_and_config_changes_remove_every_hook(tiny):
    model, processor = tiny("qwen2_vl")
    inputs = tiny_inputs("qwen2_vl", processor, batch=1)
    before = _hooks(model)
    n_attn = len(attention_modules(model.model.language_model))
    assert n_attn == model.config.get_text_config().num_hidden_layers
    vc.patch(model, _config(**MERGE))
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    added = sum(len(m._forward_pre_hooks) for m in model.modules()) - sum(len(h[0]) for h in before.values())
    assert added == n_attn + 1                      # every attention module and the LLM itself
    model.vlmcompress.config = _config(False, **MERGE)    # flag off on a patched model: hooks go
    assert _hooks(model) == before and model.vlmcompress.llm_attention is None
    model.vlmcompress.config = _config(**MERGE)           # and come back
    assert _hooks(model) != before
    vc.unpatch(model)
    assert _hooks(model) == before


def test_attention_without_additive_mask_is_refused(tiny):
    model, processor = tiny("llava")
    inputs = tiny_inputs("llava", processor, batch=1)
    before = _hooks(model)
    model.set_attn_implementation("flex_attention")
    try:
        with pytest.raises(ValueError, match="llm_proportional_attention.*flex_attention"):
            vc.patch(model, _config(**MERGE))
        assert not vc.is_patched(model) and _hooks(model) == before
        with vc.compressed(model, _config(False, **MERGE)):        # without the flag flex attention is fine
            with pytest.raises(ValueError, match="flex_attention"):
                model.vlmcompress.config = _config(**MERGE)
            assert model.vlmcompress.llm_attention is None and not model.vlmcompress.config.llm_proportional_attention
        model.set_attn_implementation("sdpa")
        with vc.compressed(model, _config(**MERGE)), torch.no_grad():   # switched after patching: refused at call time
            model(**inputs)
            model.set_attn_implementation("flex_attention")
            # (Called directly: a whole forward would spend ~15 s building flex's block mask first.)
            attn = model.model.language_model.layers[0].self_attn
            with pytest.raises(ValueError, match="flex_attention"):
                attn(hidden_states=torch.zeros(1, 1, model.config.get_text_config().hidden_size),
                     position_embeddings=None, attention_mask=None)
    finally:
        model.set_attn_implementation("sdpa")
    assert _hooks(model) == before
