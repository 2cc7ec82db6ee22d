"""The docstring examples of the reducers run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "_common",
    "accessor",
    "agop",
    "alignment",
    "cka",
    "collapse",
    "fle",
    "gram",
    "spectrum",
    "surrogate",
    "target_linearity",
    "vc",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"gramlin_analyze.reducers.{name}")
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
