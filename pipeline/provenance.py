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
* ``stale``: done, but made with other settings, or from an upstream output since redone;
* ``failed`` / ``blocked``: its last record says so, with the reason;
* ``pending``: never tried.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from pipeline.rundir import RunDir, atomic_write_json, read_json

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


@dataclass(frozen=True)
class Status:
    """The state of one (image, stage) and, unless done or pending, why."""

    state: str  # "done", "stale", "failed", "blocked" or "pending"
    reason: str = ""


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
        self.settings: dict[str, dict] = {}
        self.expected: dict[str, str] = {}
        for stage, keys in result_keys.items():  # run order: a stage's needs come before it
            self.settings[stage] = stage_settings(config, keys)
            self.expected[stage] = fingerprint(self.settings[stage], [self.expected[n] for n in needs.get(stage, ())])

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
            return Status("pending")
        if rec["status"] in ("failed", "blocked"):
            return Status(rec["status"], rec.get("error") or "")
        if not run.is_done(rec):
            return Status("pending", "an output file is missing")
        made = rec.get("provenance")
        if made == self.expected[stage]:
            return Status("done")
        return Status("stale", self.explain(run, stage, made))

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

    def blocked_reason(self, run: RunDir, latest: Mapping, image: str, stage: str) -> str | None:
        """Why ``stage`` cannot run for ``image`` now (an input it reads is not done), or ``None``."""
        for need in self.needs.get(stage, ()):
            st = self.status(run, latest, image, need)
            if st.state == "done":
                continue
            if st.state == "pending":
                return f"no {need} output: run {need} first"
            return f"{need} is {st.state} ({st.reason}): rerun {need}"
        return None


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
        for stage in stages:
            st = provenance.status(run, latest, ref.id, stage)
            if st.state == "pending":
                why = provenance.blocked_reason(run, latest, ref.id, stage)
                st = Status("pending", why or st.reason)
            out[stage].setdefault(st.state, []).append((ref.rel, st.reason))
    return out
