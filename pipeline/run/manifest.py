"""The run's manifest files read as they grow: the latest record per (image, stage), parsed once per command.

A manifest is append-only JSON lines (``RunDir.append_manifest``). At 100,000 images it holds some 300,000
records, and a rerun asks for the latest of each many times: ``ManifestTail`` parses a file once and then only
what was appended, and keeps the records compact.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def whole_lines(path: Path) -> list[tuple[str, Any]]:
    """``(line, parsed)`` for each line of a JSON-lines file that parses; a line torn by a kill does not."""
    out = []
    with gc_paused():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue
    return out


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cycle collector off while many small dicts are made that make no cycles: at 100,000 images it would
    otherwise walk the growing heap again and again, half the time of reading a manifest."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def is_record(rec: Any) -> bool:
    return isinstance(rec, dict) and "stage" in rec and "status" in rec


_SHARED = frozenset({"image", "path", "stage", "status", "error", "cause", "advice", "provenance", "session"})


def _compact(rec: dict) -> dict:
    """The same record in less memory (100,000 images keep 300,000 of them): its keys and its few distinct values
    shared with every other record's, and each checksum keyed by its output's own string."""
    out = {}
    for key, value in rec.items():
        key = sys.intern(key)
        out[key] = sys.intern(value) if key in _SHARED and value.__class__ is str else value
    sums, outputs = out.get("sums"), out.get("outputs")
    if sums and outputs and isinstance(sums, dict) and all(o.__class__ is str for o in outputs):
        out["sums"] = {**{o: sums[o] for o in outputs if o in sums}, **sums}
    upstream = out.get("upstream")
    if upstream and isinstance(upstream, dict):
        out["upstream"] = {sys.intern(k): v for k, v in upstream.items()}
    return out


class ManifestTail:
    """The latest record per (image, stage) of one append-only manifest file, read once and then only as it grows.

    A file that was replaced (another inode), shortened, or changed before the point read so far is read again
    from the start. An unterminated last line (a kill mid-append) is read but not passed, so it is read again once
    the next append has ended it.
    """

    _CHECK = 64  # bytes before the point read so far, kept to notice a file changed in place
    _BLOCK = 8 << 20
    _FREEZE = 10_000  # records read at once that are worth taking out of the cycle collector's sight

    def __init__(self) -> None:
        self.ident: tuple[int, int] | None = None
        self.offset = 0
        self.before = b""
        self.latest: dict[tuple[str | None, str], dict] = {}

    def read(self, path: Path) -> dict[tuple[str | None, str], dict]:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            self.__init__()
            return self.latest
        known = len(self.latest)
        with f, gc_paused():
            st = os.fstat(f.fileno())
            if (st.st_dev, st.st_ino) != self.ident or st.st_size < self.offset or not self._unchanged(f):
                self.__init__()
                self.ident, known = (st.st_dev, st.st_ino), 0
            f.seek(self.offset)
            rest = b""
            while block := f.read(self._BLOCK):  # a block at a time: the whole file at once would double the peak
                buf = rest + block
                cut = buf.rfind(b"\n") + 1
                rest = buf[cut:]  # unterminated: the next block's start, or a torn line read again next time
                self._add(buf[:cut].split(b"\n")[:-1])
                self.offset += cut
                self.before = (self.before + buf[max(0, cut - self._CHECK):cut])[-self._CHECK:]
            self._add([rest])
        if len(self.latest) - known >= self._FREEZE:
            # kept for the process's life, and they make no cycles (reference counting still frees them): out of
            # the cycle collector's sight, which would otherwise walk them all again and again
            gc.freeze()
        return self.latest

    def _add(self, lines: list[bytes]) -> None:
        for line in lines:
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if is_record(rec):
                rec = _compact(rec)
                self.latest[(rec.get("image"), rec["stage"])] = rec

    def _unchanged(self, f) -> bool:
        if not self.offset:
            return True
        f.seek(self.offset - len(self.before))
        return f.read(len(self.before)) == self.before
