"""clipsight's command line: ``python runall.py --input imgs``, stage commands, models, doctor, toy.

This module only parses options, prints and sets the exit code; the run itself is
``pipeline.runner.run_stages``. Exit codes: 0 all succeeded, 1 some image failed,
2 usage or config error, 130 interrupted.

Results and paths go to stdout; logs, progress and errors to stderr. Torch and the
stages are imported only when a command starts work, so ``--help`` answers at once.
"""

from __future__ import annotations

import enum
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console

import pipeline  # noqa: F401  (quiets openai-clip's import warning)
from pipeline.config import STAGE_NAMES, ConfigError, resolve_config

if TYPE_CHECKING:
    from pipeline.rundir import RunDir
    from pipeline.runner import RunOutcome
    from stages import RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Show what CLIP sees in a folder of images: opinions, labels, word records and a report.")
toy_app = typer.Typer(add_completion=False, no_args_is_help=True,
                      help="The toy world: synthetic scenes and the shipped toy CLIP.")
app.add_typer(toy_app, name="toy")
# soft_wrap: a long path or URL stays on one line, so it can be pasted from a log or a pipe
out = Console(soft_wrap=True)
console = Console(stderr=True, soft_wrap=True)

INTERRUPTED = "interrupted — rerun the same command to resume"


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Preset(str, enum.Enum):  # stages.PRESETS
    fast = "fast"
    classic = "classic"
    best = "best"


class SceneStyle(str, enum.Enum):  # pipeline.toyworld.Style
    train = "train"
    alt = "alt"
    varied = "varied"
    mixed = "mixed"


class Recipe(str, enum.Enum):  # "auto" and pipeline.toytrain.RECIPES
    auto = "auto"
    fine_gpu = "fine-gpu"
    fine_cpu = "fine-cpu"
    distill_cpu = "distill-cpu"
    distill_init_cpu = "distill-init-cpu"
    surgery_cpu = "surgery-cpu"
    varied_cpu = "varied-cpu"
    mixed_cpu = "mixed-cpu"
    gpu = "gpu"
    cpu = "cpu"


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set ascend.iterations=50. Repeatable.")]
DeviceOpt = Annotated[Optional[Device], typer.Option(help="Where to run (default: the config's, else auto).", show_default=False)]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model: an openai-clip name, 'toy', 'random:<arch>', 'openclip:ARCH/PRETRAINED', 'random:openclip:ARCH' or a checkpoint path.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo finished work instead of resuming.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for logs).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the run's summary as JSON on stdout instead of tables.")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="openai-clip cache folder (default: $CLIPSIGHT_CACHE or ~/.cache/clip).")]
# torchrun's own parser rejects "--run" as an abbreviation of its "--run-path"; "--run-dir" passes through.
RUN_HELP = "An existing run directory (under torchrun, spell it --run-dir)."


def _version() -> str:
    try:
        return package_version("clipsight")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _interrupted() -> NoReturn:
    console.print(INTERRUPTED, highlight=False)
    raise typer.Exit(130)


def _value(option: enum.Enum | None) -> str | None:
    return None if option is None else option.value


def _resolve(config: Path | None, base: dict, cli: dict, set_: list[str] | None, **kw) -> RunConfig:
    from stages import PRESETS, RunConfig

    try:
        return resolve_config(RunConfig, config, base, cli, set_, presets=PRESETS, **kw)
    except ConfigError as err:
        _fail(str(err))


def _run_config(rd: RunDir, config: Path | None = None, cli: dict | None = None, set_: list[str] | None = None
                ) -> RunConfig:
    """A run directory's config: its ``run.yaml`` under ``--config``, the command's options and ``--set``."""
    return _resolve(config, rd.load_config(), cli or {}, set_ or [], base_source=str(rd.file("run.yaml")))


def _summary_json(outcome: RunOutcome) -> dict:
    """The run's outcome as plain data: what ``--json`` prints."""
    from dataclasses import asdict

    from pipeline.rundir import IMAGES_CSV

    images_csv = outcome.run.file(IMAGES_CSV)
    return {"run": str(outcome.run.root), "exit_code": outcome.exit_code,
            "stages": [asdict(s) for s in outcome.summaries],
            "failures": [{k: r.get(k) for k in ("image", "path", "stage", "status", "error")} for r in outcome.failures],
            "report": outcome.report,
            "images_csv": str(images_csv) if images_csv.is_file() else None,
            "top_words": outcome.records[:10]}


