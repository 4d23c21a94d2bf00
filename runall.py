"""clipsight: what CLIP "sees" in a folder of images.

    python runall.py --input imgs [--config configs/demo.yaml]    run every stage
    python runall.py decode --run outputs/imgs                   run one stage on a run
    python runall.py models                                       list model names
    python runall.py doctor                                       check the environment
    python runall.py toy scenes --out imgs --count 12             write toy scenes
    python runall.py toy train --out toy-clip.pt                  train the toy CLIP

Exit codes: 0 all succeeded, 1 some image failed, 2 usage or config error.
"""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import pipeline  # noqa: F401  (quiets openai-clip's import warning)
from pipeline.config import ConfigError, build_config, load_yaml, merge, parse_overrides, to_dict
from pipeline.distributed import DistInfo, agree, init_distributed, shutdown
from pipeline.images import InputError, discover_images, slugify
from pipeline.models import ModelError, cached_file, default_cache_dir, known_models, load_model, resolve_device
from pipeline.rundir import LOG, RunDir
from pipeline.runner import RunContext, StageSummary, run_per_image, run_whole
from stages import PER_IMAGE, STAGE_ORDER, WHOLE_RUN, RunConfig
from stages.rank import merge_runs

app = typer.Typer(add_completion=False, no_args_is_help=False, rich_markup_mode=None,
                  help="Show what CLIP sees in a folder of images: opinions, labels, word records and a report.")
toy_app = typer.Typer(add_completion=False, help="The toy world: synthetic scenes and the shipped toy CLIP.")
app.add_typer(toy_app, name="toy")
console = Console(stderr=True)

# Keys whose change does not change results; a resumed run may differ in these.
NON_RESULT_KEYS = {"device", "encode_batch_size", "model_cache", "report"}

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set ascend.iterations=50. Repeatable.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model: an openai-clip name, 'toy', 'random:<arch>' or a checkpoint path.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo finished work instead of resuming.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for logs).")]
# torchrun's own parser rejects "--run" as an abbreviation of its "--run-path"; "--run-dir" passes through.
RUN_HELP = "An existing run directory (under torchrun, spell it --run-dir)."


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def resolve_config(config_file: Path | None, base: dict, cli: dict, overrides: list[str] | None) -> RunConfig:
    """Defaults, then the YAML file, then the saved run config (``base``), then CLI options and --set."""
    data = dict(base)
    source = "defaults"
    if config_file is not None:
        data = merge(data, load_yaml(config_file))
        source = str(config_file)
    data = merge(data, {k: v for k, v in cli.items() if v is not None})
    data = merge(data, parse_overrides(overrides or []))
    return build_config(RunConfig, data, source)


def _parse_stages(stages: str | None) -> list[str]:
    if not stages:
        return list(STAGE_ORDER)
    names = [s.strip() for s in stages.split(",") if s.strip()]
    for s in names:
        if s not in STAGE_ORDER:
            _fail(f"unknown stage {s!r}; valid stages: {', '.join(STAGE_ORDER)}")
    return [s for s in STAGE_ORDER if s in names]


def _logger(run: RunDir) -> logging.Logger:
    log = logging.getLogger(f"clipsight.{run.root}")
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        run.root.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run.file(LOG), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log


def _context(cfg: RunConfig, run: RunDir, quiet: bool, info: DistInfo) -> RunContext:
    def load():
        device = info.device(resolve_device(cfg.device))
        cache = Path(cfg.model_cache).expanduser() if cfg.model_cache else None
        return load_model(cfg.model, device, cfg.precision, cache, cfg.seed)

    return RunContext(cfg, run, _logger(run), load, console, quiet)


