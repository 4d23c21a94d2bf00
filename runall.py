"""clipsight's command line: ``python runall.py --input imgs``, stage commands, models, doctor, toy.

This module declares the app and its commands; their bodies are in ``cli/`` and call the library
(``pipeline``) and the stages (``stages``); the run itself is ``pipeline.run.runner.run_stages``. Exit codes:
0 all succeeded, 1 some image failed, 2 usage or config error, 130 interrupted.

Results and paths go to stdout; logs, progress and errors to stderr. Torch and the
stages are imported only when a command starts work, so ``--help`` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

import pipeline  # noqa: F401  (quiets openai-clip's import warning)
from cli.common import (INTERRUPTED, CacheOpt, ConfigOpt, DeviceOpt, ForceOpt, JsonOpt, ModelOpt, Preset, QuietOpt,
                        SetOpt, console, execute, fail, out, print_dry_run, read_words, resolve, value, version)
from cli.runs import COMMANDS
from cli.toy import toy_app
from pipeline.run.config import STAGE_NAMES, ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Show what CLIP sees in a folder of images: opinions, labels, word records and a report.")
app.add_typer(toy_app, name="toy")


def _print_version(asked: bool) -> None:
    if asked:
        out.print(f"clipsight {version()}")
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
    words: Annotated[Optional[str], typer.Option("--words", help="Your vocabulary beside CLIP's opinion: \"forklift,pallet\", or a file of one word a line (\"word: synonym, synonym\" lines allowed). Sets decode.words.", show_default=False)] = None,
    no_ascent: Annotated[bool, typer.Option("--no-ascent", help="Label with the --words vocabulary alone, without gradient ascent (ascend.enabled: false): a fast closed-set run.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the images and estimate the time; run nothing.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Run every stage over --input and write a run directory under --output."""
    if ctx.invoked_subcommand is not None:
        return
    if input is None:
        console.print(ctx.get_help())
        fail("--input is required (a folder, an image, or a list file)")
    from pipeline.run.images import InputError, discover_images, slugify
    from pipeline.run.rundir import RunDir
    from pipeline.run.stage import select_stages

    sections: dict = {"decode": {"words": list(vocabulary)}} if (vocabulary := read_words(words)) else {}
    if no_ascent:
        sections["ascend"] = {"enabled": False}
    cfg = resolve(config, {}, {"model": model, "device": value(device), "preset": value(preset), **sections}, set_)
    try:
        names = select_stages(stages, STAGE_NAMES)
        refs = discover_images(input, cfg.input.patterns)
    except (ConfigError, InputError) as err:
        fail(str(err))
    if not refs:
        fail(f"no images found in {input} (looked for .jpg .jpeg .png .webp .bmp .tif .tiff .gif)")
    run = RunDir(output / (run_name or slugify(input.stem if input.is_file() else input.resolve().name)))
    if dry_run:
        print_dry_run(cfg, run, names, refs, as_json)
        raise typer.Exit(0)
    raise typer.Exit(execute(cfg, run, names, force, quiet, as_json, images=refs))


for _name, _command in COMMANDS:
    app.command(_name)(_command)


@app.command("models")
def models_command(cache: CacheOpt = None) -> None:
    """List the known model names and which OpenAI checkpoints are already in the cache."""
    from pipeline.model.load import default_cache_dir, model_statuses
    from pipeline.views import models_table

    out.print(models_table(model_statuses(cache or default_cache_dir()), cache or default_cache_dir()))


@app.command("config-reference")
def config_reference_command() -> None:
    """Print every config key with its type, default and meaning (docs/config.md is this output, in Markdown)."""
    from pipeline.run.configdoc import config_reference
    from stages import PRESETS, RunConfig, config_choices

    sys.stdout.write(config_reference(RunConfig, PRESETS, config_choices()))


@app.command("doctor")
def doctor(
    cache: CacheOpt = None,
    output: Annotated[Path, typer.Option(help="Where runs will be written (its free space is checked).")] = Path("outputs"),
) -> None:
    """Check and explain the environment: torch and CUDA, the weights cache, free disk, optional extras."""
    from pipeline.doctor import check_environment
    from pipeline.model.load import default_cache_dir
    from pipeline.views import checks_table

    checks = check_environment(cache or default_cache_dir(), output)
    out.print(checks_table(checks))
    raise typer.Exit(1 if any(c.ok is False for c in checks) else 0)


def run() -> None:
    try:
        app()
    except KeyboardInterrupt:  # outside a command's own handling (e.g. while imports load)
        console.print(INTERRUPTED, highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    run()
