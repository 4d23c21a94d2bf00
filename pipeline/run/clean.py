"""A clean finish, remembered: a rerun with nothing to do skips without holding the manifest.

When a run ends with every image done in every per-image stage it ran and every whole-run stage done,
``clean.json`` records what that finish left: the identities (size, inode, modification time) of the image list
and of the manifest, a hash of the whole config, the stages run, the installed clipsight's version, the hashes of
the whole-run stages' stamp files, and the digest of what each whole-run stage read of the per-image outputs.

A later run whose start matches all of that has nothing to redo unless an output was damaged since: ``unchanged``
checks every output's size as it streams the manifest, holding no record, and the whole-run stages take their
digests from it (``StageContext.read_digest``) instead of reading every image's state. So the memory of a rerun
with nothing to do does not grow with the manifest.

Anything that writes the manifest (a redone or failed image, ``import``, ``status --verify`` finding damage)
changes its identity, and the next run takes the usual path. The manifest stays append-only: ``clean.json`` keeps
which of its lines hold the latest done record of an image's output (a bit per line, compressed), so the stream
checks those and passes over the records they superseded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import zlib
from importlib.metadata import PackageNotFoundError, version as package_version
from typing import Iterable, Iterator, Mapping

from pipeline.run.manifest import is_record
from pipeline.run.rundir import EXPORT_STAMP, IMAGES, MANIFEST, SHARDS, STAMPS, RunDir, atomic_write_json, read_json

CLEAN = "clean.json"


def _ident(run: RunDir, name: str) -> list[int] | None:
    try:
        st = os.stat(run.file(name))
    except OSError:
        return None
    return [st.st_size, st.st_ino, st.st_mtime_ns]


def _sha(run: RunDir, name: str) -> str | None:
    try:
        return hashlib.sha1(run.file(name).read_bytes()).hexdigest()
    except OSError:
        return None


def clean_key(run: RunDir, config: Mapping, names: list[str]) -> dict:
    """What must be as it was for a rerun to count as unchanged: see the module's notes."""
    try:
        code = package_version("clipsight")
    except PackageNotFoundError:
        code = "unknown"
    blob = json.dumps(config, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8")
    return {"images": _ident(run, IMAGES), "manifest": _ident(run, MANIFEST), "stages": list(names), "code": code,
            "config": hashlib.sha1(blob).hexdigest(), "stamps": _sha(run, STAMPS), "export": _sha(run, EXPORT_STAMP)}


def _shards(run: RunDir) -> bool:
    folder = run.file(SHARDS)
    return folder.is_dir() and any(folder.glob("rank-*.jsonl"))


def _saved(run: RunDir) -> tuple[dict, bytes] | None:
    """``clean.json`` and its lines' bits, when it is whole and the manifest is still the one it describes."""
    saved = read_json(run.file(CLEAN))
    if not isinstance(saved, dict) or _shards(run) or not isinstance(saved.get("key"), dict):
        return None
    if saved["key"].get("manifest") != _ident(run, MANIFEST):
        return None
    try:
        return saved, zlib.decompress(base64.b64decode(saved["lines"]))
    except (KeyError, TypeError, ValueError, zlib.error):
        return None


def unchanged(run: RunDir, config: Mapping, names: list[str], log: logging.Logger | None = None) -> dict | None:
    """The last clean finish's record (``{"images": n, "reads": {stage: digest}, "produced": bool, ...}``, with
    ``human``, how many of the latest records are a reviewer's labels) when the run is as that finish left it and
    no output has been damaged since; ``None`` when the run must take the usual path."""
    got = _saved(run)
    if got is None or got[0]["key"] != clean_key(run, config, names):
        return None
    saved, lines = got
    human = 0
    for rec in latest_records(run, lines):
        why = run.damage(rec) if rec.get("stage") else rec.get("error")
        if why is not None:
            if log is not None:
                log.info("the run changed since its last clean finish (%s: %s: %s): checking every image",
                         rec.get("path") or rec.get("image"), rec.get("stage"), why)
            return None
        human += bool(rec.get("human"))
    return {**saved, "human": human}


def clean_status(run: RunDir, config: Mapping, per_image: list[str]) -> tuple[dict, int] | None:
    """``status``'s answer (every image done in each of ``per_image``, and how many images have a reviewer's labels)
    when the run is as its last clean finish left it, which ran all of those stages; else ``None``."""
    got = _saved(run)
    names = (got[0]["key"].get("stages") or []) if got else []
    if not set(per_image) <= set(names) or (saved := unchanged(run, config, names)) is None:
        return None
    with open(run.file(IMAGES), "rb") as f:
        done = [(json.loads(line)["rel"], "") for line in f if line.strip()]
    return {stage: {"done": done} for stage in per_image}, saved["human"]


def _record(line: bytes) -> dict | None:
    """A manifest line's record, or ``None`` when it does not parse or is not one."""
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if is_record(rec) else None


def _records(run: RunDir) -> Iterator[tuple[int, dict | None]]:
    """Each manifest line's number and its record (``_record``), a line at a time."""
    with open(run.file(MANIFEST), "rb") as f:
        yield from enumerate(map(_record, f))


def latest_records(run: RunDir, lines: bytes, whole: dict | None = None) -> Iterator[dict]:
    """The latest done per-image records (a set bit of ``lines``, from ``latest_lines``), read a line at a time; a
    marked line that does not parse as one comes as ``{"error": why}``. ``whole`` gets each whole-run stage's last
    record, by stage."""
    with open(run.file(MANIFEST), "rb") as f:
        for i, line in enumerate(f):
            marked = i >> 3 < len(lines) and lines[i >> 3] & (1 << (i & 7))
            if not marked and (whole is None or b'"image": null' not in line):
                continue
            rec = _record(line)
            if not marked:
                if rec is not None and rec.get("image") is None:
                    whole[rec["stage"]] = rec
                continue
            yield rec if rec is not None else {"error": f"manifest line {i + 1} is not a record"}


def latest_done(run: RunDir) -> Iterator[dict] | None:
    """Every latest done record, each image's and then each whole-run stage's, streamed, when the manifest is the one
    the last clean finish described (``status --verify`` then holds none); else ``None``. (A marked line that is not
    a record would mean another manifest, which its identity rules out; it is passed over.)"""
    got = _saved(run)
    if got is None:
        return None

    def records() -> Iterator[dict]:
        whole: dict[str, dict] = {}
        yield from (rec for rec in latest_records(run, got[1], whole) if rec.get("stage"))
        yield from (rec for rec in whole.values() if rec["status"] == "done")

    return records()


def latest_lines(run: RunDir, latest: Mapping) -> bytes:
    """A bit per manifest line, set where the line holds the latest done record of an image's output (``latest``,
    ``RunDir.latest``: the same record id)."""
    bits = bytearray()
    for i, rec in _records(run):
        if i >> 3 >= len(bits):
            bits.append(0)
        image = rec.get("image") if rec else None
        if image is not None and rec["status"] == "done" and rec.get("rid"):
            if (latest.get((image, rec["stage"])) or {}).get("rid") == rec["rid"]:
                bits[i >> 3] |= 1 << (i & 7)
    return bytes(bits)


def appended_per_image(run: RunDir, since: int) -> bool:
    """Whether a per-image record (or a line that is not a record) was written to the manifest after its first
    ``since`` bytes."""
    with open(run.file(MANIFEST), "rb") as f:
        f.seek(since)
        return any((rec := _record(line)) is None or rec.get("image") is not None for line in f)


def all_done(latest: Mapping, images: Iterable[str], stages: list[str]) -> bool:
    """Whether every image's latest record of every one of ``stages`` is done."""
    return all((latest.get((image, stage)) or {}).get("status") == "done" for image in images for stage in stages)


def record_clean(run: RunDir, config: Mapping, names: list[str], images: int, reads: Mapping[str, str],
                 produced: bool, lines: bytes | str) -> None:
    """Write ``clean.json`` for a run that just finished clean (the caller has checked): ``lines`` from
    ``latest_lines``, or as the last clean finish recorded them (already compressed) when nothing but whole-run
    records was appended since."""
    if isinstance(lines, bytes):
        lines = base64.b64encode(zlib.compress(lines, 9)).decode("ascii")
    atomic_write_json(run.file(CLEAN), {"key": clean_key(run, config, names), "images": images, "reads": dict(reads),
                                        "produced": produced, "lines": lines})


def forget_clean(run: RunDir) -> None:
    """Drop ``clean.json``: the run did not finish clean."""
    run.file(CLEAN).unlink(missing_ok=True)