def execute(cfg: RunConfig, run: RunDir, stage_names: list[str], force: bool, quiet: bool,
            info: DistInfo = DistInfo()) -> int:
    """Run the named stages over the run's images; print the summary; return the exit code.

    Under torchrun each rank runs the per-image stages on its shard of the images,
    with its own manifest shard; after a barrier rank 0 merges the shards and runs
    the whole-run stages. Ranks other than 0 always return 0: their failures are in
    the manifest, and rank 0's exit code covers the whole run.
    """
    shard = RunDir(run.root, shard=info.rank) if info.enabled else run
    ctx = _context(cfg, shard, quiet or not info.is_main, info)
    refs = info.shard(run.load_images())
    ctx.log.info("run %s: %d images%s, stages %s", run.root, len(refs),
                 f" (rank {info.rank} of {info.world_size})" if info.enabled else "", ",".join(stage_names))
    summaries: list[StageSummary] = []
    error = None
    try:
        for name in stage_names:  # fail before any work on what can be checked up front (e.g. a missing SAM checkpoint)
            prepare = getattr(PER_IMAGE.get(name) or WHOLE_RUN.get(name), "prepare", None)
            if prepare is not None:
                prepare(ctx)
    except (ModelError, ConfigError) as err:
        error = err
    if not agree(info, error is None):
        if error is not None:
            ctx.log.error("%s", error)
            _fail(str(error))
        raise typer.Exit(2)  # another rank failed its checks and said why
    try:
        for name in stage_names:
            if name in PER_IMAGE:
                summaries.append(run_per_image(PER_IMAGE[name], ctx, refs, force))
        info.barrier()
        if not info.is_main:
            return 0
        run.merge_manifest_shards()
        ctx.run = run
        for name in stage_names:
            if name in WHOLE_RUN:
                summaries.append(run_whole(WHOLE_RUN[name], ctx))
    except (ModelError, ConfigError) as err:
        ctx.log.error("%s", err)
        _fail(str(err))
    _print_summary(summaries, run, info)
    if info.enabled:
        return 1 if any(r["status"] == "failed" for r in run.latest().values()) else 0
    return 1 if any(s.failed for s in summaries) else 0


def _print_summary(summaries: list[StageSummary], run: RunDir, info: DistInfo = DistInfo()) -> None:
    ranks = f" (per-image counts of rank 0 of {info.world_size}; all ranks are in manifest.jsonl)" if info.enabled else ""
    table = Table(title=f"run {run.root}{ranks}")
    for col in ("stage", "done", "failed", "skipped", "blocked", "seconds"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in summaries:
        table.add_row(s.stage, str(s.done), f"[red]{s.failed}[/]" if s.failed else "0", str(s.skipped), str(s.blocked),
                      f"{s.seconds:.1f}")
    console.print(table)
    failed = [r for r in run.latest().values() if r["status"] == "failed"]
    for r in failed[:20]:
        console.print(f"[red]failed[/] {r['stage']}: {r['error']}", highlight=False)
    if len(failed) > 20:
        console.print(f"... and {len(failed) - 20} more; see {run.file('manifest.jsonl')}")
    if run.file("records.csv").is_file():
        with open(run.file("records.csv"), encoding="utf-8") as f:
            _print_top_words(list(csv.DictReader(f)))
    if run.file("report.html").is_file():
        console.print(f"report: {run.file('report.html')}")


def _print_top_words(records: list[dict], top: int = 10) -> None:
    """A table of the leaderboard's first rows."""
    if not records:
        return
    table = Table(title="CLIP's most unusual words")
    for col in ("word", "length", "pieces", "images", "score", "unusualness"):
        table.add_column(col, justify="left" if col == "word" else "right")
    for r in records[:top]:
        score = r["score"]
        table.add_row(str(r["word"]), str(r["length"]), str(r["pieces"]), str(r["images"]),
                      "" if score in (None, "") else f"{float(score):.3f}", f"{float(r['unusualness']):.3f}")
    console.print(table)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="Folder (recursive), one image, or a text file listing paths.")] = None,
    config: ConfigOpt = None,
    output: Annotated[Path, typer.Option(help="Folder that holds run directories.")] = Path("outputs"),
    run_name: Annotated[Optional[str], typer.Option(help="Run directory name (default: the input's name).")] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    stages: Annotated[Optional[str], typer.Option(help=f"Comma-separated subset of: {','.join(STAGE_ORDER)}.")] = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run every stage over --input and write a run directory under --output."""
    if ctx.invoked_subcommand is not None:
        return
    if input is None:
        console.print(ctx.get_help())
        _fail("--input is required (a folder, an image, or a list file)")
    stage_names = _parse_stages(stages)
    try:
        cfg = resolve_config(config, {}, {"model": model, "device": device}, set_)
        refs = discover_images(input, cfg.input.patterns)
    except (ConfigError, InputError) as err:
        _fail(str(err))
    if not refs:
        _fail(f"no images found in {input} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff .gif)")
    run = RunDir(output / (run_name or slugify(input.stem if input.is_file() else input.resolve().name)))
    if run.has_config() and not force:
        old = {k: v for k, v in run.load_config().items() if k not in NON_RESULT_KEYS}
        new = {k: v for k, v in to_dict(cfg).items() if k not in NON_RESULT_KEYS}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            _fail(f"{run.root} was made with a different config (differs in: {', '.join(diff)}). "
                  f"Use --force to redo it, or --run-name for a new run.")
    info = init_distributed(cfg.device)
    if info.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        run.merge_manifest_shards()  # a killed distributed run may have left some
        run.save_config(to_dict(cfg))
        run.save_images(refs)
    info.barrier()
    try:
        code = execute(cfg, run, stage_names, force, quiet, info)
    finally:
        shutdown(info)
    raise typer.Exit(code)


def _run_stage(name: str, run: Path, config, model, device, set_, force: bool, quiet: bool) -> int:
    rd = RunDir(run)
    if not rd.has_config():
        _fail(f"{run} is not a run directory (no run.yaml)")
    try:
        cfg = resolve_config(config, rd.load_config(), {"model": model, "device": device}, set_)
    except ConfigError as err:
        _fail(str(err))
    info = init_distributed(cfg.device)
    if info.is_main:
        rd.merge_manifest_shards()
        rd.save_config(to_dict(cfg))
    info.barrier()
    try:
        return execute(cfg, rd, [name], force, quiet, info)
    finally:
        shutdown(info)


def _stage_command(name: str):
    def command(
        run: Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)],
        config: ConfigOpt = None,
        model: ModelOpt = None,
        device: DeviceOpt = None,
        set_: SetOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        raise typer.Exit(_run_stage(name, run, config, model, device, set_, force, quiet))

    command.__doc__ = f"Run only the {name} stage on an existing run, with its saved config (options override it)."
    return command


for _name in STAGE_ORDER:
    if _name != "rank":
        app.command(_name)(_stage_command(_name))


@app.command("rank")
def rank_command(
    runs: Annotated[Optional[list[Path]], typer.Argument(help="With --runs: the run directories to merge.", show_default=False)] = None,
    run: Annotated[Optional[Path], typer.Option("--run", "--run-dir", help=RUN_HELP)] = None,
    merge_: Annotated[bool, typer.Option("--runs", help="Merge the run directories given as arguments into one leaderboard.")] = False,
    out: Annotated[Path, typer.Option(help="With --runs: the folder for the merged leaderboard.")] = Path("outputs/merged"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Rank CLIP's words in one run (--run DIR), or merge several (--runs A B C --out DIR)."""
    if not merge_:
        if run is None or runs:
            _fail("use --run DIR for one run, or --runs A B C [--out DIR] to merge runs")
        raise typer.Exit(_run_stage("rank", run, config, None, None, set_, True, quiet))
    if not runs or run is not None:
        _fail("--runs needs the run directories as arguments: rank --runs outputs/a outputs/b --out outputs/merged")
    for r in runs:
        if not RunDir(r).has_config():
            _fail(f"{r} is not a run directory (no run.yaml)")
    try:
        cfg = resolve_config(config, RunDir(runs[0]).load_config(), {}, set_)
    except ConfigError as err:
        _fail(str(err))
    records = merge_runs(list(runs), out, cfg.rank)
    _print_top_words(records)
    console.print(f"merged {len(runs)} runs: {out / 'records.csv'}")


