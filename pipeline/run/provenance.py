"""Per-stage provenance: what each stage's outputs were made with, and whether they are still true.

Each stage declares, in one table (``stages.RESULT_KEYS``), the config keys that change its
results: top-level keys such as ``model`` or ``seed``, and its own section less the keys that
never change a result (``NOT_RESULT``, e.g. batch sizes). A stage's *fingerprint* hashes those
settings together with the fingerprints of the stages it reads, so the fingerprints chain: a
change to ``decode.*`` changes decode's fingerprint and with it surgery's, but never ascend's.

Every manifest record of a finished image carries the fingerprint it was made with, and
``provenance.json`` keeps the settings behind each fingerprint, so a stale output can say
which setting changed. An output is:

* ``done``: its last record is done, its files exist and its fingerprint is today's;
* ``stale``: done, but made with other settings, or from an upstream output since redone (each done record
  names the ids of the upstream records it read);
* ``failed`` / ``blocked``: its last record says so, with the reason;
* ``damaged``: an output is not what was written (another size, or, found by ``status --verify``, another
  checksum), or ``verify`` recorded it so; the next run redoes it;
* ``pending``: never tried.

A record marked ``human`` (a reviewer's labels, brought in by ``import``) is done while its files are:
no setting and no redone upstream output makes it stale.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pipeline.run.clean import latest_done
from pipeline.run.rundir import STAMPS, RunDir, atomic_write_json, read_json

PROVENANCE = "provenance.json"

# Keys inside a stage's section that never change its results.
NOT_RESULT: dict[str, frozenset[str]] = {
    "ascend": frozenset({"batch_size"}),  # an image's result does not depend on what it was batched with
    "surgery": frozenset({"batch_size"}),
}


def stage_settings(config: Mapping, keys: tuple[str, ...]) -> dict:
    """The result-affecting settings of a stage: ``config[key]`` for each of ``keys``, sections less ``NOT_RESULT``."""
    out = {}
    for key in keys:
        value = config.get(key)
        if isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in NOT_RESULT.get(key, ())}
        out[key] = value
    return out


def fingerprint(settings: dict, upstream: list[str]) -> str:
    """A short hash of a stage's settings and its upstream stages' fingerprints."""
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Status:
    """The state of one (image, stage) and, unless done or pending, why.

    A failed or blocked output names its root cause: ``reason`` is the first failure's own words, ``cause``
    the stage it happened in (for a blocked output, an earlier one), and ``advice`` what helps, if anything
    does (``"replace or remove the file"`` for bad input, ``"rerun"`` for an error that may pass)."""

    state: str  # "done", "stale", "damaged", "failed", "blocked" or "pending"
    reason: str = ""
    cause: str = ""
    advice: str = ""

    def line(self, later: bool = False) -> str:
        """One line a person can read: ``a.jpg: file is empty (0 bytes) (ascend; later stages skipped): replace
        or remove the file``; ``later`` when the stages after ``cause`` were skipped for it."""
        where = f" ({self.cause}{'; later stages skipped' if later else ''})" if self.cause else ""
        return f"{self.reason}{where}" + (f": {self.advice}" if self.advice else "")


DONE, PENDING = Status("done"), Status("pending")  # shared: a run's statuses are mostly these


def root_line(states: list[Status]) -> str | None:
    """One image's failure as one line, from its stages' statuses in run order: the first failed or blocked
    stage's (``Status.line``), saying whether later stages were skipped; ``None`` when none failed."""
    stopped = [st for st in states if st.state in ("failed", "blocked")]
    return stopped[0].line(later=len(stopped) > 1) if stopped else None


