"""The public surface: ``__all__`` lists exactly the public names, and the errors form one tree."""

from __future__ import annotations
import __future__

import inspect
import re

import pytest

import instrument
import instrument.testing
from instrument import exceptions


def _public_names(module) -> list[str]:
    """Names a user of ``module`` may rely on: no underscore, no submodule, no future flag.

    ``dir()`` rather than ``vars()``: ``instrument`` loads the recorder lazily.
    """
    return sorted(
        name
        for name in dir(module)
        if (not name.startswith("_") or name == "__version__")
        and not inspect.ismodule(getattr(module, name))
        and not isinstance(getattr(module, name), __future__._Feature)
    )


@pytest.mark.parametrize("module", [instrument, exceptions])
def test_all_lists_the_public_names(module) -> None:
    """``__all__`` equals the module's public names, sorted."""
    assert module.__all__ == _public_names(module)


def test_testing_exports_what_it_defines() -> None:
    """``instrument.testing.__all__`` lists every public function and constant it defines."""
    module = instrument.testing
    defined = sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (getattr(value, "__module__", None) == module.__name__ or name.isupper())
    )
    assert module.__all__ == defined


def test_every_public_name_is_documented() -> None:
    """Each public function and class of ``instrument`` has a docstring."""
    for name in instrument.__all__:
        value = getattr(instrument, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name


def _drawn_tree() -> dict[str, str | None]:
    """The hierarchy drawn in the docstring of ``instrument.exceptions``: name -> parent."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in exceptions.__doc__.splitlines():
        match = re.match(r"^(\s*(?:[│ ]*[├└]── )?)([A-Z]\w*Error)\b", line)
        if not match:
            continue
        depth = len(match.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[match.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, match.group(2)))
    return parents


def test_exception_hierarchy_matches_its_drawing() -> None:
    """Every error is drawn in the ``exceptions`` docstring, under its real base class."""
    drawn = _drawn_tree()
    assert sorted(drawn) == sorted(exceptions.__all__)
    for name, parent in drawn.items():
        cls = getattr(exceptions, name)
        expected_base = getattr(exceptions, parent) if parent else Exception
        assert cls.__bases__ == (expected_base,), name


def test_all_errors_share_one_base() -> None:
    """Catching ``PoolscopeError`` catches every error poolscope raises, and the store errors
    are ``StoreError``s."""
    for name in exceptions.__all__:
        cls = getattr(exceptions, name)
        assert issubclass(cls, instrument.PoolscopeError)
        assert getattr(instrument, name) is cls
        if name.startswith("Store") or name == "ForeignStoreError":
            assert issubclass(cls, instrument.StoreError)
