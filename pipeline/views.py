"""What the terminal shows: rich tables of a run's outcome, the leaderboard, the doctor's checks, the models."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from pipeline.doctor import Check
from pipeline.runner import RunOutcome


def outcome_views(outcome: RunOutcome) -> list:
    """The stage table, up to 20 failures, the top words and the report's path, in print order."""
    ranks = (f" (per-image counts of rank 0 of {outcome.dist.world_size}; all ranks are in manifest.jsonl)"
             if outcome.dist.enabled else "")
    table = Table(title=f"run {outcome.run.root}{ranks}")
    for col in ("stage", "done", "failed", "skipped", "blocked", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in outcome.summaries:
        table.add_row(s.stage, str(s.done), f"[red]{s.failed}[/]" if s.failed else "0", str(s.skipped), str(s.blocked),
                      f"{s.seconds:.1f}")
    views: list = [table]
    views += [Text.assemble(("failed", "red"), f" {r['stage']}: {r['error']}") for r in outcome.failures[:20]]
    if len(outcome.failures) > 20:
        views.append(f"... and {len(outcome.failures) - 20} more; see {outcome.run.file('manifest.jsonl')}")
    if outcome.records:
        views.append(top_words_table(outcome.records))
    if outcome.report:
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
    """Per stage, how many images are done, stale, failed, blocked or pending, then the first reasons of each."""
    table = Table(title=f"status of {run}")
    states = ("done", "stale", "failed", "blocked", "pending")
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