def failure_lines(records: list[dict]) -> dict[str | None, list[str]]:
    """Each image's failures as one line, its root cause's (``Status.line``), from its latest failed and
    blocked manifest records; a whole-run stage's (``image: null``) one line each, under ``None``."""
    by_image: dict[str | None, list[dict]] = {}
    for rec in records:
        by_image.setdefault(rec.get("image"), []).append(rec)
    out: dict[str | None, list[str]] = {}
    for image, recs in by_image.items():
        if image is None:
            out[None] = [f"{r['stage']}: {r.get('error') or ''}" for r in recs]
            continue
        out[image] = [root_line([record_status(r) for r in sorted(recs, key=lambda r: r["status"] != "failed")]) or ""]
    return out


def record_status(rec: Mapping) -> Status:
    """The status a failed, blocked or damaged manifest record states, with its root cause."""
    return Status(rec["status"], rec.get("error") or "", rec.get("cause") or rec.get("stage") or "",
                  rec.get("advice") or "")


class Provenance:
    """Today's fingerprint of every stage, and each output's status against it.

    Args:
        config: the resolved config as plain data.
        result_keys: for each stage, in run order, the config keys that change its results.
        needs: for each stage, the stages whose outputs it reads.
    """

    def __init__(self, config: Mapping, result_keys: Mapping[str, tuple[str, ...]], needs: Mapping[str, tuple[str, ...]]):
        self.needs = needs
        self._known: dict[Path, dict] = {}  # provenance.json per run root, read once
        # with ``check_once``: each record's files, as found when first checked (a rerun asks of every output
        # several times: its own stage, the next stage's inputs, rank, export and the report)
        self._checked: dict[int, tuple[dict, str | None]] | None = None
        self.settings: dict[str, dict] = {}
        self.expected: dict[str, str] = {}
        for stage, keys in result_keys.items():  # run order: a stage's needs come before it
            self.settings[stage] = stage_settings(config, keys)
            self.expected[stage] = fingerprint(self.settings[stage], [self.expected[n] for n in needs.get(stage, ())])

    def check_once(self) -> None:
        """From now on, check each manifest record's files once and remember what was found: for one run, which holds
        the run directory's lock, so that nothing but its own stages (which write new records) changes them."""
        self._checked = {}

    def _damage(self, run: RunDir, rec: dict) -> str | None:
        if self._checked is None:
            return run.damage(rec)
        seen = self._checked.get(id(rec))
        if seen is None or seen[0] is not rec:
            seen = self._checked[id(rec)] = rec, run.damage(rec)
        return seen[1]

    def record(self, run: RunDir) -> None:
        """Add today's fingerprints and their settings to ``provenance.json`` (kept for every fingerprint ever used)."""
        known = self.known(run)
        new = {fp: {"stage": s, "settings": self.settings[s], "upstream": [self.expected[n] for n in self.needs.get(s, ())]}
               for s, fp in self.expected.items()}
        if any(fp not in known for fp in new):
            self._known[run.root] = {**known, **new}
            atomic_write_json(run.file(PROVENANCE), self._known[run.root])

    def known(self, run: RunDir) -> dict:
        """The run's ``provenance.json``: the settings behind every fingerprint it has used (read once)."""
        if run.root not in self._known:
            self._known[run.root] = read_json(run.file(PROVENANCE)) or {}
        return self._known[run.root]

    def status(self, run: RunDir, latest: Mapping, image: str, stage: str) -> Status:
        """The status of one image's output of ``stage``."""
        rec = latest.get((image, stage))
        if rec is None:
            return PENDING
        if rec["status"] in ("failed", "blocked", "damaged"):
            return record_status(rec)
        damage = self._damage(run, rec)
        if damage is not None:
            return Status("pending" if damage.endswith(": missing") else "damaged",
                          f"an output file is missing: {damage}" if damage.endswith(": missing") else damage)
        if rec.get("human"):  # a reviewer's labels, imported: no setting and no upstream output redoes them
            return DONE
        made = rec.get("provenance")
        if made != self.expected[stage]:
            return Status("stale", self.explain(run, stage, made))
        for need, rid in (rec.get("upstream") or {}).items():
            if rid and (latest.get((image, need)) or {}).get("rid") != rid:
                return Status("stale", f"made from a {need} output since redone")
        return DONE

    def explain(self, run: RunDir, stage: str, made: str | None) -> str:
        """Why an output made with fingerprint ``made`` is not today's: which settings or upstream changed."""
        if made is None:
            return "made before outputs recorded their settings"
        then = self.known(run).get(made)
        if then is None:
            return "made with settings this run does not know"
        changed = _changed(then["settings"], self.settings[stage])
        if changed:
            return "made with other settings: " + ", ".join(changed)
        return f"made from {'/'.join(self.needs.get(stage, ())) or 'inputs'} output(s) since redone"

    def blocked_by(self, run: RunDir, latest: Mapping, image: str, rel: str, stage: str) -> Status | None:
        """Why ``stage`` cannot run for ``image`` (``rel``) now, as a ``blocked`` status naming the root cause (an
        input it reads failed, or is missing, stale or damaged), or ``None`` when every input is done. A chain of
        blocked stages keeps the first failure's words, never nesting them."""
        for need in self.needs.get(stage, ()):
            st = self.status(run, latest, image, need)
            if st.state == "done":
                continue
            if st.state == "pending":
                return Status("blocked", f"{rel}: no {need} output", need, f"run {need} first")
            if st.state in ("failed", "blocked"):
                return Status("blocked", st.reason, st.cause, st.advice)
            return Status("blocked", f"{rel}: {need} output is {st.state}, {st.reason}", need, f"rerun {need}")
        return None


