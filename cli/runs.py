"""The commands over run directories: one per stage, ``rank`` (one run, or several merged), ``compare``,
``export``, ``eval``, ``status`` and ``import`` (a reviewer's labels back in). Each body parses, calls ``pipeline`` or ``stages``, and prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.common import (ConfigOpt, DeviceOpt, ForceOpt, JsonOpt, ModelOpt, QuietOpt, RUN_HELP, SetOpt, console, execute,
                        fail, open_run, out, run_config, run_stage, state_of)
from pipeline.run.config import STAGE_NAMES, ConfigError

RunOpt = Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)]


def stage_command(name: str):
    def command(run: RunOpt, config: ConfigOpt = None, model: ModelOpt = None, device: DeviceOpt = None,
                set_: SetOpt = None, force: ForceOpt = False, quiet: QuietOpt = False, as_json: JsonOpt = False) -> None:
        raise typer.Exit(run_stage(name, run, config, model, device, set_, force, quiet, as_json))

    command.__doc__ = f"Run only the {name} stage on an existing run, with its saved config (options override it)."
    return command


def rank_command(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="With --runs: the run directories to merge.", show_default=False)] = None,
    run: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help=RUN_HELP)] = None,
    merge_: Annotated[bool, typer.Option("--runs", help="Merge the run directories given as arguments into one leaderboard.")] = False,
    out_dir: Annotated[Path, typer.Option("--out", help="With --runs: the folder for the merged leaderboard.")] = Path("outputs/merged"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rank CLIP's words in one run (--run DIR), or merge several (--runs A B C --out DIR)."""
    if not merge_:
        if run is None or runs:
            fail("use --run DIR for one run, or --runs A B C [--out DIR] to merge runs")
        raise typer.Exit(run_stage("rank", run, config, None, None, set_, True, quiet, as_json))
    if not runs or run is not None:
        fail("--runs needs the run directories as arguments: rank --runs outputs/a outputs/b --out outputs/merged")
    from dataclasses import asdict

    from pipeline.run.rundir import RECORDS
    from pipeline.views import top_words_table
    from stages.rank import merge_runs
    from stages.report import write_merged_leaderboard

    cfg = run_config([open_run(r) for r in runs][0], config, None, set_)
    records = merge_runs(list(runs), out_dir, cfg.rank)
    page = write_merged_leaderboard(list(runs), out_dir, [asdict(r) for r in records])
    if as_json:
        print(json.dumps({"runs": [str(r) for r in runs], "records_csv": str(out_dir / RECORDS),
                          "leaderboard": str(page), "top_words": [asdict(r) for r in records[:10]]}, indent=1))
        return
    if records:
        out.print(top_words_table(records))
    out.print(f"merged {len(runs)} runs: {out_dir / RECORDS}\nleaderboard: {page}", highlight=False)