@app.command("models")
def models_command(
    cache: Annotated[Optional[Path], typer.Option(help="openai-clip cache folder (default: $CLIPSIGHT_CACHE or ~/.cache/clip).")] = None,
) -> None:
    """List the known model names and which OpenAI checkpoints are already in the cache."""
    cache = cache or default_cache_dir()
    table = Table(title=f"models (cache: {cache})")
    table.add_column("name")
    table.add_column("status")
    for name in known_models():
        if name == "toy":
            status = "shipped with clipsight"
        elif name.startswith("random:"):
            status = "random weights, for tests and timing"
        else:
            path = cached_file(name, cache)
            status = f"cached: {path}" if path.is_file() else f"not cached (expected at {path})"
        table.add_row(name, status)
    Console().print(table)


@app.command("doctor")
def doctor(
    cache: Annotated[Optional[Path], typer.Option(help="openai-clip cache folder (default: $CLIPSIGHT_CACHE or ~/.cache/clip).")] = None,
    output: Annotated[Path, typer.Option(help="Where runs will be written (its free space is checked).")] = Path("outputs"),
) -> None:
    """Check and explain the environment: torch and CUDA, the weights cache, free disk, optional extras."""
    import importlib.util
    import shutil

    import torch

    cache = cache or default_cache_dir()
    table = Table(title="clipsight doctor")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    problems = 0

    def row(check: str, ok: bool | None, detail: str) -> None:
        nonlocal problems
        problems += ok is False
        table.add_row(check, {True: "[green]ok[/]", False: "[red]problem[/]", None: "[yellow]note[/]"}[ok], detail)

    row("python", sys.version_info >= (3, 11), sys.version.split()[0])
    row("torch", True, f"{torch.__version__} ({torch.get_num_threads()} CPU threads)")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        row("CUDA", True, f"{torch.version.cuda}: {names}")
    else:
        row("CUDA", None, "no GPU visible: runs use the CPU (fine for the toy demo, slow for ViT-B/16)")
    try:
        import clip  # noqa: F401

        row("openai-clip", True, "imports")
    except Exception as err:  # e.g. setuptools >= 81 has no pkg_resources
        row("openai-clip", False, f"{err}; try: pip install 'setuptools>=77,<81'")
    present = [n for n in known_models() if not n.startswith("random:") and n != "toy" and cached_file(n, cache).is_file()]
    row("weights cache", None if not present else True,
        f"{cache}: " + (", ".join(present) if present else "no OpenAI checkpoint yet (downloaded on first use; "
                                                            "offline, copy the file to the path `models` prints)"))
    from pipeline.models import TOY_CHECKPOINT

    row("toy model", TOY_CHECKPOINT.is_file(), str(TOY_CHECKPOINT))
    probe = output if output.exists() else Path(".")
    free = shutil.disk_usage(probe).free / 2**30
    row("free disk", free >= 1, f"{free:.1f} GiB free at {probe.resolve()} (overlay PNGs take most of a run's space)")
    for module, extra, use in (("segment_anything", "sam", "SAM masks"), ("playwright", "dev", "the report's browser test")):
        found = importlib.util.find_spec(module) is not None
        row(f"extra: {extra}", True if found else None,
            f"{module} installed" if found else f"{module} not installed: pip install -e '.[{extra}]' for {use}")
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    row("browser", True if browser else None, browser or "no Chromium: the report's browser test will skip")
    Console().print(table)
    raise typer.Exit(1 if problems else 0)