def reads_stamp(settings: Mapping, digest: str) -> str:
    """A hash of what a whole-run stage reads: its ``settings`` and the ``digest`` of the per-image outputs it reads
    (``states_digest``). The installed clipsight's version is part of it: an upgrade rebuilds the leaderboard and
    the report in its own form."""
    try:
        code = package_version("clipsight")
    except PackageNotFoundError:
        code = "unknown"
    return hashlib.sha1(json.dumps({"settings": settings, "code": code, "reads": digest}, sort_keys=True,
                                   ensure_ascii=False, default=str).encode("utf-8")).hexdigest()[:16]


def states_digest(states: Iterable[Any]) -> str:
    """A hash of what a whole-run stage reads of the per-image outputs, hashed as it comes, not held: e.g., per image
    and stage, the state of the output it reads (``(image id, {stage: read_state(...)})`` in the run's image order).
    A redone output has a new record id, so it changes the digest, and an unchanged run gives the same one."""
    h = hashlib.sha1()
    encode = json.JSONEncoder(sort_keys=True, ensure_ascii=False, default=str).encode
    for item in states:
        h.update(encode(item).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def output_states(statuses: Mapping[str, Mapping[str, Status]], latest: Mapping) -> Iterator[tuple[str, dict]]:
    """``(image id, {stage: read_state(...)})`` for each image's ``{stage: status}``, for ``states_digest``."""
    for image, by_stage in statuses.items():
        yield image, {stage: read_state(st, latest.get((image, stage))) for stage, st in by_stage.items()}


def read_state(status: Status, rec: Mapping | None) -> tuple[str, str]:
    """An output's entry in ``reads_stamp``: its state, with its record id when done, else its reason."""
    return status.state, ((rec or {}).get("rid") or "") if status.state == "done" else status.reason


def stamp_of(run: RunDir, stage: str) -> str | None:
    """The stamp a whole-run stage last finished with (``stamps.json``), or ``None``."""
    return (read_json(run.file(STAMPS)) or {}).get(stage)


def set_stamp(run: RunDir, stage: str, stamp: str | None) -> None:
    """Record ``stage``'s stamp, or (``None``) drop it before its outputs are rewritten, so a kill in between
    leaves no stamp over torn files."""
    stamps = read_json(run.file(STAMPS)) or {}
    if stamp is None:
        stamps.pop(stage, None)
    else:
        stamps[stage] = stamp
    atomic_write_json(run.file(STAMPS), stamps)


def _changed(old: Mapping, new: Mapping, path: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key (old -> new)``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _changed(a, b, f"{path}{key}.")
        elif a != b:
            out.append(f"{path}{key} ({a!r} -> {b!r})")
    return out


def run_status(run: RunDir, provenance: Provenance, stages: list[str]) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """For each per-image stage, the images in each state with their reasons: ``{stage: {state: [(rel, reason)]}}``."""
    latest = run.latest()
    out: dict[str, dict[str, list[tuple[str, str]]]] = {s: {} for s in stages}
    for ref in run.load_images():
        states = [provenance.status(run, latest, ref.id, stage) for stage in stages]
        line = root_line(states)
        for stage, st in zip(stages, states):
            if st.state == "pending":
                why = provenance.blocked_by(run, latest, ref.id, ref.rel, stage)
                st = Status("pending", why.line()) if why else st
            elif st.state in ("failed", "blocked"):  # each in its root cause's words
                st = Status(st.state, line or "")
            out[stage].setdefault(st.state, []).append((ref.rel, st.reason))
    return out


@dataclass
class Verification:
    """What ``verify_outputs`` found: how much it checked, and each damaged (image, stage) with the reason."""

    records: int = 0  # done records checked
    files: int = 0  # their outputs
    bytes: int = 0
    existence_only: int = 0  # records from before checksums: their outputs could only be checked to exist
    damaged: list[dict] = field(default_factory=list)  # {"image", "path", "stage", "reason"}


def verify_outputs(run: RunDir, workers: int = 8, chunk: int = 4096) -> Verification:
    """Re-read every output of every done record (the latest per image and stage) and check its size and checksum.

    The files are read on ``workers`` threads (hashing releases the GIL), ``chunk`` records at a time; a run as its
    last clean finish left it is streamed from its manifest (``clean.latest_done``), so no record is held. A record
    written before outputs carried checksums is checked for the existence of its outputs only, and counted.
    """
    records = latest_done(run)
    if records is None:
        records = (r for r in run.latest().values() if r["status"] == "done")
    out = Verification()
    with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
        while batch := list(itertools.islice(records, chunk)):
            out.records += len(batch)
            out.files += sum(len(r.get("outputs", [])) for r in batch)
            out.existence_only += sum(1 for r in batch if r.get("outputs") and not r.get("sums"))
            out.bytes += sum(v[0] for r in batch for v in (r.get("sums") or {}).values())
            for rec, reason in zip(batch, pool.map(lambda r: run.damage(r, hashes=True), batch)):
                if reason is not None:
                    out.damaged.append({"image": rec.get("image"), "path": rec.get("path"), "stage": rec["stage"],
                                        "reason": reason})
    return out


def record_damage(run: RunDir, damaged: list[dict]) -> None:
    """``mark_damaged`` under the run's one-writer lock, stamped with the time now (UTC), for ``status --verify``.

    Raises:
        RunLocked: another command holds the run.
    """
    import time

    with run.lock():
        mark_damaged(run, damaged, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def verify_and_record(run: RunDir) -> dict:
    """``status --verify``: every finished output re-read (``verify_outputs``) and the damage recorded
    (``record_damage``); what was checked, as plain data (``damaged`` lists each damaged output).

    Raises:
        RunLocked: another command holds the run, so the damage found could not be recorded.
    """
    import time

    t = time.time()
    found = verify_outputs(run)
    report = {"records": found.records, "files": found.files, "bytes": found.bytes,
              "existence_only": found.existence_only, "damaged": found.damaged, "seconds": round(time.time() - t, 2)}
    if found.damaged:
        record_damage(run, found.damaged)
    return report


def mark_damaged(run: RunDir, damaged: list[dict], session: str) -> None:
    """Record each damaged output's (image, stage) as ``damaged`` with its reason, so the next run redoes it."""
    run.append_manifest([{"image": d["image"], "path": d["path"], "stage": d["stage"], "status": "damaged",
                          "error": d["reason"], "seconds": 0.0, "outputs": [], "session": session} for d in damaged])
