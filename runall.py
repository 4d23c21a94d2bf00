"""clipsight's command line: ``python runall.py --input imgs``, stage commands, models, doctor, toy.

This module only parses options, prints and sets the exit code; the run itself is
``pipeline.runner.run_stages``. Exit codes: 0 all succeeded, 1 some image failed,
2 usage or config error.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console

import pipeline  # noqa: F401  (quiets openai-clip's import warning)
from pipeline.config import ConfigError, resolve_config
from pipeline.images import InputError, discover_images, slugify
from pipeline.models import ModelError, default_cache_dir, model_statuses, resolve_device
from pipeline.rundir import RunDir, RunLocked
from pipeline.runner import run_stages, select_stages, stage_status
from pipeline.views import checks_table, models_table, outcome_views, status_table, top_words_table, training_progress
from stages import RESULT_KEYS, STAGE_ORDER, STAGES, RunConfig
from stages.rank import merge_runs

app = typer.Typer(add_completion=False, no_args_is_help=False, rich_markup_mode=None,
                  help="Show what CLIP sees in a folder of images: opinions, labels, word records and a report.")
toy_app = typer.Typer(add_completion=False, help="The toy world: synthetic scenes and the shipped toy CLIP.")
app.add_typer(toy_app, name="toy")
console = Console(stderr=True)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set ascend.iterations=50. Repeatable.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")]
ModelOpt = Annotated[Optional[str], typer.Option(help="Model: an openai-clip name, 'toy', 'random:<arch>' or a checkpoint path.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo finished work instead of resuming.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (for logs).")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="openai-clip cache folder (default: $CLIPSIGHT_CACHE or ~/.cache/clip).")]
# torchrun's own parser rejects "--run" as an abbreviation of its "--run-path"; "--run-dir" passes through.
RUN_HELP = "An existing run directory (under torchrun, spell it --run-dir)."


def _fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _run(cfg: RunConfig, run: RunDir, names: list[str], force: bool, quiet: bool, images=None) -> int:
    """Run the stages, print the outcome, and return the exit code."""
    try:
        outcome = run_stages(cfg, run, STAGES, names, RESULT_KEYS, images=images, force=force, quiet=quiet, console=console)
    except (ModelError, ConfigError, RunLocked) as err:
        _fail(str(err))
    if outcome.dist.is_main:
        for view in outcome_views(outcome):
            console.print(view, highlight=False)
    return outcome.exit_code


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
    try:
        names = select_stages(stages, STAGE_ORDER)
        cfg = resolve_config(RunConfig, config, {}, {"model": model, "device": device}, set_)
        refs = discover_images(input, cfg.input.patterns)
    except (ConfigError, InputError) as err:
        _fail(str(err))
    if not refs:
        _fail(f"no images found in {input} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff .gif)")
    run = RunDir(output / (run_name or slugify(input.stem if input.is_file() else input.resolve().name)))
    raise typer.Exit(_run(cfg, run, names, force, quiet, images=refs))


def _open_run(path: Path) -> RunDir:
    if not RunDir(path).has_config():
        _fail(f"{path} is not a run directory (no run.yaml)")
    return RunDir(path)


def _run_stage(name: str, run: Path, config, model, device, set_, force: bool, quiet: bool) -> int:
    rd = _open_run(run)
    try:
        cfg = resolve_config(RunConfig, config, rd.load_config(), {"model": model, "device": device}, set_,
                             base_source=str(rd.file("run.yaml")))
    except ConfigError as err:
        _fail(str(err))
    return _run(cfg, rd, [name], force, quiet)


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
    first = [_open_run(r) for r in runs][0]
    try:
        cfg = resolve_config(RunConfig, config, first.load_config(), {}, set_)
    except ConfigError as err:
        _fail(str(err))
    records = merge_runs(list(runs), out, cfg.rank)
    if records:
        console.print(top_words_table(records))
    console.print(f"merged {len(runs)} runs: {out / 'records.csv'}")


@app.command("status")
def status_command(run: Annotated[Path, typer.Option("--run", "--run-dir", help=RUN_HELP)]) -> None:
    """Show, per stage, which images are done, stale (made with other settings), failed, blocked or pending, and why."""
    rd = _open_run(run)
    try:
        cfg = resolve_config(RunConfig, None, rd.load_config(), {}, [], base_source=str(rd.file("run.yaml")))
    except ConfigError as err:
        _fail(str(err))
    for line in status_table(run, stage_status(cfg, rd, STAGES, RESULT_KEYS)):
        Console().print(line, highlight=False)


@app.command("models")
def models_command(cache: CacheOpt = None) -> None:
    """List the known model names and which OpenAI checkpoints are already in the cache."""
    Console().print(models_table(model_statuses(cache or default_cache_dir()), cache or default_cache_dir()))


@app.command("doctor")
def doctor(
    cache: CacheOpt = None,
    output: Annotated[Path, typer.Option(help="Where runs will be written (its free space is checked).")] = Path("outputs"),
) -> None:
    """Check and explain the environment: torch and CUDA, the weights cache, free disk, optional extras."""
    from pipeline.doctor import check_environment

    checks = check_environment(cache or default_cache_dir(), output)
    Console().print(checks_table(checks))
    raise typer.Exit(1 if any(c.ok is False for c in checks) else 0)


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
    recipe: Annotated[str, typer.Option(help="'fine-gpu' (the shipped 16x16-grid checkpoint's), 'fine-cpu' (the same model, sized for a 2-core CPU), 'gpu' and 'cpu' (the older 8x8-grid model), or 'auto': fine-gpu on CUDA, else fine-cpu.")] = "auto",
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the recipe's).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Scenes per step (default: the recipe's).")] = None,
    workers: Annotated[int, typer.Option(help="Scene-drawing worker processes.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    teacher: Annotated[Optional[Path], typer.Option(help="A toy checkpoint for the distill- recipes: its text tower is copied and frozen, its image embedding distilled.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint beside --out (OUT.ckpt), written every few steps.")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train the toy CLIP on toy scenes (GPU when present), writing a checkpoint stock openai-clip loads."""
    from pipeline.toytrain import resolve_recipe, save_toy_checkpoint, train_toy_clip

    dev = resolve_device(device or "auto")
    try:
        name, cfg = resolve_recipe(recipe, dev, steps=steps, batch_size=batch_size, workers=workers, seed=seed,
                                   teacher=str(teacher.resolve()) if teacher else None)
    except ValueError as err:
        _fail(str(err))
    ckpt = out.with_suffix(".ckpt")
    console.print(f"recipe {name}: {cfg.steps} steps of {cfg.batch_size} scenes, lr {cfg.lr}, on {dev}; "
                  f"checkpoint {ckpt}" + (" (resuming)" if resume and ckpt.is_file() else ""))
    with training_progress(console, cfg.steps) as on_step:
        try:
            state, card = train_toy_clip(cfg, dev, on_step, checkpoint=ckpt, resume=resume)
        except ValueError as err:
            _fail(f"{err}; drop --resume to start over")
    console.print(f"wrote {out} and {save_toy_checkpoint(out, state, {**card, 'recipe': {**card['recipe'], 'name': name}})}")


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted; finished work is kept, rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    run()