def _run(cfg: RunConfig, run: RunDir, names: list[str], force: bool, quiet: bool, as_json: bool = False,
         images=None, summary: bool = True) -> int:
    """Run the stages, print the outcome (with ``summary`` off, its failures only), and return the exit code."""
    from pipeline.models import ModelError
    from pipeline.rundir import RunLocked
    from pipeline.runner import run_stages
    from pipeline.views import outcome_views
    from stages import RESULT_KEYS, STAGES

    try:
        outcome = run_stages(cfg, run, STAGES, names, RESULT_KEYS, images=images, force=force, quiet=quiet,
                             console=console)
    except (ModelError, ConfigError, RunLocked) as err:
        _fail(str(err))
    except KeyboardInterrupt:  # the runner has logged it; finished images are in the manifest
        _interrupted()
    if outcome.dist.is_main:
        if as_json:
            print(json.dumps(_summary_json(outcome), indent=1, default=str))
        else:
            for view in outcome_views(outcome, summary):
                out.print(view, highlight=False)
    return outcome.exit_code


def _dry_run(cfg: RunConfig, run: RunDir, names: list[str], refs: list, as_json: bool) -> None:
    """List the images and estimate the time from finished images (this run's, else the runs beside it), without running anything."""
    from pipeline.views import dry_run_plan, dry_run_views
    from stages import RESULT_KEYS, STAGES

    plan = dry_run_plan(cfg, run, names, refs, STAGES, RESULT_KEYS)
    if as_json:
        print(json.dumps(plan, indent=1))
        return
    for view in dry_run_views(plan):
        out.print(view, highlight=False)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"clipsight {_version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Folder (recursive), one image, or a text file listing paths.")] = None,
    config: ConfigOpt = None,
    preset: Annotated[Optional[Preset], typer.Option(help="Ascend's speed: fast, classic (the original's; the default) or best. Keys a config or --set gives win.", show_default=False)] = None,
    output: Annotated[Path, typer.Option(help="Folder that holds run directories.")] = Path("outputs"),
    run_name: Annotated[Optional[str], typer.Option(help="Run directory name (default: the input's name).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    stages: Annotated[Optional[str], typer.Option(help=f"Comma-separated subset of: {','.join(STAGE_NAMES)}.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the images and estimate the time; run nothing.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Run every stage over --input and write a run directory under --output."""
    if ctx.invoked_subcommand is not None:
        return
    if input is None:
        console.print(ctx.get_help())
        _fail("--input is required (a folder, an image, or a list file)")
    from pipeline.images import InputError, discover_images, slugify
    from pipeline.rundir import RunDir
    from pipeline.runner import select_stages

    cfg = _resolve(config, {}, {"model": model, "device": _value(device), "preset": _value(preset)}, set_)
    try:
        names = select_stages(stages, STAGE_NAMES)
        refs = discover_images(input, cfg.input.patterns)
    except (ConfigError, InputError) as err:
        _fail(str(err))
    if not refs:
        _fail(f"no images found in {input} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff .gif)")
    run = RunDir(output / (run_name or slugify(input.stem if input.is_file() else input.resolve().name)))
    if dry_run:
        _dry_run(cfg, run, names, refs, as_json)
        raise typer.Exit(0)
    raise typer.Exit(_run(cfg, run, names, force, quiet, as_json, images=refs))


def _open_run(path: Path) -> RunDir:
    from pipeline.rundir import RunDir

    if not RunDir(path).has_config():
        _fail(f"{path} is not a run directory (no run.yaml)")
    return RunDir(path)


def _state_of(rd, cfg):
    """The status of a run's outputs under ``cfg`` (``(image id, stage, latest records) -> Status``), as ``status`` shows it."""
    from pipeline.runner import stage_provenance
    from stages import RESULT_KEYS, STAGES

    prov = stage_provenance(cfg, STAGES, RESULT_KEYS)
    return lambda image, stage, latest: prov.status(rd, latest, image, stage)


def _run_stage(name: str, run: Path, config, model, device, set_, force: bool, quiet: bool, as_json: bool = False) -> int:
    rd = _open_run(run)
    cfg = _run_config(rd, config, {"model": model, "device": _value(device)}, set_)
    return _run(cfg, rd, [name], force, quiet, as_json)


def _stage_command(name: str):
    def command(
        run: Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)],
        config: ConfigOpt = None,
        model: ModelOpt = None,
        device: DeviceOpt = None,
        set_: SetOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        as_json: JsonOpt = False,
    ) -> None:
        raise typer.Exit(_run_stage(name, run, config, model, device, set_, force, quiet, as_json))

    command.__doc__ = f"Run only the {name} stage on an existing run, with its saved config (options override it)."
    return command


