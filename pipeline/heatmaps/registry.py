"""The registry of heatmap methods: one instance per registered class, in the order shown to people.

``register`` is a class decorator; every module in ``pipeline/heatmaps/methods/`` registers its
class when the package is imported. The config's choices, the report's names, the runner's
lookups and the docs table (``method_table``) all read this one registry.
"""

from __future__ import annotations

from typing import TypeVar

from pipeline.heatmaps.base import HeatmapMethod, LastBlockMethod, PathMethod

_METHODS: dict[str, HeatmapMethod] = {}
M = TypeVar("M", bound=type[HeatmapMethod])
_REQUIRED = ("name", "title", "summary", "prefer")


def register(cls: M) -> M:
    """Add a method class to the registry (a class decorator); a name already taken is refused."""
    missing = [a for a in _REQUIRED if not getattr(cls, a, "")]
    if missing:
        raise TypeError(f"heatmap method {cls.__name__} must set {', '.join(missing)}")
    if cls.name in _METHODS:
        raise ValueError(f"heatmap method {cls.name!r} is already registered ({type(_METHODS[cls.name]).__name__})")
    if issubclass(cls, LastBlockMethod) and getattr(cls, "mode", None) not in ("replace", "residual"):
        raise TypeError(f"heatmap method {cls.name!r}: mode must be 'replace' or 'residual'")
    _METHODS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a method (for tests that register one of their own)."""
    _METHODS.pop(name, None)


def method(name: str) -> HeatmapMethod:
    """The registered method called ``name``; an unknown name lists the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown heatmap method {name!r}; the methods are: {', '.join(_METHODS)}") from None


def names(backend: str | None = None) -> tuple[str, ...]:
    """Every registered method's name in display order, or those with a form on ``backend`` (``vit``, ``resnet``)."""
    return tuple(n for n, m in _METHODS.items() if backend is None or backend in m.backends)


def titles() -> dict[str, str]:
    """``{name: the name a person reads}`` in display order."""
    return {n: m.title for n, m in _METHODS.items()}


def _kind(m: HeatmapMethod) -> str:
    if isinstance(m, LastBlockMethod):
        return f"last block, {m.mode}: `{m.equation}`"
    if isinstance(m, PathMethod):
        return "second path over the last `surgery_depth` blocks"
    return "its own input" if m.input != "native" else "stock"


def method_table() -> str:
    """The methods table of ``docs/heatmap-methods.md``, one row per registered method."""
    lines = ["| method | what it changes | how it runs | backends | reads | when to prefer it |",
             "|---|---|---|---|---|---|"]
    for m in _METHODS.values():
        reads = ", ".join(f"`{p}`" for p in m.params) or "-"
        lines.append(f"| `{m.name}` | {m.summary} | {_kind(m)} | {', '.join(m.backends)} | {reads} | {m.prefer} |")
    return "\n".join(lines) + "\n"
