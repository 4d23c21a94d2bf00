"""What the terminal shows: rich tables of a run's outcome, the leaderboard, the doctor's checks, the models."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from pipeline.doctor import Check
from pipeline.images import ImageRef
from pipeline.rundir import RunDir
from pipeline.runner import RunOutcome, stage_provenance
from pipeline.stage import PerImageStage, WholeRunStage


def outcome_views(outcome: RunOutcome, summary: bool = True) -> list:
    """The stage table, up to 20 failures, the top words and the report's path, in print order; with ``summary``
    off, the failures only (a command that prints what it did itself)."""
    ranks = (f" (per-image counts of rank 0 of {outcome.dist.world_size}; all ranks are in manifest.jsonl)"
             if outcome.dist.enabled else "")
    table = Table(title=f"run {outcome.run.root}{ranks}")
    for col in ("stage", "done", "failed", "skipped", "blocked", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in outcome.summaries:
        table.add_row(s.stage, str(s.done), f"[red]{s.failed}[/]" if s.failed else "0", str(s.skipped), str(s.blocked),
                      f"{s.seconds:.1f}")
    views: list = [table] if summary else []
    views += [Text.assemble(("failed", "red"), f" {r['stage']}: {r['error']}") for r in outcome.failures[:20]]
    if len(outcome.failures) > 20:
        views.append(f"... and {len(outcome.failures) - 20} more; see {outcome.run.file('manifest.jsonl')}")
    if outcome.records and summary:
        views.append(top_words_table(outcome.records))
    if outcome.report and summary:
        views.append(f"report: {outcome.report}")
    return views


def top_words_table(records: list, top: int = 10) -> Table:
    """The leaderboard's first rows: ``records.csv`` rows, or the rank stage's records."""
    records = [asdict(r) if is_dataclass(r) else r for r in records[:top]]
    table = Table(title="CLIP's most unusual words")
    for col in ("word", "length", "pieces", "images", "score", "unusualness"):
        table.add_column(col, justify="left" if col == "word" else "right")
    for r in records[:top]:
        score = r["score"]
        table.add_row(str(r["word"]), str(r["length"]), str(r["pieces"]), str(r["images"]),
                      "" if score in (None, "") else f"{float(score):.3f}", f"{float(r['unusualness']):.3f}")
    return table


def checks_table(checks: list[Check]) -> Table:
    table = Table(title="clipsight doctor")
    for col in ("check", "status", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, {True: "[green]ok[/]", False: "[red]problem[/]", None: "[yellow]note[/]"}[c.ok], c.detail)
    return table


def models_table(rows: list[tuple[str, str]], cache: Path) -> Table:
    table = Table(title=f"models (cache: {cache})")
    table.add_column("name")
    table.add_column("status")
    for name, status in rows:
        table.add_row(name, status)
    return table


def status_table(run: Path, status: dict[str, dict[str, list[tuple[str, str]]]], reasons: int = 3) -> list:
    """Per stage, how many images are done, stale, damaged, failed, blocked or pending, then the first reasons of each."""
    table = Table(title=f"status of {run}")
    states = ("done", "stale", "damaged", "failed", "blocked", "pending")
    for col in ("stage", *states):
        table.add_column(col, justify="left" if col == "stage" else "right")
    lines: list = [table]
    for stage, by_state in status.items():
        table.add_row(stage, *(str(len(by_state.get(s, []))) for s in states))
        for state in states[1:]:
            for rel, reason in by_state.get(state, [])[:reasons]:
                lines.append(Text(f"{stage} {state}: {rel}" + (f": {reason}" if reason else "")))
            if len(by_state.get(state, [])) > reasons:
                lines.append(Text(f"{stage} {state}: ... and {len(by_state[state]) - reasons} more"))
    return lines


@contextmanager
def training_progress(console: Console, steps: int) -> Iterator[Callable[[int, float, dict | None], None]]:
    """A progress bar for ``toy train``; yields the ``on_step`` that moves it and prints each evaluation."""
    with Progress(console=console) as progress:
        task = progress.add_task("train", total=steps)

        def on_step(step: int, loss: float, metrics: dict | None) -> None:
            progress.update(task, completed=step + 1, description=f"loss {loss:.3f}")
            if metrics:
                progress.console.print(f"step {step + 1}: held-out zero-shot {json.dumps(metrics)}")

        yield on_step


def dry_run_plan(config: Any, run: RunDir, names: list[str], refs: list[ImageRef],
                 stages: Mapping[str, PerImageStage | WholeRunStage], result_keys: Mapping[str, tuple[str, ...]]) -> dict:
    """What a run would do, without doing it: per stage, the images it would process and an estimate of the
    seconds they take (``None`` where nothing is timed yet).

    An image is counted as done for a stage when its output is done with today's settings. The seconds
    per image come from this run's images finished with today's settings, else from the other runs
    beside it (in the same output folder) that finished images with the same settings.
    """
    prov = stage_provenance(config, stages, result_keys)
    done: dict[str, set[str]] = {n: set() for n in names}
    if run.has_config():
        latest = run.latest()
        for ref in refs:
            for name in names:
                if isinstance(stages[name], PerImageStage) and prov.status(run, latest, ref.id, name).state == "done":
                    done[name].add(ref.id)
    others = sorted(p for p in run.root.parent.glob("*/") if p != run.root) if run.root.parent.is_dir() else []
    rows = []
    for name in names:
        per_image = isinstance(stages[name], PerImageStage)
        timed, source = _timings(run, name, prov.expected[name] if per_image else None), "this run"
        for other in others if not timed else []:
            timed += _timings(RunDir(other), name, prov.expected[name] if per_image else None)
            source = "other runs with these settings"
        todo = len(refs) - len(done[name]) if per_image else 1
        each = sum(timed) / len(timed) if timed else None
        rows.append({"stage": name, "todo": todo, "done": len(done[name]) if per_image else 0,
                     "timed": len(timed), "timed_in": source if timed else None, "seconds_each": each,
                     "estimate_s": None if each is None else round(each * todo, 1)})
    known = [r["estimate_s"] for r in rows if r["todo"]]
    return {"run": str(run.root), "images": [r.rel for r in refs], "stages": rows,
            "estimate_s": None if any(e is None for e in known) else round(sum(known), 1)}


def _timings(run: RunDir, stage: str, fingerprint: str | None) -> list[float]:
    """The seconds of a run's finished records of ``stage`` made with ``fingerprint`` (any, for whole-run stages)."""
    return [float(r["seconds"]) for r in run.manifest_records()
            if r["stage"] == stage and r["status"] == "done" and r.get("seconds")
            and (fingerprint is None or r.get("provenance") == fingerprint)]


def dry_run_views(plan: dict) -> list:
    """The images, one per line, then a table of what each stage would do and how long it should take."""
    views: list = [Text(rel) for rel in plan["images"]]
    table = Table(title=f"dry run: {len(plan['images'])} images into {plan['run']}")
    for col in ("stage", "to do", "done", "s per item", "estimate"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in plan["stages"]:
        each = "" if s["seconds_each"] is None else f"{s['seconds_each']:.1f}"
        est = "unknown" if s["estimate_s"] is None else _duration(s["estimate_s"])
        table.add_row(s["stage"], str(s["todo"]), str(s["done"]), each, est if s["todo"] else "-")
    views.append(table)
    if plan["estimate_s"] is None:
        views.append(Text("estimate: unknown until an image of each stage is timed with these settings, in this run "
                          "or another beside it; the progress bar gives an ETA from the first iterations"))
    else:
        sources = sorted({s["timed_in"] for s in plan["stages"] if s["todo"] and s["timed_in"]})
        views.append(Text(f"estimate: {_duration(plan['estimate_s'])}, from the images finished in {' and '.join(sources)}"))
    return views


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
