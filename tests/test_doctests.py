"""Every docstring example in the library runs and prints what it shows."""
import doctest
import importlib
import pkgutil

import pytest

import prune
import sparse_ops


def _modules():
    for pkg in (prune, sparse_ops):
        yield pkg.__name__
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                yield info.name


@pytest.mark.parametrize("name", sorted(_modules()))
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
