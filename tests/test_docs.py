"""The runnable examples in the docstrings of the public modules run and print what they show."""

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["lit_meta.backends", "lit_meta.functional", "lit_meta.learners"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