for _name in STAGE_NAMES:
    if _name not in ("rank", "export"):
        app.command(_name)(_stage_command(_name))


@app.command("rank")
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
            _fail("use --run DIR for one run, or --runs A B C [--out DIR] to merge runs")
        raise typer.Exit(_run_stage("rank", run, config, None, None, set_, True, quiet, as_json))
    if not runs or run is not None:
        _fail("--runs needs the run directories as arguments: rank --runs outputs/a outputs/b --out outputs/merged")
    from dataclasses import asdict

    from pipeline.rundir import RunDir, atomic_write_text
    from pipeline.views import top_words_table
    from stages.rank import merge_runs
    from stages.report import leaderboard_page

    first = [_open_run(r) for r in runs][0]
    cfg = _run_config(first, config, None, set_)
    records = merge_runs(list(runs), out_dir, cfg.rank)
    pictures = {}
    for root in runs:  # each word's best image, by the thumbnail its run's report made
        rd = RunDir(root)
        for ref in rd.load_images():
            if rd.thumbnail(ref.id).is_file():
                pictures[f"{root.name}/{ref.id}"] = os.path.relpath(rd.thumbnail(ref.id), out_dir)
    page = out_dir / "leaderboard.html"
    atomic_write_text(page, leaderboard_page(f"{len(runs)} runs merged", [asdict(r) for r in records], pictures))
    if as_json:
        print(json.dumps({"runs": [str(r) for r in runs], "records_csv": str(out_dir / "records.csv"),
                          "leaderboard": str(page), "top_words": [asdict(r) for r in records[:10]]}, indent=1))
        return
    if records:
        out.print(top_words_table(records))
    out.print(f"merged {len(runs)} runs: {out_dir / 'records.csv'}\nleaderboard: {page}", highlight=False)


@app.command("compare")
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
    from pipeline.compare import write_comparison

    states = []
    for r in (run_a, run_b):  # each run's outputs are judged by its own settings: stale or damaged ones are left out
        rd = _open_run(r)
        states.append(_state_of(rd, _run_config(rd)))
    if maps < 0 or maps_per_image < 0:
        _fail("--maps and --maps-per-image must be >= 0")
    doc = write_comparison(run_a, run_b, out_dir, maps, maps_per_image, method, states=(states[0], states[1]))
    if as_json:
        print(json.dumps({"compare_html": str(out_dir / "compare.html"), "compare_json": str(out_dir / "compare.json"),
                          "overall": doc["overall"], "missing": {k: len(v) for k, v in doc["missing"].items()}}, indent=1))
        return
    ov, missing = doc["overall"], doc["missing"]
    out.print(f"{ov['images_compared']} images compared: mean Jaccard {ov['mean_jaccard']}, "
              f"{ov['identical_images']} identical, {ov['disjoint_images']} with no label in common", highlight=False)
    for key, what in (("only_in_a", "only in A"), ("only_in_b", "only in B"), ("unlabelled_in_a", "without labels in A"),
                      ("unlabelled_in_b", "without labels in B")):
        if missing[key]:
            out.print(f"{len(missing[key])} images {what} (listed in compare.html)", highlight=False)
    if maps and any(r["both"] for r in doc["images"]) and not any("maps" in r for r in doc["images"]):
        console.print(f"note: no image has {'the ' + repr(method) if method else 'a'} map method drawn by both runs "
                      "(surgery outputs missing, or another --method): the page has no maps", highlight=False)
    out.print(f"comparison: {out_dir / 'compare.html'}", highlight=False)


