"""Every ``>>>`` example in the package runs: modules are collected, not listed by hand, so a
new module's examples are tested the day it lands."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import sharpmeter


def modules_with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    names = []
    for info in pkgutil.walk_packages(sharpmeter.__path__, "sharpmeter."):
        module = importlib.import_module(info.name)
        if any(test.examples for test in finder.find(module, module=module)):
            names.append(info.name)
    return names


MODULES = modules_with_examples()


def test_the_examples_are_found():
    # a guard against a collector that silently finds nothing
    assert {
        "sharpmeter.measure.schema",
        "sharpmeter.paper.analysis.scaling",
        "sharpmeter.paper.compare",
        "sharpmeter.paper.records",
    } <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