def compare_command(
    run_a: Annotated[Path, typer.Argument(help="The first run directory (A).", show_default=False)],
    run_b: Annotated[Path, typer.Argument(help="The second run directory (B), over the same images.", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for compare.html, compare.json and the maps.")] = Path("outputs/compare"),
    maps: Annotated[int, typer.Option(help="Images (most disagreeing first) whose shared labels' maps are drawn side by side; 0 for none.")] = 200,
    maps_per_image: Annotated[int, typer.Option(help="Shared labels drawn per image.")] = 4,
    method: Annotated[Optional[str], typer.Option(help="The map method to draw (default: surgery when both runs drew it).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare what two runs (two models, or two settings) see in the same images: compare.html and compare.json."""
    from pipeline.labels.compare import COMPARE_HTML, COMPARE_JSON, write_comparison
    from pipeline.views import compare_views

    if maps < 0 or maps_per_image < 0:
        fail("--maps and --maps-per-image must be >= 0")
    states = []
    for r in (run_a, run_b):  # each run's outputs are judged by its own settings: stale or damaged ones are left out
        rd = open_run(r)
        states.append(state_of(rd, run_config(rd)))
    doc = write_comparison(run_a, run_b, out_dir, maps, maps_per_image, method, states=(states[0], states[1]))
    if as_json:
        print(json.dumps({"compare_html": str(out_dir / COMPARE_HTML), "compare_json": str(out_dir / COMPARE_JSON),
                          "overall": doc["overall"], "missing": {k: len(v) for k, v in doc["missing"].items()}}, indent=1))
        return
    lines = compare_views(doc, out_dir)
    for line in lines[:-1]:
        out.print(line, highlight=False)
    if maps and any(r["both"] for r in doc["images"]) and not any("maps" in r for r in doc["images"]):
        console.print(f"note: no image has {'the ' + repr(method) if method else 'a'} map method drawn by both runs "
                      "(surgery outputs missing, or another --method): the page has no maps", highlight=False)
    out.print(lines[-1], highlight=False)


def formats_set(to: str | None) -> list[str]:
    """``--to coco,yolo`` as a ``--set`` of ``export.formats``."""
    if to is None:
        return []
    names = [f.strip() for f in to.split(",") if f.strip()]
    return [f"export.formats=[{','.join(json.dumps(n) for n in names)}]"]


def export_command(
    run: RunOpt,
    to: Annotated[Optional[str], typer.Option("--to", help="Comma-separated formats: coco, labelstudio, fiftyone, yolo (default: the config's export.formats).")] = None,
    label_map: Annotated[Optional[Path], typer.Option(help="YAML file mapping words to classes and dropping words (keys: map, drop, only_mapped).")] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Leave out labels whose stock-CLIP score is below this.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Labels per image, best first (0 = all).")] = None,
    path_prefix: Annotated[Optional[str], typer.Option(help="Label Studio's image URLs: local (its local files, under LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), local:ROOT, or a prefix put before each relative path, e.g. s3://bucket/folder/.")] = None,
    categories: Annotated[Optional[Path], typer.Option(help="A COCO file whose categories (names and ids) and image ids the export takes; classes are matched by name.")] = None,
    new_categories: Annotated[Optional[str], typer.Option(help="Classes that match none of --categories: drop, or keep (new ids after the file's).")] = None,
    val: Annotated[Optional[float], typer.Option("--val", help="YOLO: the fraction of images in a val split (seed: export.split_seed); 0 = no split.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the run's labels and regions under RUN/export/<format>/ (a changed setting redoes it)."""
    from pipeline.run.rundir import EXPORT_STAMP, read_json
    from pipeline.views import export_views

    rd = open_run(run)
    sets = formats_set(to)
    for key, value in (("label_map", str(label_map.resolve()) if label_map else None), ("min_score", min_score),
                       ("top_k", top_k), ("path_prefix", path_prefix),
                       ("categories", str(categories.resolve()) if categories else None),
                       ("new_categories", new_categories), ("yolo_val", val)):
        if value is not None:
            sets.append(f"export.{key}={json.dumps(value)}")
    code = execute(run_config(rd, config, None, [*sets, *(set_ or [])]), rd, ["export"], False, quiet, as_json,
                   summary=False)
    stamp = read_json(rd.file(EXPORT_STAMP)) or {}
    if not as_json and stamp:
        lines, warnings = export_views(rd, stamp)
        for line in lines:
            out.print(line, highlight=False)
        for line in warnings:
            console.print(line, highlight=False)
    raise typer.Exit(code)


def eval_command(
    run: RunOpt,
    truth: Annotated[Optional[Path], typer.Option("--truth", help="A COCO file with the true categories, boxes and (optionally) masks.", show_default=False)] = None,
    human_truth: Annotated[Optional[Path], typer.Option("--human-truth", help="A run directory whose human labels (brought in by `import`) are the truth: this run's or another's over the same images.", show_default=False)] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Where to write the JSON (default: RUN/export/eval.json).")] = None,
    label_map: Annotated[Optional[Path], typer.Option(help="YAML file mapping words to classes (default: the config's export.label_map).")] = None,
    refiners: Annotated[str, typer.Option("--refiners", help="Also measure every method's maps after these refiners, comma-separated (none, pamr, guided): CorLoc, MaxBoxAccV2, mask mIoU and the best tau of each; '' for none of them.")] = "none,pamr,guided",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure the run's labels and regions against ground truth (a COCO file, or a run's human labels): precision, recall, AP, pointing, CorLoc, MaxBoxAccV2, mask mIoU, per refiner."""
    from pipeline.labels.autolabels import load_label_map
    from pipeline.labels.evaluation import read_truth
    from pipeline.run.rundir import EXPORT_EVAL, atomic_write_json
    from pipeline.views import eval_views
    from stages.export import effective_config, evaluate_run

    from pipeline.labels.review import human_truth as read_human_truth

    from pipeline.labels.refine import REFINERS

    chosen = tuple(r.strip() for r in refiners.split(",") if r.strip())
    if bad := [r for r in chosen if r != "none" and r not in REFINERS]:
        fail(f"--refiners: unknown refiner {bad[0]!r}; valid: none, {', '.join(REFINERS)}")
    if (truth is None) == (human_truth is None):
        fail("give the truth as --truth COCO_FILE or --human-truth RUN (a run with imported human labels), one of them")
    rd = open_run(run)
    sets = [f"export.label_map={json.dumps(str(label_map.resolve()))}"] if label_map else []
    cfg = run_config(rd, config, None, [*sets, *(set_ or [])])
    try:
        doc = read_truth(truth) if truth is not None else read_human_truth(open_run(human_truth))
        lmap = load_label_map(cfg.export.label_map)
    except (OSError, ValueError) as err:
        fail(f"{truth or human_truth}: {err}" if not isinstance(err, ConfigError) else str(err))
    if not doc["images"]:
        fail(f"{human_truth} has no human labels: bring a review in with `import --run {human_truth} --labelstudio FILE`")
    methods = list(cfg.surgery.methods)
    export_cfg = effective_config(cfg.export, methods)
    source = truth.name if truth is not None else f"the human labels of {human_truth}"
    result = {**evaluate_run(rd, doc, export_cfg, lmap, state_of(rd, cfg), methods, chosen),
              "truth": str(truth) if truth is not None else source}
    target = out_file or rd.file(EXPORT_EVAL)
    atomic_write_json(target, result)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    for line in eval_views(result, rd.root.name, source, target, export_cfg.tau, export_cfg.region_method, methods):
        out.print(line, highlight=False)


def status_command(
    run: RunOpt,
    verify: Annotated[bool, typer.Option("--verify", help="Re-read every finished output and check its size and checksum; damaged ones are recorded, so the next run redoes them.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show, per stage, which images are done, stale (made with other settings), damaged, failed, blocked or pending, and why."""
    from pipeline.run.provenance import verify_and_record
    from pipeline.run.rundir import RunLocked
    from pipeline.run.stage import stage_status
    from pipeline.views import status_table, verify_views
    from stages import RESULT_KEYS, STAGES

    rd = open_run(run)
    cfg = run_config(rd)
    report: dict = {}
    if verify:
        try:
            report = verify_and_record(rd)
        except RunLocked as err:
            fail(f"{err}; the damage was found but not recorded: rerun --verify when it is free")
    status, human = stage_status(cfg, rd, STAGES, RESULT_KEYS)
    if as_json:
        doc = {"run": str(run), "verify": report or None, "human": human, "stages": status}  # (rel, reason) pairs as lists
        for chunk in json.JSONEncoder(indent=1).iterencode(doc):  # written as encoded: 100,000 images make 10 MB
            sys.stdout.write(chunk)
        sys.stdout.write("\n")
    else:
        for line in [*(verify_views(report) if verify else []), *status_table(run, status)]:
            out.print(line, highlight=False)
        if human:
            out.print(f"human-labelled images: {human} (imported; decode keeps their labels)", highlight=False)
    raise typer.Exit(1 if verify and report["damaged"] else 0)


def import_command(
    run: RunOpt,
    labelstudio: Annotated[Path, typer.Option("--labelstudio", help="Label Studio's JSON export of the reviewed project, or the run's export/labelstudio/tasks.json, edited.")],
    as_json: JsonOpt = False,
) -> None:
    """Bring a reviewer's corrections back: each reviewed image's labels and boxes become its human labels, which
    decode keeps; the next run (or `surgery --run R`) draws their maps and regions and leaves the rest alone."""
    import time

    from pipeline.labels.review import config_labels, read_review, write_reviews
    from pipeline.run.rundir import RunLocked
    from pipeline.run.stage import stage_provenance
    from stages import RESULT_KEYS, STAGES

    rd = open_run(run)
    try:
        tasks = json.loads(labelstudio.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        fail(f"{labelstudio}: cannot read it as JSON ({err}); nothing was imported")
    xml = rd.file("export", "labelstudio", "label_config.xml")
    known = config_labels(xml.read_text(encoding="utf-8")) if xml.is_file() else None
    reviews, problems = read_review(tasks, rd.load_images(), {}, known)
    prov = stage_provenance(run_config(rd), STAGES, RESULT_KEYS)
    try:
        with rd.lock():
            write_reviews(rd, reviews, prov.expected["decode"], labelstudio.name,
                          time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    except RunLocked as err:
        fail(f"{err}; nothing was imported")
    summary = {"run": str(run), "imported": len(reviews), "labels": sum(len(r.labels) for r in reviews),
               "boxes": sum(len(d["boxes"]) for r in reviews for d in r.labels), "problems": problems}
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        out.print(f"imported the human labels of {summary['imported']} images ({summary['labels']} labels, "
                  f"{summary['boxes']} boxes) from {labelstudio}", highlight=False)
        for line in problems:
            out.print(f"[yellow]skipped[/] {line}", highlight=False)
        if reviews:
            out.print(f"next: python runall.py surgery --run {run}, then export --run {run} (or rerun the whole "
                      "command): maps and regions for the corrected words; decode keeps them", highlight=False)
    raise typer.Exit(1 if problems else 0)


# (name, function) in the order the help lists them; the per-stage commands come first
COMMANDS = [*((n, stage_command(n)) for n in STAGE_NAMES if n not in ("rank", "export")), ("rank", rank_command),
            ("compare", compare_command), ("export", export_command), ("eval", eval_command), ("status", status_command),
            ("import", import_command)]