def _formats_set(to: str | None) -> list[str]:
    """``--to coco,yolo`` as a ``--set`` of ``export.formats``."""
    if to is None:
        return []
    names = [f.strip() for f in to.split(",") if f.strip()]
    return [f"export.formats=[{','.join(json.dumps(n) for n in names)}]"]


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)],
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
    from pipeline.rundir import read_json

    rd = _open_run(run)
    sets = _formats_set(to)
    for key, value in (("label_map", str(label_map.resolve()) if label_map else None), ("min_score", min_score),
                       ("top_k", top_k), ("path_prefix", path_prefix),
                       ("categories", str(categories.resolve()) if categories else None),
                       ("new_categories", new_categories), ("yolo_val", val)):
        if value is not None:
            sets.append(f"export.{key}={json.dumps(value)}")
    cfg = _run_config(rd, config, None, [*sets, *(set_ or [])])
    code = _run(cfg, rd, ["export"], False, quiet, as_json, summary=False)
    stamp = read_json(rd.file("export", "export.json")) or {}
    if not as_json and stamp:
        out.print(f"exported {stamp['images']} images: {stamp.get('labels', 0)} labels, {stamp['regions']} regions; "
                  f"{stamp.get('labels_without_region', 0)} labels without a region (a flat map, or a box over "
                  "nearly all the image)", highlight=False)
        for fmt, files in stamp.get("files", {}).items():
            out.print(f"  {fmt}: {rd.file('export', fmt)} ({', '.join(Path(f).name for f in files)})", highlight=False)
        out.print(f"  regions: {rd.file('export', 'regions.json')}", highlight=False)
        for warning in stamp.get("warnings", []):
            console.print(f"warning: {warning.removeprefix('export: ')}", highlight=False)
        left = stamp.get("left_out", [])
        if left:
            console.print(f"left out {len(left)}: " + "; ".join(f"{d['what']} of {d['image']} ({d['reason']})"
                                                                for d in left[:5]) + (" ..." if len(left) > 5 else ""),
                          highlight=False)
    raise typer.Exit(code)


