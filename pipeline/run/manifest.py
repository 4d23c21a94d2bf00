"""The run's manifest files read as they grow: the latest record per (image, stage), parsed once per command.

A manifest is append-only JSON lines (``RunDir.append_manifest``). At 100,000 images it holds some 300,000
records, and a rerun asks for the latest of each many times: ``ManifestTail`` parses a file once and then only
what was appended, and keeps the records compact.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping


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
_PLAIN = ("image", "path", "stage", "status", "error", "seconds", "outputs", "sums", "rid", "upstream", "provenance",
          "session")  # the keys of a done record that ``DoneRecord`` keeps in its own form
_layouts: dict[tuple, tuple] = {}  # each key order seen: (keys, the same as a set, the keys beyond _PLAIN)


def _interned(value):
    return sys.intern(value) if value.__class__ is str else value


def _layout(keys: tuple) -> tuple:
    got = _layouts.get(keys)
    if got is None:
        keys = tuple(map(sys.intern, keys))
        got = _layouts[keys] = (keys, frozenset(keys), tuple(k for k in keys if k not in _PLAIN))
    return got


class DoneRecord(Mapping):
    """A done per-image record in a third of a dict's memory; it reads as the dict it was parsed from.

    100,000 images keep 300,000 of them. Its outputs are kept as patterns shared by every image (the image's id
    cut out), their checksums as bytes, its keys as one shared tuple. Every access builds a fresh value, so
    what a reader changes is not kept.
    """

    __slots__ = ("_layout", "image", "path", "stage", "seconds", "_outputs", "_sums", "_digest", "rid",
                 "_needs", "_rids", "provenance", "session", "_extra")

    @classmethod
    def of(cls, rec: dict, shared: dict) -> "DoneRecord | None":
        """The compact form of a parsed record, or ``None`` when it is not a done per-image record of the usual
        shape (it is kept as a dict then). ``shared`` keeps one copy of each output-name pattern and tuple of
        upstream stages, for every record read with it."""
        get = rec.get
        image, outputs, sums, upstream, rid = get("image"), get("outputs"), get("sums"), get("upstream", {}), get("rid")
        if (get("status") != "done" or get("error") is not None or image.__class__ is not str
                or outputs.__class__ is not list or sums.__class__ is not dict or upstream.__class__ is not dict
                or rid.__class__ is not str or rec["stage"].__class__ is not str or len(sums) != len(outputs)):
            return None
        sizes, hexes, digest = [], [], None
        for o in outputs:
            pair = sums.get(o) if o.__class__ is str and "\0" not in o else None
            if (pair.__class__ is not list or len(pair) != 2 or pair[0].__class__ is not int
                    or pair[1].__class__ is not str or len(pair[1]) != (digest := digest or len(pair[1]))):
                return None
            sizes.append(pair[0])
            hexes.append(pair[1])
        hexes = "".join(hexes)
        try:
            packed = bytes.fromhex(hexes)
            sized = struct.pack(f"{len(sizes)}q", *sizes)
        except (ValueError, struct.error):
            return None
        if packed.hex() != hexes or not all(v.__class__ is str for v in upstream.values()):
            return None  # upper case or spaces would not read back the same
        self = cls.__new__(cls)
        self._layout = layout = _layout(tuple(rec))
        self.image, self.path, self.stage = sys.intern(image), _interned(get("path")), sys.intern(rec["stage"])
        self.seconds, self.rid = get("seconds"), sys.intern(rid)  # the same string as the ids that name it upstream
        self._outputs = shared.setdefault(key := tuple([o.replace(image, "\0") for o in outputs]), key)
        self._sums, self._digest = sized + packed, (digest or 0) // 2  # the sizes, then the checksums
        self._needs = shared.setdefault(key := tuple(upstream), key)
        self._rids = tuple(map(sys.intern, upstream.values()))
        self.provenance, self.session = _interned(get("provenance")), _interned(get("session"))
        self._extra = tuple(rec[k] for k in layout[2]) if layout[2] else ()
        return self

    def outputs(self) -> list[str]:
        image = self.image
        return [o.replace("\0", image) for o in self._outputs]

    def sized(self) -> list[tuple[str, int]]:
        """Each output with the size it was written at (what ``RunDir.damage`` checks without hashing)."""
        outputs = self.outputs()
        return list(zip(outputs, struct.unpack_from(f"{len(outputs)}q", self._sums)))

    def sums(self) -> dict[str, list]:
        n, at = self._digest, 8 * len(self._outputs)
        return {o: [size, self._sums[at + i * n:at + (i + 1) * n].hex()] for i, (o, size) in enumerate(self.sized())}

    def upstream(self) -> dict[str, str]:
        return dict(zip(self._needs, self._rids))

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self._layout[1] else default

    def __getitem__(self, key: str) -> Any:
        if key not in self._layout[1]:
            raise KeyError(key)
        read = _READ.get(key)
        return read(self) if read is not None else self._extra[self._layout[2].index(key)]

    def __contains__(self, key: object) -> bool:
        return key in self._layout[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout[0])

    def __len__(self) -> int:
        return len(self._layout[0])

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"DoneRecord({dict(self)!r})"


_READ = {"image": DoneRecord.image.__get__, "path": DoneRecord.path.__get__, "stage": DoneRecord.stage.__get__,
         "status": lambda r: "done", "error": lambda r: None, "seconds": DoneRecord.seconds.__get__,
         "outputs": DoneRecord.outputs, "sums": DoneRecord.sums, "rid": DoneRecord.rid.__get__,
         "upstream": DoneRecord.upstream, "provenance": DoneRecord.provenance.__get__,
         "session": DoneRecord.session.__get__}


def _compact(rec: dict, shared: dict) -> Mapping:
    """The same record in less memory (100,000 images keep 300,000 of them): a done one as a ``DoneRecord``,
    any other with its keys and its few distinct values shared with every other record's."""
    done = DoneRecord.of(rec, shared)
    if done is not None:
        return done
    out = {}
    for key, value in rec.items():
        key = sys.intern(key)
        out[key] = sys.intern(value) if key in _SHARED and value.__class__ is str else value
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
        self.latest: dict[tuple[str | None, str], Mapping] = {}
        self.shared: dict = {}  # what the records read from this file share (``DoneRecord.of``)

    def read(self, path: Path) -> dict[tuple[str | None, str], Mapping]:
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
                rec = _compact(rec, self.shared)
                self.latest[(rec.get("image"), rec["stage"])] = rec

    def _unchanged(self, f) -> bool:
        if not self.offset:
            return True
        f.seek(self.offset - len(self.before))
        return f.read(len(self.before)) == self.before
