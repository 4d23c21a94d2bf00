"""The config reference, ``docs/config.md``, generated from the config dataclasses.

Each key's name, type and default come from the dataclass field, and its meaning from
the comment beside the field in the source, so the reference cannot drift from the code
(a test compares the file with what this writes). Regenerate it with::

    python runall.py config-reference > docs/config.md
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Mapping, Sequence

FIELD = re.compile(r"^\s+(\w+):[^=#]*(?:=[^#]*)?(?:#\s*(.*))?$")

HEADER = """# Config reference

Generated from the config dataclasses by `python runall.py config-reference > docs/config.md`; a test fails when
this file differs from what that command writes. Do not edit it by hand: change the comment beside the field.

Configs are YAML (see `configs/`). Precedence is command-line options and `--set KEY=VALUE`, then the YAML file,
then a preset's keys, then these defaults; for a stage command, the run's `run.yaml` stands in for the defaults.
An unknown key or a wrong type is an error that names the key and where it came from. Numbers may be written
in scientific notation (`1e-2`). The resolved config is saved in the run directory as `run.yaml`.
"""


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of ``cls``'s source and its bases'."""
    names, out = {f.name for f in dataclasses.fields(cls)}, {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's comment wins
        for line in inspect.getsource(klass).splitlines():
            m = FIELD.match(line)
            if m and m.group(1) in names and (m.group(2) or m.group(1) not in out):
                out[m.group(1)] = (m.group(2) or "").strip()
    return out


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return f'"{value}"' if value == "" or value.strip() != value else value
    return repr(value)


def _type(hint: object) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " \\| ".join(_yaml(a) for a in typing.get_args(hint))
    text = getattr(hint, "__name__", None) if origin is None else None
    return text or str(hint).replace("typing.", "").replace("|", "\\|")


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, meaning)`` for every leaf key of ``cls``, sections expanded in place."""
    comments, hints, out = field_comments(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(rows(hint, f"{prefix}{f.name}."))
            continue
        out.append((f"{prefix}{f.name}", _type(hint), _yaml(_default(f)), comments.get(f.name, "")))
    return out


def config_reference(config: type, presets: Mapping[str, Mapping[str, Mapping[str, object]]],
                     choices: Mapping[str, Sequence[str]] | None = None) -> str:
    """The whole of ``docs/config.md``, for the run's config class (``stages.RunConfig``), its presets and the keys
    whose values a registry holds (``stages.config_choices()``); the library does not import the stages, so the
    caller passes them."""
    lines = [HEADER, "## Presets", "", "`preset: NAME` (or `--preset NAME`) starts from these ascend keys:", ""]
    lines += ["| preset | keys |", "|---|---|"]
    for name, keys in presets.items():
        flat = [f"`{section}.{k}: {_yaml(v)}`" for section, values in keys.items() for k, v in values.items()]
        lines.append(f"| `{name}` | {', '.join(flat) or 'the defaults below (the original scripts)'} |")
    section = None
    for key, kind, default, meaning in rows(config):
        top = key.split(".")[0] if "." in key else ""
        if top != section:
            section = top
            lines += ["", f"## `{top}`" if top else "## Top level", "", "| key | type | default | meaning |",
                      "|---|---|---|---|"]
        if choices and key in choices:
            meaning = f"{meaning}; choices: {', '.join(f'`{c}`' for c in choices[key])}"
        cell = meaning.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | `{default}` | {cell} |")
    return "\n".join(lines) + "\n"
