"""What the terminal shows: rich tables of a run's outcome, the leaderboard, the doctor's checks, the models."""

from __future__ import annotations

from pathlib import Path

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


def top_words_table(records: list[dict], top: int = 10) -> Table:
    """The leaderboard's first rows."""
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
