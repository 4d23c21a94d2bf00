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
from pipeline.run.images import ImageRef
from pipeline.run.provenance import failure_lines
from pipeline.run.rundir import RunDir
from pipeline.run.runner import RunOutcome
from pipeline.run.stage import stage_provenance
from pipeline.run.stage import PerImageStage, WholeRunStage


def outcome_views(outcome: RunOutcome, summary: bool = True) -> list:
    """The stage table, up to 20 failures, the top words and the report's path, in print order; with ``summary``
    off, the failures only (a command that prints what it did itself)."""
    ranks = (f" (per-image counts of rank 0 of {outcome.dist.world_size}; all ranks are in manifest.jsonl)"
             if outcome.dist.enabled else "")
    table = Table(title=f"run {outcome.run.root}{ranks}",
                  caption="up to date: done before, with today's settings; not run: an earlier stage failed for the "
                          "image, or its input is missing")
    for col in ("stage", "done", "failed", "up to date", "not run", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in outcome.summaries:
        table.add_row(s.stage, str(s.done), f"[red]{s.failed}[/]" if s.failed else "0", str(s.skipped), str(s.blocked),
                      f"{s.seconds:.1f}")
    views: list = [table] if summary else []
    lines = [line for per_image in failure_lines(outcome.failures).values() for line in per_image]
    views += [Text.assemble(("failed", "red"), f" {line}") for line in lines[:20]]
    if len(lines) > 20:
        views.append(f"... and {len(lines) - 20} more; see {outcome.run.file('images.csv')}")
    if outcome.records and summary:
        views.append(top_words_table(outcome.records))
    if outcome.report and summary:
        views.append(f"report: {outcome.report}")
    return views


def top_words_table(records: list, top: int = 10) -> Table:
    """The leaderboard's first rows: ``records.csv`` rows, or the rank stage's records."""
    records = [asdict(r) if is_dataclass(r) else r for r in records[:top]]
    scored = any(r["score"] not in (None, "") for r in records)  # a score is a label's: no column when none is one
    table = Table(title="CLIP's most unusual words", caption=None if scored else "none of these words is a label, "
                  "so none has a label score")
    for col in ("word", "length", "pieces", "images", *(("label score",) if scored else ()), "unusualness"):
        table.add_column(col, justify="left" if col == "word" else "right")
    for r in records[:top]:
        score = r["score"]
        table.add_row(str(r["word"]), str(r["length"]), str(r["pieces"]), str(r["images"]),
                      *(("" if score in (None, "") else f"{float(score):.3f}",) if scored else ()),
                      f"{float(r['unusualness']):.3f}")
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
    failed: dict[str, str] = {}  # an image's root failure, once however many stages it stopped
    for stage, by_state in status.items():
        table.add_row(stage, *(str(len(by_state.get(s, []))) for s in states))
        for state in ("failed", "blocked"):
            for rel, reason in by_state.get(state, []):
                failed.setdefault(rel, reason)
        for state in ("stale", "damaged", "pending"):
            for rel, reason in by_state.get(state, [])[:reasons]:
                lines.append(Text(f"{stage} {state}: {rel}" + (f": {reason}" if reason else "")))
            if len(by_state.get(state, [])) > reasons:
                lines.append(Text(f"{stage} {state}: ... and {len(by_state[state]) - reasons} more"))
    shown = list(failed.values())
    lines += [Text.assemble(("failed", "red"), f" {line}") for line in shown[: 10 * reasons]]
    if len(shown) > 10 * reasons:
        lines.append(Text(f"failed: ... and {len(shown) - 10 * reasons} more images; images.csv lists them all"))
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


def export_views(run: RunDir, stamp: dict) -> tuple[list[str], list[str]]:
    """What ``export`` prints from its stamp: the lines for stdout, and the warnings for stderr."""
    from pipeline.run.rundir import EXPORT, EXPORT_REGIONS

    lines = [f"exported {stamp['images']} images: {stamp.get('labels', 0)} labels, {stamp['regions']} regions; "
             f"{stamp.get('labels_without_region', 0)} labels without a region (a flat map, or a box over nearly all "
             "the image)"]
    lines += [f"  {fmt}: {run.file(EXPORT, fmt)} ({', '.join(Path(f).name for f in files)})"
              for fmt, files in stamp.get("files", {}).items()]
    lines.append(f"  regions: {run.file(EXPORT_REGIONS)}")
    warnings = [f"warning: {w.removeprefix('export: ')}" for w in stamp.get("warnings", [])]
    left = stamp.get("left_out", [])
    if left:
        warnings.append(f"left out {len(left)}: " + "; ".join(f"{d['what']} of {d['image']} ({d['reason']})"
                                                          for d in left[:5]) + (" ..." if len(left) > 5 else ""))
    return lines, warnings


def eval_views(result: dict, run_name: str, truth: str, target: Path, tau: float, region_method: str,
               methods: list[str]) -> list[str]:
    """What ``eval`` prints: the table of every method, then coverage, COCO detection and where it was written."""
    from pipeline.labels.evaluation import eval_table, format_table

    o, ap = result["overall"], result["detection"]
    best = {m: b.get("best_tau") for m, b in o["methods"].items() if b.get("best_tau") is not None}
    return [f"{run_name} against {truth} (tau {tau}, boxes from {region_method}):",
            format_table(eval_table(result, methods, region_method)),
            f"coverage {o['coverage']} of {o['pairs']} true (image, category) pairs named by CLIP; "
            f"best tau by method: {best}; {len(result['missing_from_run'])} truth images not in the run\n"
            f"detection (COCO): AP {ap['ap']}, AP50 {ap['ap50']}, AP75 {ap['ap75']}; at IoU 0.5 precision "
            f"{ap['precision']}, recall {ap['recall']} ({ap['tp']} TP, {ap['fp']} FP, {ap['fn']} FN); "
            f"{result['labels_without_region']} of {result['labels_exported']} exported labels have no box; "
            f"mask mIoU {o.get('miou')}\n"
            + "".join(f"{region_method} maps refined by {r}: CorLoc {b['corloc_at_best_corloc_tau']} at tau "
                      f"{b['best_corloc_tau']} (mask mIoU {b['miou_at_best_corloc_tau']}), MaxBoxAccV2 "
                      f"{b['maxboxacc_v2']}\n"
                      for r, b in o["methods"].get(region_method, {}).get("refiners", {}).items())
            + f"written: {target}"]


def verify_views(report: dict) -> list[str]:
    """What ``status --verify`` prints above the status table."""
    lines = [f"verified {report['files']} files of {report['records']} finished outputs "
             f"({report['bytes'] / 2**20:.1f} MiB) in {report['seconds']}s: {len(report['damaged'])} damaged"
             + (f"; {report['existence_only']} written before checksums, checked to exist only"
                if report["existence_only"] else "")]
    return lines + [f"damaged: {d['stage']} {d['image'] or '(whole run)'}: {d['reason']}" for d in report["damaged"]]


def compare_views(doc: dict, out: Path) -> list[str]:
    """What ``compare`` prints: agreement overall, what either run lacks, and the page."""
    ov, missing = doc["overall"], doc["missing"]
    lines = [f"{ov['images_compared']} images compared: mean Jaccard {ov['mean_jaccard']}, "
             f"{ov['identical_images']} identical, {ov['disjoint_images']} with no label in common"]
    for key, what in (("only_in_a", "only in A"), ("only_in_b", "only in B"), ("unlabelled_in_a", "without labels in A"),
                      ("unlabelled_in_b", "without labels in B")):
        if missing[key]:
            lines.append(f"{len(missing[key])} images {what} (listed in compare.html)")
    from pipeline.labels.compare import COMPARE_HTML

    return lines + [f"comparison: {out / COMPARE_HTML}"]
