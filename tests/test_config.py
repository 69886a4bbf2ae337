import pytest

import vlmcompress as vc
from vlmcompress.config import PRESETS


def test_default_is_identity():
    assert vc.CompressionConfig().is_identity
    assert not vc.CompressionConfig(keep_ratio=0.5).is_identity
    assert not vc.CompressionConfig(v2pe_delta=0.5).is_identity


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_overridable(name):
    cfg = vc.CompressionConfig.preset(name, pool_tau=0.05)
    assert cfg.pool_tau == 0.05
    assert cfg.replace(pool_tau=0.01) == PRESETS[name].replace(pool_tau=0.01)


def test_unknown_preset_names_the_presets():
    with pytest.raises(ValueError, match="balanced"):
        vc.CompressionConfig.preset("fastest")


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_ratio": 0.0}, "keep_ratio"),
    ({"keep_ratio": 1.5}, "keep_ratio"),
    ({"keep_ratio": float("nan")}, "keep_ratio"),
    ({"vision_keep": -0.1}, "vision_keep"),
    ({"temporal_keep": 2}, "temporal_keep"),
    ({"vision_ramp": 1.0}, "vision_ramp"),
    ({"temporal_threshold": 1.5}, "temporal_threshold"),
    ({"temporal_threshold": 0.9, "temporal_keep": 0.5}, "only one"),
    ({"token_budget": 0}, "token_budget"),
    ({"token_budget": 3.5}, "token_budget"),
    ({"budget_method": "drop"}, "budget_method"),
    ({"pool_tau": 0}, "pool_tau"),
    ({"v2pe_delta": 0}, "v2pe_delta"),
    ({"v2pe_delta": 2}, "v2pe_delta"),
    ({"v2pe_delta": True}, "v2pe_delta"),
    ({"pool_tau": True}, "pool_tau"),
    ({"vision_ramp": False}, "vision_ramp"),
    ({"temporal_threshold": True}, "temporal_threshold"),
])
def test_bad_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vc.CompressionConfig(**kwargs)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="proportional_attention"):
        vc.CompressionConfig(proportional_attention="yes")
    with pytest.raises(TypeError, match="relevance"):
        vc.CompressionConfig(relevance="clip")


def test_config_is_immutable():
    cfg = vc.CompressionConfig()
    with pytest.raises(AttributeError):
        cfg.keep_ratio = 0.5