@toy_app.command("scenes")
def toy_scenes(
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and truth.json.")],
    count: Annotated[int, typer.Option(help="How many scenes.")] = 12,
    seed: Annotated[int, typer.Option(help="Scene stream seed.")] = 7,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    min_objects: Annotated[int, typer.Option(help="Fewest objects per scene.")] = 1,
    max_objects: Annotated[int, typer.Option(help="Most objects per scene (up to 3).")] = 3,
    style: Annotated[str, typer.Option(help="train (hard-edged) or alt (anti-aliased, other backgrounds).")] = "train",
) -> None:
    """Write toy scenes as PNGs plus truth.json (objects, words, boxes, captions)."""
    from pipeline.toyworld import SceneSpec, write_scenes

    try:
        spec = SceneSpec(size=size, min_objects=min_objects, max_objects=max_objects, style=style)  # type: ignore[arg-type]
    except ValueError as err:
        _fail(str(err))
    truth = write_scenes(out, seed, count, spec)
    console.print(f"wrote {count} scenes and {truth}")


@toy_app.command("train")
def toy_train(
    out: Annotated[Path, typer.Option(help="Where to write the fp16 state dict; a .json card goes beside it.")],
    recipe: Annotated[str, typer.Option(help="'gpu' (the shipped checkpoint's), 'cpu' (under an hour on a small CPU), or 'auto': gpu on CUDA, else cpu.")] = "auto",
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the recipe's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Scenes per step (default: the recipe's).")] = None,
    workers: Annotated[int, typer.Option(help="Scene-drawing worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: DeviceOpt = "auto",
) -> None:
    """Train the toy CLIP on toy scenes (GPU when present), writing a checkpoint stock openai-clip loads."""
    import dataclasses
    import json

    import torch
    from rich.progress import Progress

    from pipeline.rundir import atomic_path, atomic_write_json
    from pipeline.toytrain import RECIPES, train_toy_clip

    dev = resolve_device(device or "auto")
    name = ("gpu" if dev.type == "cuda" else "cpu") if recipe == "auto" else recipe
    if name not in RECIPES:
        _fail(f"unknown --recipe {recipe!r}; choose one of: auto, {', '.join(RECIPES)}")
    base = RECIPES[name]
    cfg = dataclasses.replace(base, steps=steps or base.steps, batch_size=batch_size or base.batch_size,
                              workers=workers, seed=seed)
    console.print(f"recipe {name}: {cfg.steps} steps of {cfg.batch_size} scenes, lr {cfg.lr}, on {dev}")
    with Progress(console=console) as progress:
        task = progress.add_task("train", total=cfg.steps)

        def on_step(step, loss, metrics):
            progress.update(task, completed=step + 1, description=f"loss {loss:.3f}")
            if metrics:
                progress.console.print(f"step {step + 1}: held-out zero-shot {json.dumps(metrics)}")

        state, card = train_toy_clip(cfg, dev, on_step)
    card["recipe"]["name"] = name
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    atomic_write_json(out.with_suffix(".json"), card)
    console.print(f"wrote {out} and {out.with_suffix('.json')}")


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; finished work is kept, rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    run()
