"""Webdataset tar shards as input: every sample an image of the run, read straight from its bytes in the shard.

A shard is a tar file, as img2dataset and clip-retrieval write them. A sample is the members that share a key:
the member's path up to the first dot of its file name (``a/b.c.jpg`` has the key ``a/b``), as webdataset groups
them. A sample's image is its first member with an image extension; its ``.json`` and ``.txt`` members are its
metadata, kept in the run (the caption is the ``.txt`` text, else the JSON's ``caption`` or ``text``).

``--input`` names shards by a brace pattern (``shards/{00000..00099}.tar``, ``{a,b}``), one ``.tar`` file, or a
folder, whose ``.tar`` files are read as shards beside its loose images. Each shard's member list is read once, at
discovery (the tar headers only); an image is then read by its byte offset, so batches, resume and checksums work
per sample. The sample's path, ``SHARD::OFFSET:SIZE::MEMBER``, says all of that; its path relative to the input
root is ``SHARD_REL/MEMBER``, which gives its stable id. A shard that cannot be read is one input that fails with
the reason, so the run goes on and says so.

This reader was chosen over the ``webdataset`` package, whose pipeline streams a shard from the start (no reading
one sample by itself, as resume and batching need); ``tests/benchmarks/shards.py`` measures both.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath

TAR_SEP = "::"  # between a shard, a sample's byte range and its member's name, in the sample's path
SHARD_SUFFIX = ".tar"
META_SUFFIXES = (".json", ".txt")


class ShardError(ValueError):
    """A shard, or a sample of one, cannot be read; the message says why."""


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern names, in order: ``{00000..00002}`` (zero-padded as written), ``{a,b}``, nested
    or several in one pattern.

    Example:
        >>> expand_braces("s/{000..002}.tar")
        ['s/000.tar', 's/001.tar', 's/002.tar']
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [str(k).zfill(width) for k in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [name for part in parts for name in expand_braces(head + part + tail)]


def is_pattern(text: str) -> bool:
    return "{" in text and "}" in text


def sample_path(shard: Path, offset: int, size: int, member: str) -> str:
    return f"{shard}{TAR_SEP}{offset}:{size}{TAR_SEP}{member}"


def shard_group(path: str) -> str:
    """What an image is read from, to keep a shard's samples together (torchrun's split): its shard, or the path."""
    return path.split(TAR_SEP)[0] if TAR_SEP in path else path


def split_sample(path: str) -> tuple[str, int, int, str] | None:
    """``(shard, offset, size, member)`` of a sample's path, or ``None`` for a plain file (or a shard that failed
    to list, ``SHARD::``)."""
    parts = path.split(TAR_SEP)
    if len(parts) != 3 or not parts[0].endswith(SHARD_SUFFIX):
        return None
    span = re.fullmatch(r"(\d+):(\d+)", parts[1])
    return (parts[0], int(span.group(1)), int(span.group(2)), parts[2]) if span else None


def broken_shard(path: str) -> str | None:
    """The shard of a path that stands for a shard that could not be listed (``SHARD::``), else ``None``."""
    return path[: -len(TAR_SEP)] if path.endswith(SHARD_SUFFIX + TAR_SEP) else None


def read_sample(path: str) -> bytes:
    """A sample's image bytes, read by offset from its shard.

    Raises:
        ShardError: the shard is missing or shorter than the sample.
    """
    shard, offset, size, member = split_sample(path)
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except OSError as err:
        raise ShardError(f"its shard cannot be read: {err.strerror or err}") from None
    if len(data) != size:
        raise ShardError(f"its shard is cut short: {member} needs {size} bytes at {offset}, {len(data)} are there")
    return data


def _key(member: str) -> tuple[str, str]:
    """A member's sample key and extension, as webdataset splits them (at the first dot of the file name)."""
    p = PurePosixPath(member)
    stem, dot, ext = p.name.partition(".")
    return str(p.parent / stem) if str(p.parent) != "." else stem, ext.lower() if dot else ""


def list_shard(shard: Path, image_extensions: tuple[str, ...]) -> list[tuple[str, int, int, dict]]:
    """A shard's samples in order: ``(image member, offset, size, metadata)``; samples without an image are skipped.

    Raises:
        ShardError: the shard is not a tar file, or is cut short in its headers.
    """
    images: dict[str, tuple[str, int, int]] = {}
    meta: dict[str, dict] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _key(info.name)
                if ("." + ext).endswith(image_extensions) and key not in images:
                    images[key] = (info.name, info.offset_data, info.size)
                elif ("." + ext).endswith(META_SUFFIXES):
                    f = tar.extractfile(info)
                    text = f.read().decode("utf-8", "replace") if f else ""
                    meta.setdefault(key, {})[ext] = _parsed(text, ext)
    except FileNotFoundError:
        raise ShardError("no such shard") from None
    except (tarfile.TarError, OSError, EOFError) as err:
        raise ShardError(f"not a readable tar shard ({err})") from None
    return [(member, offset, size, meta.get(key, {})) for key, (member, offset, size) in images.items()]


def _parsed(text: str, ext: str) -> object:
    if ext.endswith("json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text.strip()


def caption_of(ref) -> str:
    """An image's caption: a shard sample's, from its metadata (``ImageRef.meta``); "" for any other image."""
    return caption(json.loads(ref.meta)) if ref.meta else ""


def caption(meta: dict) -> str:
    """A sample's caption from its metadata: the ``.txt`` text, else the JSON's ``caption`` or ``text``."""
    for ext, value in meta.items():
        if ext.endswith("txt") and isinstance(value, str) and value:
            return value
    for ext, value in meta.items():
        if ext.endswith("json") and isinstance(value, dict):
            for k in ("caption", "text"):
                if isinstance(value.get(k), str):
                    return value[k]
    return ""
