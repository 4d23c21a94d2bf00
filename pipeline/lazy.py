"""Modules imported when first used, so a command that only reads a run never loads torch.

Importing torch (and kornia with it) costs about 1.5 s and 600 MiB before any work. ``status``, a
rerun with nothing to do and ``--help`` need none of it, but they import the stages, whose
modules name torch at the top. Those modules bind it as ``torch = lazy_module("torch")``: the name
is the module itself to every caller, and the import happens at the first attribute read.

A module whose import itself needs torch (a class that subclasses one of torch's, a decorator
applied when the module loads) is imported inside the function that uses it instead.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands in for the module ``name`` and imports it at the first attribute read."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        module = self._module
        if module is None:
            module = self._module = importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}{'' if self._module is None else ' (imported)'}>"


def lazy_module(name: str) -> Any:
    """``name`` (e.g. ``"torch.nn.functional"``), imported at the first attribute read.

    Example:
        >>> F = lazy_module("json")
        >>> F.dumps([1])
        '[1]'
    """
    return LazyModule(name)
