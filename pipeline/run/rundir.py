"""The run directory: resolved config, image list, manifest, log, atomic writes, and every output path.

``RunDir`` is the one place the layout of a run is spelled: each stage asks it for
the path of what it writes or reads (``opinion(id)``, ``labels(id)``,
``overlay(id, slug, method)``, ...), and the report gets those paths from its data.

Every output is written to a temporary name in the same folder and renamed into
place, so a killed run never leaves a half-written file under its final name. A
manifest record is appended only after its outputs exist, and a torn last line is
ignored on reading, so "done" always means the files are there.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from pipeline.run.images import ImageRef
from pipeline.run.manifest import DoneRecord, ManifestTail, gc_paused, is_record, whole_lines
from pipeline.run.shards import TAR_SEP

MANIFEST = "manifest.jsonl"
SHARDS = "manifests"
CONFIG = "run.yaml"
IMAGES = "images.jsonl"
LOG = "run.log"
RECORDS = "records.csv"
RECORDS_MD = "records.md"
LONGEST = "longest_clip_word_records.txt"
IMAGES_CSV = "images.csv"
REPORT = "report.html"
EXPORT = "export"  # one folder per format, and the files below
EXPORT_EVAL = "export/eval.json"  # what `eval` measured, unless --out says otherwise
LEADERBOARD = "leaderboard.html"  # rank --runs: the merged leaderboard page
EXPORT_STAMP = "export/export.json"  # the export's stamp, files and what it left out
EXPORT_REGIONS = "export/regions.json"  # every image's classes and boxes, which the report draws
LOCK = ".lock"
STAMPS = "stamps.json"  # rank's and report's stamps: what each was last made from (export keeps its own)


class RunLocked(RuntimeError):
    """Another process is writing the run directory."""
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes | Iterable[bytes]) -> None:
    """``data`` (bytes, or blocks of them written as they come) to ``path``, synced, then renamed into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            for block in [data] if isinstance(data, bytes) else data:
                f.write(block)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def _append_lines(path: Path, data: str) -> None:
    """Append whole lines and fsync; a line torn by an earlier kill is ended first, so it cannot swallow these."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = "\n" + data
        f.write(data.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def checksum(path: Path) -> str:
    """A fast content hash of a file: BLAKE2b with a 16-byte digest, as hex."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_output(path: Path, root: Path) -> tuple[Any | None, str | None]:
    """A stage's JSON output, or why it cannot be read, naming the file (relative to ``root``):
    ``(doc, None)`` or ``(None, "labels/x.json: not valid JSON")``."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None, f"{rel}: missing"
    except OSError as err:
        return None, f"{rel}: unreadable ({err.strerror or err})"
    except UnicodeDecodeError:
        return None, f"{rel}: not valid JSON (not UTF-8)"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"{rel}: not valid JSON ({err.msg} at line {err.lineno})"


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _image_blocks(refs: list[ImageRef], size: int = 2000) -> Iterator[bytes]:
    """``images.jsonl``'s bytes, ``size`` images at a time."""
    encode = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps's output, without an encoder made per line
    for at in range(0, len(refs), size):
        yield "".join(encode({"id": r.id, "path": r.path, "rel": r.rel, "root": r.root, **({"meta": r.meta} if r.meta else {})})
                      + "\n" for r in refs[at:at + size]).encode("utf-8")


