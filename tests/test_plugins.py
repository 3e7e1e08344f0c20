"""AUTOPEFT_PLUGINS: modules imported before any method or backbone look-up (tests/search/test_plugin_method.py
runs one through a search)."""

from __future__ import annotations

import pytest

from autopeft.errors import ConfigError
from autopeft.peft import registered_methods


def test_a_plugin_that_cannot_be_imported_is_named_with_the_variable(monkeypatch):
    monkeypatch.setenv("AUTOPEFT_PLUGINS", "json, autopeft_no_such_plugin")
    with pytest.raises(ConfigError, match=r"AUTOPEFT_PLUGINS names 'autopeft_no_such_plugin', which cannot be imported"):
        registered_methods()
    monkeypatch.setenv("AUTOPEFT_PLUGINS", " json ,")
    assert "lora" in registered_methods()
