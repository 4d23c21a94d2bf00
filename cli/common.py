"""What every command shares: the consoles, the common options, failing with a message, a run directory's config,
and running stages with their outcome printed. Exit codes: 0 all succeeded, 1 some image failed, 2 usage or
config error, 130 interrupted."""

from __future__ import annotations

import enum
import json
from importlib.metadata import PackageNotFoundError, version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, Optional

import typer
from rich.console import Console

from pipeline.run.config import ConfigError, resolve_config

if TYPE_CHECKING:
    from pipeline.run.rundir import RunDir
    from pipeline.run.runner import RunOutcome
    from stages import RunConfig


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


def version() -> str:
    try:
        return package_version("clipsight")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def interrupted() -> NoReturn:
    console.print(INTERRUPTED, highlight=False)
    raise typer.Exit(130)


def value(option: enum.Enum | None) -> str | None:
    return None if option is None else option.value


def read_words(words: str | None) -> tuple[str, ...] | None:
    """``--words``: a file of one word a line (``word: synonym, synonym`` allowed; blank lines and ``#`` comments
    skipped), or the words themselves, comma-separated."""
    if words is None:
        return None
    path = Path(words)
    if path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            fail(f"--words {path}: cannot read it as UTF-8 text ({err})")
        entries = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    elif path.suffix.lower() in (".txt", ".csv", ".list") or "/" in words:
        fail(f"--words {words}: no such file (give a file of one word a line, or the words, comma-separated)")
    else:
        entries = tuple(w.strip() for w in words.split(",") if w.strip())
    if not entries:
        fail(f"--words {words}: names no word")
    return entries


def resolve(config: Path | None, base: dict, cli: dict, set_: list[str] | None, **kw) -> RunConfig:
    from stages import PRESETS, RunConfig

    try:
        return resolve_config(RunConfig, config, base, cli, set_, presets=PRESETS, **kw)
    except ConfigError as err:
        fail(str(err))


def run_config(rd: RunDir, config: Path | None = None, cli: dict | None = None, set_: list[str] | None = None
                ) -> RunConfig:
    """A run directory's config: its ``run.yaml`` under ``--config``, the command's options and ``--set``."""
    from pipeline.run.rundir import CONFIG

    return resolve(config, rd.load_config(), cli or {}, set_ or [], base_source=str(rd.file(CONFIG)))


def summary_json(outcome: RunOutcome) -> dict:
    """The run's outcome as plain data: what ``--json`` prints."""
    from dataclasses import asdict

    from pipeline.run.rundir import IMAGES_CSV

    images_csv = outcome.run.file(IMAGES_CSV)
    return {"run": str(outcome.run.root), "exit_code": outcome.exit_code,
            "stages": [asdict(s) for s in outcome.summaries],
            "failures": [{k: r.get(k) for k in ("image", "path", "stage", "status", "error")} for r in outcome.failures],
            "report": outcome.report,
            "images_csv": str(images_csv) if images_csv.is_file() else None,
            "top_words": outcome.records[:10]}


def execute(cfg: RunConfig, run: RunDir, names: list[str], force: bool, quiet: bool, as_json: bool = False,
         images=None, summary: bool = True) -> int:
    """Run the stages, print the outcome (with ``summary`` off, its failures only), and return the exit code."""
    from pipeline.model.load import ModelError
    from pipeline.run.rundir import RunLocked
    from pipeline.run.runner import run_stages
    from pipeline.views import outcome_views
    from stages import RESULT_KEYS, STAGES

    try:
        outcome = run_stages(cfg, run, STAGES, names, RESULT_KEYS, images=images, force=force, quiet=quiet,
                             console=console)
    except (ModelError, ConfigError, RunLocked) as err:
        fail(str(err))
    except KeyboardInterrupt:  # the runner has logged it; finished images are in the manifest
        interrupted()
    if outcome.dist.is_main:
        if as_json:
            print(json.dumps(summary_json(outcome), indent=1, default=str))
        else:
            for view in outcome_views(outcome, summary):
                out.print(view, highlight=False)
    return outcome.exit_code


def print_dry_run(cfg: RunConfig, run: RunDir, names: list[str], refs: list, as_json: bool) -> None:
    """List the images and estimate the time from finished images (this run's, else the runs beside it), without running anything."""
    from pipeline.views import dry_run_plan, dry_run_views
    from stages import RESULT_KEYS, STAGES

    plan = dry_run_plan(cfg, run, names, refs, STAGES, RESULT_KEYS)
    if as_json:
        print(json.dumps(plan, indent=1))
        return
    for view in dry_run_views(plan):
        out.print(view, highlight=False)


def open_run(path: Path) -> RunDir:
    from pipeline.run.rundir import RunDir

    if not RunDir(path).has_config():
        fail(f"{path} is not a run directory (no run.yaml)")
    return RunDir(path)


def state_of(rd, cfg):
    """The status of a run's outputs under ``cfg`` (``(image id, stage, latest records) -> Status``), as ``status`` shows it."""
    from pipeline.run.stage import stage_provenance
    from stages import RESULT_KEYS, STAGES

    prov = stage_provenance(cfg, STAGES, RESULT_KEYS)
    return lambda image, stage, latest: prov.status(rd, latest, image, stage)


def run_stage(name: str, run: Path, config, model, device, set_, force: bool, quiet: bool, as_json: bool = False) -> int:
    rd = open_run(run)
    cfg = run_config(rd, config, {"model": model, "device": value(device)}, set_)
    return execute(cfg, rd, [name], force, quiet, as_json)
