"""The transformers compatibility list: its probes hold on the installed release, and an untested release
gets exactly one warning."""
import warnings

import pytest

from vlmcompress.adapters import compat


def test_the_list_names_every_behaviour_with_its_user():
    assert len(compat.BEHAVIOURS) >= 15
    assert len({b.name for b in compat.BEHAVIOURS}) == len(compat.BEHAVIOURS)
    assert all(b.used_by and b.assumption for b in compat.BEHAVIOURS)


@pytest.mark.parametrize("behaviour", [b for b in compat.BEHAVIOURS if b.probe is not None], ids=lambda b: b.name)
def test_probe_holds_on_the_installed_release(behaviour):
    assert behaviour.probe(), f"transformers changed: {behaviour.assumption} (used by {behaviour.used_by})"


def test_probes_can_fail():
    assert not compat._has("transformers.models.llava.modeling_llava", "NoSuchClass")()
    assert not compat._params("transformers.models.llava.modeling_llava", "LlavaModel", "forward", "no_such_arg")()


@pytest.mark.parametrize("version,inside", [("5.24.0", True), ("5.24.3", True), ("5.25.0", False),
                                            ("5.25.0.dev0", False), ("5.23.9", False), ("6.0.0", False),
                                            ("5.24.0+cu", True)])
def test_tested_range(version, inside):
    assert compat.in_tested_range(version) is inside


def test_untested_version_warns_once(monkeypatch):
    monkeypatch.setattr(compat, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"tested with transformers >=5.24.0,<5.25.0, found 9.9.9"):
        assert compat.check_transformers_version("9.9.9") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.check_transformers_version("9.9.9") is False      # no second warning
        assert compat.check_transformers_version("5.24.0") is True