@app.command("eval")
def eval_command(
    run: Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)],
    truth: Annotated[Path, typer.Option("--truth", help="A COCO file with the true categories, boxes and (optionally) masks.")],
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Where to write the JSON (default: RUN/export/eval.json).")] = None,
    label_map: Annotated[Optional[Path], typer.Option(help="YAML file mapping words to classes (default: the config's export.label_map).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure the run's labels and regions against ground truth: precision, recall, AP, pointing, CorLoc, MaxBoxAccV2."""
    from pipeline.evaluation import eval_table, format_table
    from pipeline.autolabels import categories_from_coco, load_label_map
    from pipeline.rundir import atomic_write_json
    from stages.export import effective_config, evaluate_run

    rd = _open_run(run)
    sets = [f"export.label_map={json.dumps(str(label_map.resolve()))}"] if label_map else []
    cfg = _run_config(rd, config, None, [*sets, *(set_ or [])])
    try:
        doc = json.loads(truth.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
            raise ValueError("not a COCO file: it needs 'images', 'annotations' and 'categories' lists")
        categories_from_coco(doc)  # its categories, checked before the run is read
        lmap = load_label_map(cfg.export.label_map)
    except (OSError, ValueError) as err:
        _fail(f"{truth}: {err}" if not isinstance(err, ConfigError) else str(err))
    methods = list(cfg.surgery.methods)
    export_cfg = effective_config(cfg.export, methods)
    result = evaluate_run(rd, doc, export_cfg, lmap, _state_of(rd, cfg), methods)
    result["truth"] = str(truth)
    target = out_file or rd.file("export", "eval.json")
    atomic_write_json(target, result)
    if as_json:
        print(json.dumps(result, indent=1))
        return
    out.print(f"{rd.root.name} against {truth.name} (tau {export_cfg.tau}, boxes from {export_cfg.region_method}):",
              highlight=False)
    out.print(format_table(eval_table(result, methods, export_cfg.region_method)), highlight=False)
    o = result["overall"]
    best = {m: b.get("best_tau") for m, b in o["methods"].items() if b.get("best_tau") is not None}
    ap = result["detection"]
    out.print(f"coverage {o['coverage']} of {o['pairs']} true (image, category) pairs named by CLIP; "
              f"best tau by method: {best}; {len(result['missing_from_run'])} truth images not in the run\n"
              f"detection (COCO): AP {ap['ap']}, AP50 {ap['ap50']}, AP75 {ap['ap75']}; at IoU 0.5 precision "
              f"{ap['precision']}, recall {ap['recall']} ({ap['tp']} TP, {ap['fp']} FP, {ap['fn']} FN); "
              f"{result['labels_without_region']} of {result['labels_exported']} exported labels have no box\n"
              f"written: {target}", highlight=False)


@app.command("status")
def status_command(
    run: Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)],
    verify: Annotated[bool, typer.Option("--verify", help="Re-read every finished output and check its size and checksum; damaged ones are recorded, so the next run redoes them.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show, per stage, which images are done, stale (made with other settings), damaged, failed, blocked or pending, and why."""
    import time

    from pipeline.provenance import record_damage, verify_outputs
    from pipeline.rundir import RunLocked
    from pipeline.runner import stage_status
    from pipeline.views import status_table
    from stages import RESULT_KEYS, STAGES

    rd = _open_run(run)
    cfg = _run_config(rd)
    report: dict = {}
    if verify:
        t = time.time()
        found = verify_outputs(rd)
        report = {"records": found.records, "files": found.files, "bytes": found.bytes,
                  "existence_only": found.existence_only, "damaged": found.damaged, "seconds": round(time.time() - t, 2)}
        if found.damaged:
            try:
                record_damage(rd, found.damaged)
            except RunLocked as err:
                _fail(f"{err}; the damage was found but not recorded: rerun --verify when it is free")
    status = stage_status(cfg, rd, STAGES, RESULT_KEYS)
    if as_json:
        print(json.dumps({"run": str(run), "verify": report or None,
                          "stages": {s: {k: [list(x) for x in v] for k, v in by.items()} for s, by in status.items()}}, indent=1))
    else:
        if verify:
            out.print(f"verified {report['files']} files of {report['records']} finished outputs "
                      f"({report['bytes'] / 2**20:.1f} MiB) in {report['seconds']}s: {len(found.damaged)} damaged"
                      + (f"; {found.existence_only} written before checksums, checked to exist only" if found.existence_only else ""),
                      highlight=False)
            for d in found.damaged:
                out.print(f"damaged: {d['stage']} {d['image'] or '(whole run)'}: {d['reason']}", highlight=False)
        for line in status_table(run, status):
            out.print(line, highlight=False)
    raise typer.Exit(1 if verify and found.damaged else 0)


@app.command("models")
def models_command(cache: CacheOpt = None) -> None:
    """List the known model names and which OpenAI checkpoints are already in the cache."""
    from pipeline.models import default_cache_dir, model_statuses
    from pipeline.views import models_table

    out.print(models_table(model_statuses(cache or default_cache_dir()), cache or default_cache_dir()))


@app.command("config-reference")
def config_reference_command() -> None:
    """Print every config key with its type, default and meaning (docs/config.md is this output, in Markdown)."""
    from pipeline.configdoc import config_reference
    from stages import PRESETS, RunConfig

    sys.stdout.write(config_reference(RunConfig, PRESETS))


@app.command("doctor")
def doctor(
    cache: CacheOpt = None,
    output: Annotated[Path, typer.Option(help="Where runs will be written (its free space is checked).")] = Path("outputs"),
) -> None:
    """Check and explain the environment: torch and CUDA, the weights cache, free disk, optional extras."""
    from pipeline.doctor import check_environment
    from pipeline.models import default_cache_dir
    from pipeline.views import checks_table

    checks = check_environment(cache or default_cache_dir(), output)
    out.print(checks_table(checks))
    raise typer.Exit(1 if any(c.ok is False for c in checks) else 0)


@toy_app.command("scenes")
def toy_scenes(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the PNGs, truth.json and its COCO form truth_coco.json.")],
    count: Annotated[int, typer.Option(help="How many scenes.")] = 12,
    seed: Annotated[int, typer.Option(help="Scene stream seed.")] = 7,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    min_objects: Annotated[int, typer.Option(help="Fewest objects per scene.")] = 1,
    max_objects: Annotated[int, typer.Option(help="Most objects per scene (up to 3).")] = 3,
    style: Annotated[SceneStyle, typer.Option(help="train (hard-edged), alt (anti-aliased, other backgrounds), varied (the training augmentation: new choices per scene) or mixed (train or varied, half each).")] = SceneStyle.train,
) -> None:
    """Write toy scenes (coloured shapes with known truth), truth.json and truth_coco.json (for eval)."""
    from pipeline.toyworld import SceneSpec, write_scenes

    try:
        spec = SceneSpec(size=size, min_objects=min_objects, max_objects=max_objects, style=style.value)  # type: ignore[arg-type]
    except ValueError as err:
        _fail(str(err))
    truth = write_scenes(out_dir, seed, count, spec)
    out.print(f"wrote {count} scenes and {truth}", highlight=False)


@toy_app.command("train")
def toy_train(
    out_file: Annotated[Path, typer.Option("--out", help="Where to write the fp16 state dict; a .json card goes beside it.")],
    recipe: Annotated[Recipe, typer.Option(help="'fine-gpu' (16x16-grid model), 'fine-cpu' (the same, sized for a 2-core CPU), 'distill-cpu' (the 16x16-grid vision tower taught by --teacher), 'distill-init-cpu' (the same, started from the teacher's vision tower), 'surgery-cpu' (continues --start-from with the patch term on the surgery path too), 'varied-cpu' (continues --start-from on scenes drawn a new way each time, text tower frozen), 'mixed-cpu' (the same on training-style and varied scenes, with a 36-way class term on the image embedding), 'gpu' and 'cpu' (the 8x8-grid model), or 'auto': fine-gpu on CUDA, else fine-cpu.")] = Recipe.auto,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the recipe's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Scenes per step (default: the recipe's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the recipe's).")] = None,
    class_weight: Annotated[Optional[float], typer.Option(help="Weight of the 36-way colour+shape term on the image embedding (default: the recipe's).")] = None,
    freeze_text: Annotated[Optional[bool], typer.Option("--freeze-text/--train-text", help="Keep the text tower as loaded from --start-from, or train it (default: the recipe's).", show_default=False)] = None,
    workers: Annotated[int, typer.Option(help="Scene-drawing worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    teacher: Annotated[Optional[Path], typer.Option(help="A toy checkpoint for the distill- recipes: its text tower is copied and frozen, its image embedding distilled.")] = None,
    start_from: Annotated[Optional[Path], typer.Option(help="A toy checkpoint of the recipe's architecture to start from (surgery-cpu continues a distill-init-cpu model).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out (OUT.ckpt), written every few steps.")] = False,
    device: DeviceOpt = None,
) -> None:
    """Train the toy CLIP on toy scenes (GPU when present), writing a checkpoint stock openai-clip loads."""
    from pipeline.models import resolve_device
    from pipeline.toytrain import resolve_recipe, save_toy_checkpoint, train_toy_clip
    from pipeline.views import training_progress

    dev = resolve_device(_value(device) or "auto")
    try:
        name, cfg = resolve_recipe(recipe.value, dev, steps=steps, batch_size=batch_size, lr=lr, class_weight=class_weight,
                                   freeze_text=freeze_text, workers=workers, seed=seed,
                                   teacher=str(teacher.resolve()) if teacher else None,
                                   start_from=str(start_from.resolve()) if start_from else None)
    except ValueError as err:
        _fail(str(err))
    ckpt = out_file.with_suffix(".ckpt")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"recipe {name}: {cfg.steps} steps of {cfg.batch_size} scenes, lr {cfg.lr}, on {dev}; "
                  f"checkpoint {ckpt}" + (" (resuming)" if resume and ckpt.is_file() else ""), highlight=False)
    with training_progress(console, cfg.steps) as on_step:
        try:
            state, card = train_toy_clip(cfg, dev, on_step, checkpoint=ckpt, resume=resume)
        except ValueError as err:
            _fail(f"{err}; drop --resume to start over")
        except KeyboardInterrupt:  # the checkpoint holds the last finished hundred steps
            _interrupted()
    card_path = save_toy_checkpoint(out_file, state, {**card, "recipe": {**card["recipe"], "name": name}})
    out.print(f"wrote {out_file} and {card_path}", highlight=False)


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outside a command's own handling (e.g. while imports load)
        console.print(INTERRUPTED, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    run()