class RunDir:
    """One run's folder under ``outputs/``.

    With ``shard`` set (one per rank of a distributed run), manifest records go to
    ``manifests/rank-<shard>.jsonl`` instead of ``manifest.jsonl``, so no two
    processes append to one file; ``merge_manifest_shards`` folds them in later.
    Reading always sees the main manifest and every shard.
    """

    def __init__(self, root: Path, shard: int | None = None):
        self.root = root
        self.shard = shard
        self._tails: dict[Path, ManifestTail] = {}  # each manifest file's latest records, read as it grows
        self._images: tuple[tuple, list[ImageRef]] | None = None  # images.jsonl, as last read, with its stat
        self._root = os.fspath(root) + os.sep  # output paths are joined as strings: a Path each costs seconds at scale

    def file(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # per-image outputs, by stage
    def opinion(self, image_id: str) -> Path:
        """ascend: candidates, word statistics and check-ins (JSON)."""
        return self.file("ascend", f"{image_id}.json")

    def opinion_csv(self, image_id: str) -> Path:
        """ascend: the original's per-check-in CSV."""
        return self.file("ascend", f"{image_id}.csv")

    def labels(self, image_id: str) -> Path:
        """decode: labels with counts and scores, and the best prompts (JSON)."""
        return self.file("labels", f"{image_id}.json")

    def human(self, image_id: str) -> Path:
        """import: a reviewer's labels for the image, which decode keeps instead of the opinion's (JSON)."""
        return self.file("human", f"{image_id}.json")

    def heatmaps(self, image_id: str) -> Path:
        """surgery: per-label entries, peaks, points and the paths of the drawn files (JSON)."""
        return self.file("surgery", f"{image_id}.json")

    def maps(self, image_id: str) -> Path:
        """surgery: every method's maps at grid resolution, keyed ``<method>/<word>`` (npz)."""
        return self.file("surgery", f"{image_id}.npz")

    def atlas(self, image_id: str) -> Path:
        """surgery: every map of the image as one grayscale PNG, a cell per label (row) and method (column)."""
        return self.file("surgery", f"{image_id}__maps.png")

    def sheet(self, image_id: str) -> Path:
        """surgery: the contact sheet of every label's maps (PNG)."""
        return self.file("surgery", f"{image_id}__sheet.png")

    def overlay(self, image_id: str, slug: str, method: str) -> Path:
        """surgery: one label's map drawn over the image (PNG)."""
        return self.file("surgery", image_id, f"{image_id}__{slug}__{method}.png")

    def mask(self, image_id: str, slug: str) -> Path:
        """surgery: one label's SAM mask (PNG)."""
        return self.file("surgery", image_id, f"{image_id}__{slug}__sam.png")

    def thumbnail(self, image_id: str) -> Path:
        """report: a copy of the original, scaled down, so the report works wherever the run is copied (JPEG)."""
        return self.file("thumbs", f"{image_id}.jpg")

    def stage_ids(self, stage_folder: str) -> list[str]:
        """Ids of the images with a JSON output in ``ascend/`` or ``labels/``, sorted."""
        folder = self.file(stage_folder)
        return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []

    # whole-run outputs
    def records(self) -> list[dict]:
        """The rows of ``records.csv`` (the leaderboard), or ``[]`` before rank has run."""
        if not self.file(RECORDS).is_file():
            return []
        with open(self.file(RECORDS), encoding="utf-8") as f:
            return list(csv.DictReader(f))

    # one writer at a time
    def lock(self, take: bool = True):
        """Hold the run directory's advisory lock (``fcntl.flock`` on ``.lock``) for a ``with`` block.

        The kernel releases it when the process exits in any way, ``kill -9`` included, so a
        stale lock file never blocks a later run. ``take=False`` holds nothing (torchrun's other
        ranks, which run under rank 0's lock).

        Raises:
            RunLocked: another process holds it; the message names its PID and host.
        """
        return self._locked() if take else nullcontext()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.file(LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                raise RunLocked(f"{self.root} is in use by {holder}; wait for it to finish, or use another "
                                "--run-name") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    # config and image list
    def has_config(self) -> bool:
        return self.file(CONFIG).is_file()

    def save_config(self, data: dict) -> None:
        atomic_write_text(self.file(CONFIG), yaml.safe_dump(data, sort_keys=False))

    def load_config(self) -> dict:
        return yaml.safe_load(self.file(CONFIG).read_text(encoding="utf-8")) or {}

    def save_images(self, refs: list[ImageRef]) -> None:
        """The run's image list: each image's id, absolute path, input root and path relative to the root.
        An unchanged list is left as it is (a rerun of 100,000 images would rewrite 15 MB); the list is compared
        and written a block at a time, never held whole."""
        path = self.file(IMAGES)
        try:
            with open(path, "rb") as f:
                if all(f.read(len(block)) == block for block in _image_blocks(refs)) and not f.read(1):
                    return
        except OSError:
            pass
        atomic_write_bytes(path, _image_blocks(refs))

    def load_images(self) -> list[ImageRef]:
        """The saved image list, each path resolved against the recorded input root (read once while unchanged)."""
        st = self.file(IMAGES).stat()
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._images is None or self._images[0] != ident:
            self._images = ident, self._read_images()
        return list(self._images[1])

    def _read_images(self) -> list[ImageRef]:
        refs = []
        with gc_paused():
            for line in self.file(IMAGES).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    d = json.loads(line)
                    root = d.get("root", "")
                    path = os.path.join(root, d["rel"]) if root else d["path"]  # a list file may name absolute paths
                    if TAR_SEP in d["path"]:  # a shard's sample: its path holds the shard and the sample's bytes
                        path = d["path"]
                    # one string for the input root, and the path the same string as the manifest's (interned)
                    refs.append(ImageRef(id=sys.intern(d["id"]), path=sys.intern(path), rel=d["rel"],
                                         root=sys.intern(root), meta=d.get("meta", "")))
        return refs

    # manifest
    def manifest_path(self) -> Path:
        return self.file(MANIFEST) if self.shard is None else self.file(SHARDS, f"rank-{self.shard:05d}.jsonl")

    def append_manifest(self, records: list[dict]) -> None:
        """Append records, one JSON line each, flushed to disk."""
        if records:
            _append_lines(self.manifest_path(), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def _manifest_files(self) -> list[Path]:
        shards = sorted(self.file(SHARDS).glob("rank-*.jsonl")) if self.file(SHARDS).is_dir() else []
        return [self.file(MANIFEST), *shards]

    def manifest_records(self) -> list[dict]:
        """Every whole record, the main manifest first, then the shards; a line torn by a kill is skipped."""
        return [rec for path in self._manifest_files() if path.is_file() for _, rec in whole_lines(path)
                if is_record(rec)]

    def merge_manifest_shards(self) -> None:
        """Fold every shard into ``manifest.jsonl`` and remove it (a kill in between only repeats records)."""
        for shard in self._manifest_files()[1:]:
            whole = "".join(line + "\n" for line, _ in whole_lines(shard))
            if whole:
                _append_lines(self.file(MANIFEST), whole)
            shard.unlink()

    def latest(self) -> dict[tuple[str | None, str], Mapping]:
        """The last record for each (image, stage), the main manifest's first, then each shard's.

        Each file is parsed once per ``RunDir`` and then only as far as it has grown, so asking again is cheap.
        The records are shared with later calls: read them, do not change them.
        """
        files = self._manifest_files()
        for gone in set(self._tails) - set(files):
            del self._tails[gone]
        out: dict[tuple[str | None, str], Mapping] = {}
        for path in files:
            out.update(self._tails.setdefault(path, ManifestTail()).read(path))
        return out

    def is_done(self, record: Mapping | None) -> bool:
        """A record counts as done only if it says so and every output it names exists, at its recorded size."""
        return bool(record) and record["status"] == "done" and self.damage(record) is None

    def output_sums(self, outputs: list[str]) -> dict[str, list]:
        """Each output's ``[size, checksum]`` (``checksum``), as a done record keeps them."""
        return {p: [self.file(p).stat().st_size, checksum(self.file(p))] for p in outputs}

    def damage(self, record: Mapping, hashes: bool = False) -> str | None:
        """Why a done record's outputs are not what it made, or ``None``: the first output that is missing,
        unreadable, or of another size than recorded; with ``hashes``, also one whose content changed.
        A record from before outputs carried checksums is checked for existence only."""
        if not hashes and isinstance(record, DoneRecord):  # sizes only: no checksum is spelled out
            sums = {rel: (size, None) for rel, size in record.sized()}
            outputs = list(sums)
        else:
            sums, outputs = record.get("sums") or {}, record.get("outputs", [])
        for rel in outputs:
            path = self._root + rel
            try:
                size = os.stat(path).st_size
            except OSError:
                return f"{rel}: missing"
            if rel not in sums:
                continue
            want_size, want_sum = sums[rel]
            if size != want_size:
                return f"{rel}: {size} bytes, {want_size} when written"
            if hashes:
                try:
                    got = checksum(path)
                except OSError as err:
                    return f"{rel}: unreadable ({err.strerror or err})"
                if got != want_sum:
                    return f"{rel}: content changed since written (checksum mismatch)"
        return None
