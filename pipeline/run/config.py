"""Typed, validated configuration built from YAML, ``--set`` overrides and dataclass defaults.

A config is a tree of frozen dataclasses. ``build_config`` turns a plain mapping into
that tree, and every error names the key, the file it came from and what is valid.
Precedence is the caller's: merge the layers with ``merge`` (later wins), then build.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Union

import yaml


# The stages in run order. It lives here, beside the config, so that the command line can name them
# without importing the stages (and torch); ``stages.STAGES`` is checked against it.
STAGE_NAMES: tuple[str, ...] = ("ascend", "decode", "surgery", "rank", "export", "report")


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key, where, and what is valid."""


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; a missing file, bad YAML or a non-mapping is a ``ConfigError``."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(items: list[str]) -> dict:
    """``["ascend.iterations=50", "seed=3"]`` -> nested mapping; values are parsed as YAML."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. ascend.iterations=50")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return out


def merge(base: dict, override: dict) -> dict:
    """Deep merge of two mappings; ``override`` wins."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(obj: Any) -> Any:
    """Plain YAML-able data from a config tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def build_config(cls: type, data: dict, source: str, _path: str = "", sources: Mapping[str, str] | None = None) -> Any:
    """Build dataclass ``cls`` from ``data``, checking every key and type.

    Args:
        cls: a (frozen) dataclass whose fields may be other dataclasses.
        data: the mapping, e.g. merged YAML and overrides.
        source: where the data came from, for messages (a file name).
        sources: where each dotted key came from when the layers differ (``"--set ascend.lr"``,
            ``"configs/demo.yaml"``); a key not in it came from ``source``.

    Raises:
        ConfigError: on an unknown key, a wrong type, or a value ``__post_init__`` rejects; the
            message names the key and where it came from.
    """
    sources = sources or {}

    def where(key: str) -> str:
        return sources.get(key, source)

    if not isinstance(data, dict):
        raise ConfigError(f"{where(_path.rstrip('.'))}: '{_path.rstrip('.') or '<top>'}' must be a mapping, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where(_path + unknown[0])}: unknown key '{_path}{unknown[0]}'. Valid keys"
            f"{' in ' + repr(_path.rstrip('.')) if _path else ''}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_config(tp, value if value is not None else {}, source, f"{_path}{name}.", sources)
        else:
            kwargs[name] = _coerce(value, tp, where(f"{_path}{name}"), f"{_path}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        named = re.match(r"([\w.]+) ", str(err))  # checks name their key first: "ascend.iterations must be >= 1"
        raise ConfigError(f"{where(named.group(1)) if named else source}: {err}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: in '{_path.rstrip('.') or '<top>'}': {err}") from None


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, tp: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: '{key}' got {_describe(value)}, "
                          f"expected {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {_describe(value)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, got {_describe(value)}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, source, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 (PyYAML) reads 1e-2 as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, got {_describe(value)}")
        return value
    raise TypeError(f"config field '{key}' has unsupported type {tp!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def require(condition: bool, message: str) -> None:
    """For ``__post_init__`` checks: raise ``ConfigError(message)`` unless ``condition``."""
    if not condition:
        raise ConfigError(message)


def resolve_config(cls: type, config_file: Path | None, base: dict, cli: dict, overrides: list[str] | None,
                   base_source: str = "run.yaml", presets: Mapping[str, dict] | None = None) -> Any:
    """Build ``cls`` from its defaults under ``base`` (a saved run config, or ``{}``), then the YAML
    file, then CLI options (``None`` values are ignored), then ``--set`` overrides; later layers win.

    An error names the layer its key came from: ``base_source``, the file, ``--<option>`` or ``--set KEY``.
    When the merged layers name a ``preset`` (one of ``presets``), its values sit between the
    defaults and every layer: a preset fills only the keys no layer sets.
    """
    cli = {k: v for k, v in cli.items() if v is not None}
    sets = parse_overrides(overrides or [])
    layers = [(base, lambda k: base_source)]
    if config_file is not None:
        layers.append((load_yaml(config_file), lambda k: str(config_file)))
    layers += [(cli, lambda k: f"--{k.replace('_', '-')}"), (sets, lambda k: f"--set {k}")]
    data: dict = {}
    sources: dict[str, str] = {}
    for layer, label in layers:
        data = merge(data, layer)
        for key in _dotted(layer):
            sources[key] = label(key)
    preset = data.get("preset")
    if presets and preset is not None:
        if preset not in presets:
            raise ConfigError(f"{sources.get('preset', 'defaults')}: unknown preset {preset!r}; "
                              f"choose one of: {', '.join(presets)}")
        named = f"preset {preset} (from {sources.get('preset')})"
        for key in _dotted(presets[preset]):
            sources.setdefault(key, named)
        data = merge(presets[preset], data)  # a preset fills only the keys no layer sets
    return build_config(cls, data, "defaults", sources=sources)


def _dotted(data: Mapping, prefix: str = "") -> list[str]:
    """Every key of a nested mapping, sections included, as dotted paths."""
    out = []
    for key, value in data.items():
        out.append(prefix + key)
        if isinstance(value, Mapping):
            out += _dotted(value, f"{prefix}{key}.")
    return out
